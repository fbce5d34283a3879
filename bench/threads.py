#!/usr/bin/env python3
"""Per-step time of the demo model (64x64, guided DDIM) by thread count and OpenMP spin, quiet and
under a competing CPU-bound process: the figures behind `ldm.devices.choose_threads` and the
GOMP_SPINCOUNT default.

    python bench/threads.py                 # 4 repeats of every setting, interleaved; quiet, then busy
    python bench/threads.py --repeats 6 --only busy
    python bench/threads.py --size 512 --steps 5 --images 1    # the demo UNet on 64x64 latents

Each measurement is a fresh process (libgomp reads GOMP_SPINCOUNT when it loads) that loads the
demo model, renders one warm-up image, then times the steps of the next images between the first
and the last step callback. "busy" runs `python -c "while True: pass"` beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys, time
sys.path.insert(0, {root!r})
import torch
from ldm.devices import choose_threads
from ldm.pipeline import Txt2Img
pipe = Txt2Img.from_files("configs/demo/shapes.yaml", "models/demo/shapes.safetensors", device="cpu", hash_model=False)
threads = {threads!r}
if threads == "auto":
    threads = choose_threads(pipe.unet_params, ({size} // 8) ** 2, torch.get_num_threads())
torch.set_num_threads(int(threads))
stamps = []
kw = dict(H={size}, W={size}, steps={steps}, n_samples=1, n_iter=1, seed=1)
pipe("a red circle on a white background", **kw)
per_step = []
for i in range({images}):
    stamps.clear()
    pipe("a red circle on a white background", callback=lambda *a: stamps.append(time.perf_counter()), **kw)
    per_step.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
print(threads, min(per_step), sorted(per_step)[len(per_step) // 2])
"""

SETTINGS = [  # (label, threads, GOMP_SPINCOUNT or None for libgomp's default)
    ("1 thread", "1", "10000"),
    ("2 threads, GOMP_SPINCOUNT=10000", "2", "10000"),
    ("2 threads, libgomp default spin", "2", None),
    ("2 threads, GOMP_SPINCOUNT=0 (passive)", "2", "0"),
    ("automatic (choose_threads)", "auto", "10000"),
]


def measure(threads, spin, steps, images, size):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if spin is not None:
        env["GOMP_SPINCOUNT"] = spin
    code = CHILD.format(root=str(ROOT), threads=threads, steps=steps, images=images, size=size)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if r.returncode:
        raise SystemExit(r.stderr)
    used, best, median = r.stdout.split()
    return int(used), float(best), float(median)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--only", choices=["quiet", "busy"])
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (default 64, the demo's own)")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
    rows = []
    for condition in ("quiet", "busy"):
        if args.only and condition != args.only:
            continue
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "busy" else None
        try:
            times = {label: [] for label, *_ in SETTINGS}
            used = {}
            for _ in range(args.repeats):  # interleaved: every setting once per round
                for label, threads, spin in SETTINGS:
                    n, best, median = measure(threads, spin, args.steps, args.images, args.size)
                    used[label] = n
                    times[label].append(median)
        finally:
            if busy:
                busy.kill()
                busy.wait()
        for label, *_ in SETTINGS:
            t = times[label]
            rows.append(f"| demo {args.size}x{args.size}, {condition} | {label} ({used[label]}) | {min(t) * 1e3:.1f} | "
                        f"{statistics.median(t) * 1e3:.1f} | {max(t) * 1e3:.1f} |")
    print(f"load average at end: {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}")
    print("| run | threads (count) | ms/step min | median | max |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
