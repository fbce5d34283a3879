"""bf16 against fp32 on the bundled demo model: the evaluator's accuracy and the pixel difference.

    OMP_NUM_THREADS=1 python bench/bf16_demo.py [-n 96] [--sampler dpm_solver --steps 20 --scale 7.5]

Generates the held-out prompts of `ldm.demo.evaluate` (image k from seed k) three ways, each model
optimized (`ldm.backends.optimize`, BackendOptions()): float32; bfloat16 weights (UNet, text encoder
and autoencoder, as `--precision bf16` loads them); bfloat16 with the autoencoder in float32. The
sampler's state stays float32 in all three (as the pipeline keeps it). Prints each one's accuracy
(pixel classifier of ldm/demo/shapes.py) and its pixels against float32's: mean and max |difference|
in 0-255 levels, the share of pixel values more than 8 levels off, the images with any value more than
64 levels off, PSNR, and how many images the classifier reads the same.
"""

import argparse
import copy
import os
import sys

sys.path.insert(0, os.getcwd())

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.backends import BackendOptions, optimize  # noqa: E402
from ldm.backends.kernels import bf16_available  # noqa: E402
from ldm.checkpoint import load_model  # noqa: E402
from ldm.demo.evaluate import evaluate  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=96)
    ap.add_argument("--sampler", default="dpm_solver")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scale", type=float, default=7.5)
    ap.add_argument("--config", default="configs/demo/shapes.yaml")
    ap.add_argument("--ckpt", default="models/demo/shapes.safetensors")
    args = ap.parse_args()
    print(f"bf16 in oneDNN on this CPU: {bf16_available()}; threads {torch.get_num_threads()}")
    fp32 = load_model(args.config, args.ckpt, "cpu")
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    mixed = copy.deepcopy(bf16)
    mixed.first_stage_model.float()
    runs = {}
    for name, model in (("fp32", fp32), ("bf16", bf16), ("bf16, fp32 VAE", mixed)):
        optimize(model, BackendOptions(prepack_latent_size=8))
        runs[name] = evaluate(model, args.sampler, args.steps, args.scale, n=args.n)
    ref = runs["fp32"]
    print(f"| run | colour | shape | background | all three | s / image | mean abs diff | max abs diff "
          f"| values > 8 off | images > 64 off | PSNR dB | same reading |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in runs.items():
        d = np.abs(r.images.astype(np.int16) - ref.images.astype(np.int16))
        mse = float((d.astype(np.float64) ** 2).mean())
        psnr = "inf" if mse == 0 else f"{10 * np.log10(255 ** 2 / mse):.1f}"
        same = sum(a[2] == b[2] for a, b in zip(r.records, ref.records))
        print(f"| {name} | {100 * r.colour_accuracy:.1f} % | {100 * r.shape_accuracy:.1f} % "
              f"| {100 * r.background_accuracy:.1f} % | {100 * r.prompt_accuracy:.1f} % | {r.seconds_per_image:.3f} "
              f"| {d.mean():.2f} | {d.max()} | {100 * (d > 8).mean():.2f} % | {int((d.reshape(len(d), -1).max(1) > 64).sum())} "
              f"| {psnr} | {same} / {r.n} |")


if __name__ == "__main__":
    main()
