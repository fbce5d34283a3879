"""Defaults of the original txt2img script, shared by the command line and the library.

Imports nothing heavy, so that the command line can read them without loading torch (`--help`
stays instant) and set the OpenMP defaults before torch loads its OpenMP runtime.
"""

import os

DEFAULT_PROMPT = "a painting of a virus monster playing guitar"
DEFAULT_OUTDIR = "outputs/txt2img-samples"
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"

# How long an OpenMP worker spins at a barrier before it sleeps (GNU libgomp, which the torch CPU
# builds use). The default, 300,000 spins, keeps idle workers busy between the many short kernels
# of a UNet step; on a loaded machine they then steal the cores that the work needs. On a busy
# machine (another CPU-bound process beside the run) not spinning at all measured best: the v1 UNet's
# guided 256x256 step 1.67 s against 1.87 s with 10,000 spins and 2.43 s with the default; the demo UNet
# at 512x512 on 2 threads 0.63-0.88 s against 2.4-3.3 s with 10,000 spins (bench/README.md, "Threads").
# On a quiet machine it costs about 5 % against 10,000 spins (0.88-0.93 s against 0.84-0.87 s a v1 step),
# which is the better trade for a laptop with a browser open. Runs on one thread (the demo model at
# its own size, see ldm.devices.choose_threads) have no barrier to wait at.
OPENMP_SPINCOUNT = "0"


def set_openmp_defaults(environ=os.environ) -> bool:
    """Set GOMP_SPINCOUNT unless the user chose an OpenMP wait policy or spin count; True when set.
    Takes effect only before torch is first imported (libgomp reads it when it loads)."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = OPENMP_SPINCOUNT
    return True
