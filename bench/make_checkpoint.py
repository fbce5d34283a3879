"""Write a random-weight Stable Diffusion v1 or 2.x checkpoint in the original single-file layout.

The real architecture (v1: 1,066,235,307 parameters, float32, 4.27 GB like `sd-v1-4.ckpt`; 2.x: the
OpenCLIP ViT-H/14 text tower instead, 1,303,597,228 parameters like `v2-1_768-ema-pruned.ckpt`) with
random weights of a sane scale, so that the benchmark loads, runs and compares a file of the true
size and key layout without any download. The file is a benchmark input: it is written outside
git (bench/results/ is ignored) and never committed. The 2.x families differ only in the config they
are meant for (v2: 512-base, eps; v2-v: 768-v); random weights predict neither, so run them with
`--parameterization` (auto-detection would decide at random).

    python bench/make_checkpoint.py                       # bench/results/sd-v1-random.ckpt
    python bench/make_checkpoint.py --family v2-v         # bench/results/sd-v2-v-random.ckpt
    python bench/make_checkpoint.py --out /tmp/x.safetensors
    python bench/make_checkpoint.py --family sdxl         # bench/results/sd-sdxl-random.safetensors (float16)

SDXL files (`sdxl`, `sdxl-refiner`) are written as the released ones are: float16 .safetensors with
the sgm key layout and no schedule buffers or EMA state.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.checkpoint import build_model  # noqa: E402

V1_CONFIG = ROOT / "configs/stable-diffusion/v1-inference.yaml"
CONFIGS = {
    "v1": V1_CONFIG,
    "v2": ROOT / "configs/stable-diffusion/v2-inference.yaml",
    "v2-v": ROOT / "configs/stable-diffusion/v2-inference-v.yaml",
    "sdxl": ROOT / "configs/sdxl/sd_xl_base.yaml",
    "sdxl-refiner": ROOT / "configs/sdxl/sd_xl_refiner.yaml",
}
DEFAULT_OUT = ROOT / "bench/results/sd-v1-random.ckpt"
GLOBAL_STEP = {"v1": 470000, "v2": 875000, "v2-v": 110000, "sdxl": 0, "sdxl-refiner": 0}  # what sd-v1-4, 512-base-ema and v2-1_768 record


def random_state_dict(config=V1_CONFIG, seed=0, global_step=470000, dtype=torch.float32):
    """The state dict of `config`'s model with random weights, in the original key layout.

    Matrices get N(0, 1/fan_in) (activations keep their scale through a thousand layers), norm
    scales 1 +- 0.2, biases +-0.2; the schedule buffers and position ids get their true values.
    Floating weights are stored in `dtype`; an SDXL (sgm) model gets no schedule buffers or EMA state.
    """
    model = build_model(config, "meta")
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        if not p.is_floating_point():  # position_ids
            sd[name] = torch.arange(p.shape[-1], dtype=p.dtype).expand(p.shape).clone()
        elif name.endswith("logit_scale"):  # OpenCLIP's temperature, log(1 / 0.07) at initialisation
            sd[name] = torch.tensor(math.log(1 / 0.07))
        elif p.ndim >= 2:
            sd[name] = torch.randn(p.shape, generator=g).div_(math.sqrt(math.prod(p.shape[1:])))
        elif name.endswith("weight"):
            sd[name] = torch.randn(p.shape, generator=g).mul_(0.2).add_(1.0)
        elif "." in name:  # biases
            sd[name] = torch.randn(p.shape, generator=g).mul_(0.2)
        if name in sd and sd[name].is_floating_point():
            sd[name] = sd[name].to(dtype)
    if hasattr(model, "conditioner"):  # SDXL files hold the weights alone
        return sd
    model.reset_schedule("cpu")  # the schedule buffers, as the original stores them
    for name, buf in model.named_buffers(recurse=False):
        sd[name] = buf.clone()
    # Training state the original v1 files carry beside the weights.
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(global_step, dtype=torch.int32)
    return sd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(CONFIGS), default="v1",
                    help="v1, v2 (2.x 512-base, eps), v2-v (2.x 768-v), sdxl or sdxl-refiner (default %(default)s)")
    ap.add_argument("--out", type=Path, default=None,
                    help="a .ckpt or .safetensors path (default bench/results/sd-FAMILY-random.ckpt)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = ap.parse_args(argv)
    sgm = args.family.startswith("sdxl")
    args.out = args.out or ROOT / f"bench/results/sd-{args.family}-random.{'safetensors' if sgm else 'ckpt'}"
    if args.out.exists() and not args.force:
        print(f"{args.out} exists ({args.out.stat().st_size / 1e9:.2f} GB); --force to rewrite")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    step = GLOBAL_STEP[args.family]
    sd = random_state_dict(CONFIGS[args.family], args.seed, step, torch.float16 if sgm else torch.float32)
    n = sum(v.numel() for k, v in sd.items() if v.is_floating_point() and "." in k and not k.startswith("model_ema."))
    tmp = args.out.with_name(args.out.name + ".part")
    if args.out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(tmp))
    else:
        torch.save({"state_dict": sd, "global_step": step, "epoch": 6}, str(tmp))
    tmp.replace(args.out)
    print(f"wrote {args.out}: {len(sd)} tensors, {n:,} weights, {args.out.stat().st_size / 1e9:.2f} GB "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
