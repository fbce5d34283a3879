"""Where a guided UNet step's time goes: per-operator self time, and oneDNN's own view (which
implementation each primitive ran, and for how long).

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 OMP_NUM_THREADS=2 \
        python bench/profile_step.py --latent 64 [--onednn-verbose] [--ckpt /work/bench-data/sd-v1-random.ckpt]

Loads the v1 model (memory-mapped, as the command line does) or builds the UNet with random
weights, optimizes it with the default BackendOptions (override with --off lever,lever), runs
--repeats guided steps (one latent, two contexts) and prints their times, then one profiled step:
operators by self time (grouped by name and input shapes, top --rows), and with --onednn-verbose
one more step with oneDNN's verbose log on, summed by primitive kind and implementation
(jit:avx2, jit:avx512_core, brg:..., gemm:..., ref:... — a "ref" or "gemm" here is a slow fallback).
Set the ISA cap in the environment before starting (oneDNN reads it once). Not a test: figures
vary with the machine's load; run under the shared lock.
"""

import argparse
import collections
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())

import torch  # noqa: E402


def build(args):
    from ldm.backends import BackendOptions, optimize

    opts = BackendOptions(prepack_latent_size=args.latent).replace(**{name: False for name in args.off})
    if args.ckpt:
        from ldm.checkpoint import load_model

        model = load_model(args.config, args.ckpt)
        unet = model.model.diffusion_model
    else:
        from ldm.config import instantiate, model_config

        torch.manual_seed(0)
        unet = instantiate(model_config(args.config)["params"]["unet_config"]).eval()
        unet.requires_grad_(False)
    t0 = time.perf_counter()
    optimize(unet, opts)
    return unet, time.perf_counter() - t0


def onednn_summary(path):
    """{(kind, impl): [count, ms]} from a oneDNN verbose log (v3 format: onednn_verbose,...,exec,cpu,kind,impl,...,ms)."""
    sums = collections.defaultdict(lambda: [0, 0.0])
    shapes = collections.defaultdict(lambda: [0, 0.0])
    with open(path, errors="replace") as f:
        for line in f:
            if not line.startswith("onednn_verbose") or ",exec,cpu," not in line:
                continue
            parts = line.rstrip().split(",")
            i = parts.index("exec")
            kind, impl = parts[i + 2], parts[i + 3]
            try:
                ms = float(parts[-1])
            except ValueError:
                continue
            sums[(kind, impl)][0] += 1
            sums[(kind, impl)][1] += ms
            desc = parts[-2] if len(parts) > 2 else ""
            shapes[(kind, impl, parts[i + 5] if len(parts) > i + 5 else "", desc)][0] += 1
            shapes[(kind, impl, parts[i + 5] if len(parts) > i + 5 else "", desc)][1] += ms
    return sums, shapes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    ap.add_argument("--ckpt", default=None, help="a checkpoint to load (else random weights)")
    ap.add_argument("--off", default="", help="BackendOptions levers to turn off, comma-separated")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--ab", default=None, help="a lever to time on and off, interleaved, --repeats rounds (then exit)")
    ap.add_argument("--onednn-verbose", action="store_true")
    args = ap.parse_args()
    args.off = [s for s in args.off.split(",") if s]
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    unet, setup = build(args)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, args.latent, args.latent, generator=g)
    t = torch.tensor([500.0])
    c = torch.randn(2, 77, unet.context_dim, generator=g)
    times = []
    if args.ab:
        from ldm.backends.modules import Derived

        mods = [m for m in unet.modules() if isinstance(m, Derived)]
        base = mods[0].backend
        settings = {"on": base.replace(**{args.ab: True}), "off": base.replace(**{args.ab: False})}
        got = {"on": [], "off": []}
        with torch.no_grad():
            unet(x, t, c)
            for r in range(args.repeats):
                for name, opts in settings.items():
                    for m in mods:
                        m.backend = opts
                    if r == 0:
                        unet(x, t, c)  # a step to settle what this setting keeps (traced graphs)
                    t0 = time.perf_counter()
                    eps = unet(x, t, c)
                    got[name].append(time.perf_counter() - t0)
                    print(f"  {args.ab} {name}: {got[name][-1]:.2f} s, mean |eps| {eps.abs().mean().item():.6f}", flush=True)
        print(f"ISA cap {isa} (ATen {torch.backends.cpu.get_cpu_capability()}), latent {args.latent}, {args.ab}: "
              + ", ".join(f"{n} min {min(v):.2f} s median {sorted(v)[len(v) // 2]:.2f} s" for n, v in got.items()))
        return
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            eps = unet(x, t, c)
            times.append(time.perf_counter() - t0)
        print(f"ISA cap {isa}, threads {torch.get_num_threads()}, latent {args.latent}, off {args.off or '-'}: "
              f"setup {setup:.2f} s, first step {times[0]:.2f} s, then {', '.join(f'{s:.2f}' for s in times[1:])} s "
              f"(min {min(times[1:]):.2f}); mean |eps| {eps.abs().mean().item():.6f}", flush=True)
        if not args.no_profile:
            with torch.profiler.profile(record_shapes=True) as prof:
                unet(x, t, c)
            events = prof.key_averages(group_by_input_shape=True)
            total = sum(e.self_cpu_time_total for e in events)
            print(f"profiled step: {total / 1e6:.2f} s of operator self time")
            by_name = collections.defaultdict(float)
            for e in events:
                by_name[e.key] += e.self_cpu_time_total
            for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:15]:
                print(f"  {us / 1e3:9.1f} ms {100 * us / total:5.1f}%  {name}")
            print("by name and input shapes:")
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.rows]:
                shapes = str(e.input_shapes)[:110]
                print(f"  {e.self_cpu_time_total / 1e3:9.1f} ms x{e.count:<4d} {e.key[:36]:36s} {shapes}")
        if args.onednn_verbose:
            log = tempfile.NamedTemporaryFile(suffix=".log", delete=False).name
            fd = os.dup(1)
            sys.stdout.flush()
            with open(log, "w") as f:
                os.dup2(f.fileno(), 1)
                try:
                    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                        unet(x, t, c)
                finally:
                    sys.stdout.flush()
                    os.dup2(fd, 1)
            sums, shapes = onednn_summary(log)
            print(f"oneDNN verbose ({log}): ms by primitive and implementation")
            for (kind, impl), (n, ms) in sorted(sums.items(), key=lambda kv: -kv[1][1]):
                print(f"  {ms:9.1f} ms x{n:<5d} {kind:14s} {impl}")
            print("top primitives by shape:")
            for (kind, impl, _, desc), (n, ms) in sorted(shapes.items(), key=lambda kv: -kv[1][1])[:args.rows]:
                print(f"  {ms:9.1f} ms x{n:<4d} {kind:12s} {impl:22s} {desc[:90]}")


if __name__ == "__main__":
    main()
