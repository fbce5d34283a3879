"""SDXL at 1024x1024: one guided UNet step and the VAE decode with the default packing limits
(`BackendOptions.pack_max_positions`, `pack_max_positions_large`) against every convolution packed,
interleaved in one process (the options switched in place, the weights re-packed by `refresh`).

    OMP_NUM_THREADS=2 python bench/sdxl_pack.py --ckpt /work/bench-data/sdxl-random.safetensors

Needs about 19 GB of memory (the all-packed side holds every packed copy).
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.backends import BackendOptions, optimize, refresh  # noqa: E402
from ldm.backends.modules import Derived  # noqa: E402
from ldm.checkpoint import load_model  # noqa: E402
from ldm.config import load_config  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(ROOT / "bench/results/sdxl-random.safetensors"))
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args(argv)
    model = load_model(load_config(ROOT / "configs/sdxl/sd_xl_base.yaml"), args.ckpt)
    lat = args.size // 8
    opts = {"default": BackendOptions(prepack_latent_size=lat),
            "all packed": BackendOptions(prepack_latent_size=lat, pack_max_positions=None)}
    optimize(model, opts["default"])

    def use(name):
        for m in model.modules():
            if isinstance(m, Derived):
                m.backend = opts[name]
        refresh(model)

    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, lat, lat, generator=g), torch.tensor([500.0])
    c, y = torch.randn(2, 77, 2048, generator=g), torch.randn(2, 2816, generator=g)
    z = torch.randn(1, 4, lat, lat, generator=g)
    with torch.no_grad():
        t0 = time.perf_counter()
        unet(x, t, c, y)
        print(f"warm-up step {time.perf_counter() - t0:.2f} s", flush=True)
        for r, order in enumerate([("default", "all packed"), ("all packed", "default")]):
            for name in order:
                use(name)
                t0 = time.perf_counter()
                unet(x, t, c, y)
                print(f"round {r} {name}: step {time.perf_counter() - t0:.2f} s", flush=True)
        for name in ("all packed", "default"):
            use(name)
            t0 = time.perf_counter()
            model.decode_first_stage(z)
            print(f"{name}: decode {time.perf_counter() - t0:.2f} s", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")


if __name__ == "__main__":
    main()
