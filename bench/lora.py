"""What a LoRA costs: reading and merging a 144 MB v1 LoRA, taking it out, and the sampling step after.

The LoRA is the classic web-UI size: kohya format, rank 128, float16, over every layer kohya trains by
default (the UNet transformers' q/k/v/out, feed-forward and projections; the text encoder's q/k/v/out and
MLP), random values; the model is the real v1 architecture with random weights, optimized as the command
line runs it. Merging costs rank x weights multiply-adds (about 80 GFLOP here), so the figure scales with
the CPU's GEMM speed and its free cores: run it on a quiet machine and say how quiet it was.

    OMP_NUM_THREADS=1 python bench/lora.py            # writes bench/results/lora.json
    python bench/lora.py --latent 64 --repeats 3      # 512x512 steps
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.backends import BackendOptions, optimize  # noqa: E402
from ldm.checkpoint import build_model  # noqa: E402
from ldm.config import model_config  # noqa: E402
from ldm.lora import LoraLibrary, LoraMerger  # noqa: E402

V1_CONFIG = ROOT / "configs/stable-diffusion/v1-inference.yaml"
KOHYA_UNET = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
              "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def write_lora(model, path, rank=128):
    """A kohya-format LoRA over the layers kohya's default network trains, float16, random."""
    from safetensors.torch import save_file

    from ldm.lora import lora_targets

    table, _ = lora_targets(model)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, target in table.items():
        unet = name.startswith("lora_unet_") and name.startswith(("lora_unet_down_", "lora_unet_mid_block_", "lora_unet_up_")) \
            and name.endswith(tuple("_" + s.replace(".", "_") for s in KOHYA_UNET))
        te = name.startswith("lora_te_text_model_encoder_layers_")
        if not (unet or te):
            continue
        out, fan_in = params[target.key].shape[0], params[target.key][0].numel()
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, fan_in, generator=g) / math.sqrt(fan_in)).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn(out, rank, generator=g) * 1e-3).half()
        sd[f"{name}.alpha"] = torch.tensor(float(rank // 2)).half()
    save_file(sd, str(path))
    return len(sd) // 3


def step_time(model, latent, repeats):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent, latent, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(2, 77, 768, generator=g)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first call packs and warms up
            t0 = time.perf_counter()
            model.apply_model(x, t, ctx)
            times.append(time.perf_counter() - t0)
    return min(times[1:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latent", type=int, default=32, help="latent side of the timed step (32: 256x256)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "bench/results/lora.json"))
    p.add_argument("--ckpt", default=str(ROOT / "bench/results/sd-v1-random.ckpt"),
                   help="a v1 checkpoint (bench/make_checkpoint.py writes this one); random init if absent")
    args = p.parse_args()

    t0 = time.perf_counter()
    if Path(args.ckpt).is_file():
        from ldm.checkpoint import load_model

        model = load_model({"model": model_config(V1_CONFIG)}, args.ckpt)
    else:
        model = build_model({"model": model_config(V1_CONFIG)}, "cpu")
    model.eval()
    load_s = time.perf_counter() - t0
    optimize(model, BackendOptions(prepack_latent_size=args.latent))
    folder = ROOT / "bench/results/Lora"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"kohya-r{args.rank}.safetensors"
    if not path.exists():
        write_lora(model, path, args.rank)
    size_mb = path.stat().st_size / 1e6

    base_step = step_time(model, args.latent, args.repeats)
    lib = LoraLibrary(model, folder)
    t0 = time.perf_counter()
    lora = lib.get(path.stem)
    read_s = time.perf_counter() - t0
    merger = LoraMerger(model)
    t0 = time.perf_counter()
    merger.apply([(lora, 1.0, 1.0)])
    merge_s = time.perf_counter() - t0
    lora_step = step_time(model, args.latent, args.repeats)
    t0 = time.perf_counter()
    merger.apply([])
    remove_s = time.perf_counter() - t0
    result = {
        "model_load_s": round(load_s, 2), "lora_mb": round(size_mb, 1), "modules": len(lora.modules), "rank": args.rank,
        "read_s": round(read_s, 3), "merge_s": round(merge_s, 3), "apply_total_s": round(read_s + merge_s, 3),
        "remove_s": round(remove_s, 3), "latent": args.latent, "step_s_base": round(base_step, 3),
        "step_s_lora": round(lora_step, 3), "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for k, v in result.items():
        print(f"{k:>16}: {v}")


if __name__ == "__main__":
    main()
