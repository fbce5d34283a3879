"""Micro-check (not a test): one guided step of the full v1 UNet (random weights) at a 32x32 latent.

    OMP_NUM_THREADS=1 python bench/micro_step.py [--repeats 3]

Run from a checkout's root; works on checkouts before the backend pass (the UNet then fans out by
itself) and after it (`ldm.backends.optimize`). Prints the setup time (build + packing, or the
first step that packed lazily before) and the step times. Only gross differences count on a
shared machine; bench/run.py is the real measurement.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.getcwd())

import torch  # noqa: E402

from ldm.config import instantiate, model_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--prepack", type=int, default=64, help="BackendOptions.prepack_latent_size (0: pack lazily)")
    ap.add_argument("--profile", action="store_true", help="print the top operators of the last step")
    args = ap.parse_args()
    torch.manual_seed(0)
    unet = instantiate(model_config("configs/stable-diffusion/v1-inference.yaml")["params"]["unet_config"]).eval()
    unet.requires_grad_(False)
    t0 = time.perf_counter()
    if not os.path.isdir(os.path.join(os.getcwd(), "ldm", "backends")):  # (an installed newer ldm could fill the gap)
        optimized = "baseline (no backend pass)"
    else:
        from ldm.backends import BackendOptions, optimize

        optimize(unet, BackendOptions(prepack_latent_size=args.prepack or None))
        optimized = "optimize(BackendOptions())"
    setup = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, args.latent, args.latent, generator=g)
    t = torch.tensor([500.0])
    c = torch.randn(2, 77, 768, generator=g)
    times = []
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            eps = unet(x, t, c)
            times.append(time.perf_counter() - t0)
        if args.profile:
            with torch.profiler.profile() as prof:
                unet(x, t, c)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"{optimized}: threads {torch.get_num_threads()}, setup {setup:.2f} s, first step {times[0]:.2f} s, "
          f"then {', '.join(f'{s:.2f}' for s in times[1:])} s (min {min(times[1:]):.2f}); "
          f"eps {tuple(eps.shape)} mean |eps| {eps.abs().mean().item():.6f}")


if __name__ == "__main__":
    main()
