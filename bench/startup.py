"""Start-up: a whole process from its start to the first image written, ours against diffusers.

    python bench/startup.py [--ckpt bench/results/sd-v1-random.ckpt] [--repeats 3] [--threads 2]
    python bench/startup.py --checkouts /path/a /path/b   # our command from two source checkouts, and diffusers

Each repeat runs, one after the other (interleaved, warm page cache: the file is read once before):

- imports: `python -c "import ldm.cli, ldm.pipeline"` (what the command imports before it loads a model);
- ours: `python -m ldm.cli` on the checkpoint, 64x64, 1 DDIM step, one image, no grid, no safety
  checker (the reference loads none either), the invisible watermark on as by default;
- diffusers: the same work through diffusers' single-file loaders and a StableDiffusionPipeline
  (bench/run.py's `load_diffusers`), saving the PNG.

Wall-clock seconds of each process, minimum and median over the repeats, as JSON on the last line.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/stable-diffusion/v1-inference.yaml"

DIFFUSERS_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
sys.path.insert(0, {bench!r})
torch.set_num_threads({threads})
from run import load_diffusers, diffusers_image_fn
import argparse
unet, vae, text = load_diffusers({ckpt!r}, {config!r}, torch.device("cpu"), torch.float32)
image = diffusers_image_fn(unet, vae, text, argparse.Namespace(e2e_steps=1, e2e_size=64))(42)
image.save({out!r})
"""


def wall(cmd, cwd, env):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return took


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(ROOT / "bench/results/sd-v1-random.ckpt"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkouts", nargs="*", default=None,
                    help="source checkouts whose command to time side by side (default: this one)")
    ap.add_argument("--no-diffusers", action="store_true", help="leave diffusers out")
    args = ap.parse_args(argv)
    ckpt = Path(args.ckpt).resolve()
    if not ckpt.is_file():
        raise SystemExit(f"no checkpoint at {ckpt}: python bench/make_checkpoint.py writes one")
    with open(ckpt, "rb") as f:  # warm the page cache
        while f.read(1 << 26):
            pass
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    tmp = Path(tempfile.mkdtemp(prefix="startup-"))
    checkouts = [Path(c).resolve() for c in (args.checkouts or [ROOT])]
    sides = {}
    for c in checkouts:
        tag = c.name if len(checkouts) > 1 else "ours"
        sides[f"{tag} imports"] = ([sys.executable, "-c", "import ldm.cli, ldm.pipeline"], c)
        sides[tag] = ([sys.executable, "-m", "ldm.cli", "--ckpt", str(ckpt), "--config", CONFIG, "--H", "64", "--W", "64",
                       "--ddim_steps", "1", "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--no_safety_checker",
                       "--outdir", str(tmp / tag)], c)
    if not args.no_diffusers:
        script = DIFFUSERS_SCRIPT.format(root=str(ROOT), bench=str(ROOT / "bench"), threads=args.threads,
                                         ckpt=str(ckpt), config=str(ROOT / CONFIG), out=str(tmp / "diffusers.png"))
        sides["diffusers"] = ([sys.executable, "-c", script], ROOT)
    times = {name: [] for name in sides}
    for r in range(args.repeats):
        for name, (cmd, cwd) in sides.items():
            times[name].append(wall(cmd, cwd, env))
            print(f"repeat {r}: {name} {times[name][-1]:.2f} s", flush=True)
    summary = {name: {"min_s": round(min(v), 2), "median_s": round(statistics.median(v), 2)} for name, v in times.items()}
    for name, s in summary.items():
        print(f"{name:>24}: min {s['min_s']:.2f} s, median {s['median_s']:.2f} s")
    print(json.dumps({"command": "python bench/startup.py " + " ".join(argv or sys.argv[1:]),
                      "load_average": os.getloadavg(), "results": summary}))


if __name__ == "__main__":
    main()
