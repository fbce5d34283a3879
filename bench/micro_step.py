"""Micro-check (not a test): one guided step of the full v1 UNet (random weights) at a 32x32 latent.

    OMP_NUM_THREADS=1 python bench/micro_step.py [--repeats 3]
    python bench/micro_step.py --dtype float32 bfloat16 --latent 32 64   # bf16 against fp32, interleaved

Run from a checkout's root; works on checkouts before the backend pass (the UNet then fans out by
itself) and after it (`ldm.backends.optimize`). Prints the setup time (build + packing, or the
first step that packed lazily before) and the step times. With several `--dtype`s, one UNet per
dtype (the same weights, rounded) runs its steps in turn with the others', per latent size, and the
last line gives each dtype's speed-up over the first. Only gross differences count on a shared
machine; bench/run.py is the real measurement.
"""

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.getcwd())

import torch  # noqa: E402

from ldm.config import instantiate, model_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latent", type=int, nargs="+", default=[32])
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="weight and activation dtypes, each stepped in turn with the others")
    ap.add_argument("--prepack", type=int, default=64,
                    help="BackendOptions.prepack_latent_size (0: pack lazily; with several --latent, each latent's own)")
    ap.add_argument("--profile", action="store_true", help="print the top operators of the last step")
    args = ap.parse_args()
    torch.manual_seed(0)
    unet = instantiate(model_config("configs/stable-diffusion/v1-inference.yaml")["params"]["unet_config"]).eval()
    unet.requires_grad_(False)
    unets = {name: unet if name == "float32" else copy.deepcopy(unet).to(getattr(torch, name)) for name in args.dtype}
    if "float32" not in args.dtype:
        del unet
    backend = os.path.isdir(os.path.join(os.getcwd(), "ldm", "backends"))  # (an installed newer ldm could fill the gap)
    summary = []
    for latent in args.latent:
        prepack = (latent if len(args.latent) > 1 else args.prepack) or None
        best = {}
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 4, latent, latent, generator=g)
        t = torch.tensor([500.0])
        c = torch.randn(2, 77, 768, generator=g)
        times = {name: [] for name in unets}
        setup = {}
        for name, net in unets.items():
            t0 = time.perf_counter()
            if backend:
                from ldm.backends import BackendOptions, optimize

                optimize(net, BackendOptions(prepack_latent_size=prepack))
            setup[name] = time.perf_counter() - t0
        optimized = "optimize(BackendOptions())" if backend else "baseline (no backend pass)"
        with torch.no_grad():
            for _ in range(args.repeats + 1):
                for name, net in unets.items():
                    dtype = next(net.parameters()).dtype
                    t0 = time.perf_counter()
                    eps = net(x.to(dtype), t, c.to(dtype))
                    times[name].append(time.perf_counter() - t0)
                    best[name] = eps.float()
            if args.profile:
                for name, net in unets.items():
                    dtype = next(net.parameters()).dtype
                    with torch.profiler.profile() as prof:
                        net(x.to(dtype), t, c.to(dtype))
                    print(name, prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        for name, ts in times.items():
            print(f"{optimized} {name} latent {latent}: threads {torch.get_num_threads()}, setup {setup[name]:.2f} s, "
                  f"first step {ts[0]:.2f} s, then {', '.join(f'{s:.2f}' for s in ts[1:])} s (min {min(ts[1:]):.2f}); "
                  f"eps {tuple(best[name].shape)} mean |eps| {best[name].abs().mean().item():.6f}")
        first = args.dtype[0]
        for name in args.dtype[1:]:
            diff = (best[name] - best[first]).abs()
            summary.append(f"latent {latent}: {name} {min(times[first][1:]) / min(times[name][1:]):.2f}x {first} "
                           f"(min step {min(times[name][1:]):.2f} vs {min(times[first][1:]):.2f} s), "
                           f"eps max |diff| {diff.max().item():.4f} mean {diff.mean().item():.5f}")
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
