"""SDXL on the CPU: one guided UNet step and the VAE decode, ours against diffusers on the same weights.

    python bench/make_checkpoint.py --family sdxl --out bench/results/sdxl-random.safetensors
    OMP_NUM_THREADS=2 python bench/sdxl.py --ckpt bench/results/sdxl-random.safetensors --sizes 512,1024

Ours: the checkpoint loaded as the command line loads it (float32, the backend pass), one latent under
two contexts with its size vector y. Diffusers: `UNet2DConditionModel` (`addition_embed_type="text_time"`)
and `AutoencoderKL` built by diffusers' own single-file converters from our model's state dict, holding
the same weight tensors, batch 2. Interleaved, minimum over the repeats; peak RSS at the end.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.backends import BackendOptions, optimize  # noqa: E402
from ldm.checkpoint import load_model  # noqa: E402
from ldm.config import load_config  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from run import diffusers_sharing  # noqa: E402  (diffusers' UNet and VAE over our weight tensors)

CONFIG = ROOT / "configs/sdxl/sd_xl_base.yaml"


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(ROOT / "bench/results/sdxl-random.safetensors"))
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-decode", action="store_true")
    args = ap.parse_args(argv)
    config = load_config(CONFIG)
    model = load_model(config, args.ckpt, "cpu", torch.float32)
    unet_d, vae_d = diffusers_sharing(model, config)
    optimize(model, BackendOptions(prepack_latent_size=None))
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    out = {"command": "python bench/sdxl.py " + " ".join(argv or sys.argv[1:]), "threads": torch.get_num_threads()}
    with torch.no_grad():
        for size in [int(s) for s in args.sizes.split(",")]:
            lat = size // 8
            x = torch.randn(1, 4, lat, lat, generator=g)
            t = torch.tensor([500.0])
            c = torch.randn(2, 77, 2048, generator=g)
            y = torch.randn(2, 2816, generator=g)
            pooled, ids = y[:, :1280], torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
            ours = lambda: unet(x, t, c, y)  # noqa: E731
            theirs = lambda: unet_d(torch.cat([x, x]), t.repeat(2), encoder_hidden_states=c,  # noqa: E731
                                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
            ours()  # packing for this size, attention graphs
            out[f"step_{size}"] = {"ours": best(ours, args.repeats), "diffusers": best(theirs, args.repeats)}
            print(size, out[f"step_{size}"], flush=True)
            if not args.no_decode and size == max(int(s) for s in args.sizes.split(",")):
                z = torch.randn(1, 4, lat, lat, generator=g)
                out[f"decode_{size}"] = {"ours": best(lambda: model.decode_first_stage(z), 1),
                                         "diffusers": best(lambda: vae_d.decode(z / model.scale_factor).sample, 1)}
                print("decode", size, out[f"decode_{size}"], flush=True)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(out))


if __name__ == "__main__":
    main()
