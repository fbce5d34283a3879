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
# of a UNet step; on a loaded machine they then steal the cores that the work needs (2.4 s a guided
# 256x256 step on 2 cores shared with one busy process, against 1.7 s with OMP_WAIT_POLICY=PASSIVE),
# while never spinning costs 5 to 7 % on a quiet machine. 10,000 spins measured best on a quiet machine
# (0.84 to 0.87 s against 0.85 to 0.93 default and 0.88 to 0.93 passive) and 1.9 s on the loaded one.
OPENMP_SPINCOUNT = "10000"


def set_openmp_defaults(environ=os.environ) -> bool:
    """Set GOMP_SPINCOUNT unless the user chose an OpenMP wait policy or spin count; True when set.
    Takes effect only before torch is first imported (libgomp reads it when it loads)."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = OPENMP_SPINCOUNT
    return True
