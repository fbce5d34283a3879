#!/usr/bin/env python
"""Measure the demo model end to end: generate held-out prompts, classify the images, score.

    python scripts/eval_demo.py --sampler ddim --steps 50 --scale 7.5 -n 96
    python scripts/eval_demo.py --suite -n 96      # the table of models/demo/EVAL.md

Prints the command, the machine, colour / shape / background accuracy and seconds per image
(batched generation, wall time divided by the number of images), and a Markdown table row.
See ldm/demo/evaluate.py for the prompts and seeds.
"""

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.checkpoint import load_model  # noqa: E402
from ldm.demo.evaluate import evaluate, grid  # noqa: E402
from ldm.samplers import SAMPLERS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# (sampler, steps, scale) rows of the published table: the three samplers at the
# default scale, then without guidance.
SUITE = (("ddim", 50, 7.5), ("dpm_solver", 20, 7.5), ("plms", 50, 7.5),
         ("ddim", 50, 1.0), ("dpm_solver", 20, 1.0), ("plms", 50, 1.0))


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def row(r):
    return (f"| {r.sampler} | {r.steps} | {r.scale:g} | {r.n} | {100 * r.colour_accuracy:.1f} % "
            f"| {100 * r.shape_accuracy:.1f} % | {100 * r.background_accuracy:.1f} % | {100 * r.prompt_accuracy:.1f} % "
            f"| {r.seconds_per_image:.3f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/demo/shapes.yaml"))
    p.add_argument("--ckpt", default=str(ROOT / "models/demo/shapes.safetensors"))
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=7.5)
    p.add_argument("-n", type=int, default=96, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", help="also save the images as one PNG here")
    p.add_argument("--errors", action="store_true", help="list the misclassified images")
    p.add_argument("--suite", action="store_true", help="run every row of the published table (ignores "
                   "--sampler, --steps, --scale) and print it")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    print("command: python " + " ".join(sys.argv))
    print("machine: " + machine())
    model = load_model(args.config, args.ckpt, "cpu")
    if args.suite:
        print("\n| sampler | steps | scale | images | colour | shape | background | all three | s / image |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for sampler, steps, scale in SUITE:
            r = evaluate(model, sampler, steps, scale, args.n, args.seed, args.batch)
            print(row(r), flush=True)
        return
    r = evaluate(model, args.sampler, args.steps, args.scale, args.n, args.seed, args.batch)
    print(f"{r.n} images, {r.sampler} {r.steps} steps, scale {r.scale:g}")
    print(f"colour accuracy     {100 * r.colour_accuracy:5.1f} %")
    print(f"shape accuracy      {100 * r.shape_accuracy:5.1f} %")
    print(f"background accuracy {100 * r.background_accuracy:5.1f} %")
    print(f"all three right     {100 * r.prompt_accuracy:5.1f} %")
    print(f"seconds per image   {r.seconds_per_image:.3f} (batch {args.batch})")
    print(row(r))
    if args.errors:
        for k, (prompt, want, got) in enumerate(r.records):
            if want[:2] != got[:2]:
                print(f"  #{k} {prompt!r}: got {got}")
    if args.grid:
        from PIL import Image

        Image.fromarray(grid(r.images)).save(args.grid)
        print(f"saved {args.grid}")


if __name__ == "__main__":
    main()
