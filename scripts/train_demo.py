#!/usr/bin/env python
"""Train the bundled demo model (configs/demo/shapes.yaml -> models/demo/shapes.safetensors).

    python scripts/train_demo.py            # both stages, on one CPU thread

Stage 1 fits the KL autoencoder (two cosine cycles, about 21 minutes on one core of the 2-core
development machine), stage 2 the UNet and the small CLIP text encoder on the autoencoder's
latents (7,000 steps of 64, about 30 minutes), keeping an exponential moving average of their
weights. Seeded: the same seed and thread count reproduce the weights bit for bit on the same
machine. One thread is the default: on a small machine shared with other jobs, two threads
spend much of their time waiting on each other.

The output holds the full model in the original checkpoint layout, weights in float16, plus
`scale_factor`; the config's `scale_factor` line is rewritten to the measured value.
`--autoencoder FILE` takes stage 1 from an earlier output and trains stage 2 only (the result is
the full run's, bit for bit: tests/test_demo.py checks it);
`--autoencoder FILE --ae-skip 1` resumes stage 1 after its first cycle.
"""

import argparse
import platform
import re
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.checkpoint import build_model, read_state_dict  # noqa: E402
from ldm.demo import shapes, train  # noqa: E402
from ldm.demo.evaluate import evaluate, score  # noqa: E402
from ldm.models.diffusion import SCHEDULE_BUFFERS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# Stage 1 runs as cosine cycles with warm restarts: a plain one, then one that weighs the
# shape's pixels more (colour fidelity) at a lower learning rate.
AE_CYCLES = (
    dict(steps=2000, lr=2e-3, fg_weight=2.0),
    dict(steps=1000, lr=5e-4, fg_weight=4.0),
)


@torch.no_grad()
def autoencoder_accuracy(vae, n=300, seed=123):
    """Colour and shape accuracy of the pixel classifier on decode(encode(x)) of clean held-out
    images: the ceiling the autoencoder puts on the whole model."""
    images, _, scenes = shapes.make_dataset(n, seed=seed, held_out=True)
    rec = shapes.to_uint8(vae.decode(vae.encode(shapes.to_tensor(images)).mode()))
    (colour, shape, _, _), _ = score(rec, [(s.colour, s.shape, s.background) for s in scenes])
    return colour, shape


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/demo/shapes.yaml"))
    p.add_argument("--out", default=str(ROOT / "models/demo/shapes.safetensors"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=12000, help="size of the fixed training set")
    p.add_argument("--ae-steps", type=lambda v: [int(n) for n in v.split(",")],
                   default=[c["steps"] for c in AE_CYCLES], help="steps of each autoencoder cycle, comma-separated")
    p.add_argument("--ae-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=7000, help="diffusion training steps (0: stage 1 only)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the diffusion weights (0: keep the last weights)")
    p.add_argument("--snr-gamma", type=float, default=20, help="Min-SNR loss weighting with this gamma (0: plain loss)")
    p.add_argument("--p-uncond", type=float, default=0.2, help="caption dropout for classifier-free guidance")
    p.add_argument("--autoencoder", help="take the autoencoder from this checkpoint and skip stage 1 (or, with "
                   "--ae-skip, its first cycles)")
    p.add_argument("--ae-skip", type=int, help="with --autoencoder: the file holds this many stage-1 cycles; run the rest")
    p.add_argument("--snapshot-every", type=int, default=0, help="also save the model every N diffusion steps")
    p.add_argument("--snapshot", default="/tmp/shapes-snapshot.safetensors", help="where --snapshot-every saves")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate the averaged weights every N diffusion steps")
    p.add_argument("--no-update-config", action="store_true", help="leave the config's scale_factor alone")
    return p.parse_args(argv)


def save_model(model, path):
    """The full state dict in the original layout: weights as float16, schedule buffers float32."""
    sd = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point() and key not in SCHEDULE_BUFFERS:
            value = value.half()
        sd[key] = value.contiguous()
    sd["scale_factor"] = torch.tensor(model.scale_factor, dtype=torch.float32)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))


def update_config_scale(config, scale):
    text = Path(config).read_text()
    new, n = re.subn(r"(\n\s*scale_factor:\s*)[-+0-9.eE]+", lambda m: f"{m.group(1)}{scale:.5f}", text, count=1)
    if n != 1:
        raise SystemExit(f"no scale_factor line in {config}")
    Path(config).write_text(new)


def main(argv=None):
    args = parse_args(argv)
    if len(args.ae_steps) != len(AE_CYCLES):
        raise SystemExit(f"--ae-steps: give {len(AE_CYCLES)} comma-separated step counts, one per cycle")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    start = time.time()

    model = build_model(args.config, "cpu")
    images, _, scenes = shapes.make_dataset(args.images, seed=args.seed)
    print(f"dataset: {len(images)} images ({time.time() - start:.0f} s)")

    vae = model.first_stage_model
    done = 0
    if args.autoencoder:
        prefix = "first_stage_model."
        sd = {k[len(prefix):]: v.float() for k, v in read_state_dict(args.autoencoder).items() if k.startswith(prefix)}
        vae.load_state_dict(sd, strict=True)
        done = len(AE_CYCLES) if args.ae_skip is None else args.ae_skip
        print(f"autoencoder: from {args.autoencoder} ({done} cycles)")
    for cycle in range(done, len(AE_CYCLES)):
        c = AE_CYCLES[cycle]
        t = time.time()
        rec, kl = train.train_autoencoder(vae, images, args.ae_steps[cycle], args.ae_batch, c["lr"], seed=args.seed + cycle,
                                          init_logvar=-8.0 if cycle == 0 else None, fg_weight=c["fg_weight"])
        colour, shape = autoencoder_accuracy(vae)
        print(f"autoencoder cycle {cycle + 1}: {args.ae_steps[cycle]} steps, rec {rec:.4f}, "
              f"KL {kl:.0f}; held-out reconstructions: colour {colour:.3f}, shape {shape:.3f} ({time.time() - t:.0f} s)")
        # Round to the stored precision after each cycle, so that stage 2 sees the autoencoder
        # that is shipped, and `--autoencoder` with a snapshot reproduces the rest of this run.
        with torch.no_grad():
            for p in vae.parameters():
                p.copy_(p.half().float())
    vae.requires_grad_(False).eval()

    t = time.time()
    mean, std = train.encode_dataset(vae, images)
    del images
    model.scale_factor = train.latent_scale(mean, std, seed=args.seed)
    print(f"latents: {tuple(mean.shape)}, scale_factor {model.scale_factor:.5f} ({time.time() - t:.0f} s)")
    if args.snapshot_every:
        save_model(model, args.snapshot)

    if args.steps:
        t = time.time()
        def snapshot(step, ema):
            swap = ema.swap if ema is not None else (lambda: None)
            if args.snapshot_every and step % args.snapshot_every == 0:
                swap()
                save_model(model, args.snapshot)
                swap()
            if args.eval_every and step % args.eval_every == 0:
                swap()
                r = evaluate(model, "dpm_solver", 20, 7.5, n=48)
                swap()
                print(f"\nstep {step}: dpm_solver 20, 48 held-out prompts: colour {r.colour_accuracy:.3f}, "
                      f"shape {r.shape_accuracy:.3f}, background {r.background_accuracy:.3f}", flush=True)

        loss = train.train_diffusion(model, mean, std, scenes, args.steps, args.batch, args.lr, args.p_uncond,
                                     seed=args.seed, ema_decay=args.ema, snr_gamma=args.snr_gamma,
                                     callback=snapshot if args.snapshot_every or args.eval_every else None)
        print(f"diffusion: {args.steps} steps, loss {loss:.4f} ({time.time() - t:.0f} s)")

    save_model(model, args.out)
    if not args.no_update_config:
        update_config_scale(args.config, model.scale_factor)
    size = Path(args.out).stat().st_size / 2**20
    print(f"saved {args.out} ({size:.1f} MiB); total {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
