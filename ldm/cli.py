"""The `txt2img` command line: the original CompVis script's flags, over `ldm.pipeline`.

This module parses arguments, checks everything that can be checked before a model is loaded,
writes files, draws progress bars and prints; the generation itself is `ldm.pipeline.Txt2Img`.
Heavy imports (torch, the models) happen after parsing, so `--help` is instant. Nothing is
downloaded: Hugging Face libraries are put in offline mode before they are imported.

Exit status: 0 done, 1 error (one line `txt2img: error: ...` on stderr), 2 usage error, 130
interrupted (the images already saved stay, and the grid of those is written).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from .defaults import DEFAULT_CKPT, DEFAULT_CONFIG, DEFAULT_OUTDIR, DEFAULT_PROMPT, set_openmp_defaults

PROG = "txt2img"
NEGATIVE_MARK = "--negative_prompt"  # separates a line's prompt from its negative prompt in --from-file

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(Exception):
    pass


class RunError(Exception):
    """A failure in the middle of a run, with what was saved before it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, no usage dump: `txt2img: error: ...`, exit status 2."""
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG, allow_abbrev=False,
        description="Stable Diffusion v1 text-to-image. Samples go to OUTDIR/samples/NNNNN.png, "
                    "grids to OUTDIR/grid-NNNN.png.",
        epilog="Image k of a run (in the order files are written) starts from the noise of seed + k: "
               "regenerate it alone with --seed <seed + k> --n_samples 1 --n_iter 1. "
               "Start with --demo to try the bundled demo model.",
    )
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", type=str, default=DEFAULT_PROMPT, nargs="?", const=DEFAULT_PROMPT,
                   help="the prompt to render (default: %(default)r)")
    g.add_argument("--negative_prompt", type=str, default="",
                   help="what the image should not show (the unconditional prompt of guidance)")
    g.add_argument("--from-file", dest="from_file", type=str, default=None, metavar="FILE",
                   help="UTF-8 file of prompts, one a line (blank lines skipped), batched by --n_samples; "
                        f"'PROMPT {NEGATIVE_MARK} NEGATIVE' gives a line its own negative prompt")
    g.add_argument("--from_png", type=str, default=None, metavar="FILE",
                   help="re-run the image FILE from its PNG metadata (prompt, seed, sampler, steps, scale, size); "
                        "flags given explicitly still win")
    g.add_argument("--no_emphasis", action="store_true",
                   help="take prompts literally: no (word), [word], {word}, (word:1.3) weighting")

    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", type=str, default=None, metavar="NAME",
                   help="sampler (default ddim); see --list_samplers")
    g.add_argument("--list_samplers", action="store_true", help="list the samplers and exit")
    g.add_argument("--plms", action="store_true", help="same as --sampler plms")
    g.add_argument("--dpm_solver", action="store_true", help="same as --sampler dpm_solver")
    g.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps (default %(default)s)")
    g.add_argument("--ddim_eta", type=float, default=None,
                   help="DDIM eta (default 0.0: deterministic), or the noise scale of the ancestral samplers (default 1.0)")
    g.add_argument("--scale", type=float, default=7.5,
                   help="classifier-free guidance scale: eps = eps(neg) + scale * (eps(prompt) - eps(neg)) "
                        "(default %(default)s)")
    g.add_argument("--seed", type=int, default=42, help="seed of image 0; image k uses seed + k (default %(default)s)")
    g.add_argument("--fixed_code", action="store_true",
                   help="every batch reuses the start codes (seeds) of the first batch")
    g.add_argument("--n_iter", type=int, default=2, help="how many times to sample each batch (default %(default)s)")
    g.add_argument("--n_samples", type=int, default=3,
                   help="batch size: images per prompt per iteration; with --from-file, prompts per batch "
                        "(default %(default)s)")
    g.add_argument("--batched", action="store_true",
                   help="sample the --n_samples images of a batch through the model together: faster on a GPU, but an "
                        "image then matches its regeneration alone only up to rounding (default: one at a time, exact)")
    g.add_argument("--H", type=int, default=512, help="image height in pixels (default %(default)s)")
    g.add_argument("--W", type=int, default=512, help="image width in pixels (default %(default)s)")
    g.add_argument("--C", type=int, default=4, help="latent channels (default %(default)s)")
    g.add_argument("--f", type=int, default=8, help="downsampling factor of the autoencoder (default %(default)s)")

    g = p.add_argument_group("model and device")
    g.add_argument("--config", type=str, default=DEFAULT_CONFIG, help="model config YAML (default %(default)s)")
    g.add_argument("--ckpt", type=str, default=DEFAULT_CKPT, help="checkpoint, .ckpt or .safetensors (default %(default)s)")
    g.add_argument("--demo", action="store_true",
                   help="the bundled demo model: --config configs/demo/shapes.yaml "
                        "--ckpt models/demo/shapes.safetensors --H 64 --W 64")
    g.add_argument("--use_ema", action="store_true", help="use the checkpoint's EMA weights of the UNet")
    g.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    g.add_argument("--precision", type=str, choices=["full", "autocast", "half"], default="autocast",
                   help="autocast: fp16 compute on CUDA, no-op elsewhere; half: fp16 weights on a GPU "
                        "(full precision on the CPU); full: float32 (default %(default)s)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: fused kernels, after a compile of tens of seconds at the first image")
    g.add_argument("--cuda_graphs", action="store_true",
                   help="on CUDA, replay each UNet step from a CUDA graph instead of launching its kernels one by one")
    g.add_argument("--laion400m", action="store_true", help="the original's LAION-400M model: not supported")

    g = p.add_argument_group("output")
    g.add_argument("--outdir", type=str, default=DEFAULT_OUTDIR, help="output folder (default %(default)s)")
    g.add_argument("--skip_grid", action="store_true", help="do not write the grid")
    g.add_argument("--skip_save", action="store_true", help="do not write the individual samples")
    g.add_argument("--n_rows", type=int, default=0, help="images per row of the grid (default: --n_samples)")
    g.add_argument("--resume", action="store_true",
                   help="finish an interrupted job: name samples by image index (OUTDIR/samples/<k>.png) and skip "
                        "the images whose file is already a valid PNG (implied naming under torchrun)")
    g.add_argument("--save_intermediates", action="store_true",
                   help="also write OUTDIR/intermediates/NNNNN.png per image: x_t (top) and predicted x_0 "
                        "(bottom) every few steps")

    g = p.add_argument_group("safety checker and watermark")
    g.add_argument("--safety_checker", type=str, default=None, metavar="DIR",
                   help="folder of a StableDiffusionSafetyChecker (save_pretrained); default: the local Hugging Face "
                        "cache of CompVis/stable-diffusion-safety-checker")
    g.add_argument("--no_safety_checker", action="store_true", help="run without the safety checker")
    g.add_argument("--nsfw", choices=["black", "blur"], default="black",
                   help="what replaces a flagged image (default %(default)s)")
    g.add_argument("--watermark", type=str, default="StableDiffusionV1",
                   help="invisible watermark text (default %(default)s)")
    g.add_argument("--no_watermark", action="store_true", help="do not watermark images")
    g.add_argument("-v", "--verbose", action="store_true", help="also print the library's informational messages")
    return p


def explicit_flags(argv) -> set[str]:
    """The destinations of the flags given on the command line (to let them win over --demo/--from_png)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------- messages


def notice(message: str):
    _write(f"{PROG}: {message}", sys.stderr)


def _write(line: str, stream):
    try:
        from tqdm import tqdm

        tqdm.write(line, file=stream)
    except ImportError:
        print(line, file=stream)


def one_line(message) -> str:
    return " ".join(str(message).split())


def os_error_message(e: OSError) -> str:
    where = f": {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"disk full{where}"
    return f"{e.strerror or e}{where}"


class _LogHandler(logging.Handler):
    def emit(self, record):
        notice(one_line(record.getMessage()))


# ----------------------------------------------------------------------------- inputs


def read_prompt_file(path, default_negative: str) -> tuple[list[str], list[str]]:
    """Prompts and negative prompts of a --from-file: UTF-8, one prompt a line, blank lines skipped;
    'PROMPT --negative_prompt NEGATIVE' sets a line's own negative prompt."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read --from-file {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"--from-file {path} is not UTF-8 text (line {line})") from None
    prompts, negatives = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        prompt, mark, negative = line.partition(NEGATIVE_MARK)
        prompts.append(prompt.strip())
        negatives.append(negative.strip() if mark else default_negative)
    if not prompts:
        raise ValueError(f"--from-file {path} holds no prompts (only blank lines)")
    return prompts, negatives


def resolve_sampler(args) -> str:
    chosen = [name for name, on in (("plms", args.plms), ("dpm_solver", args.dpm_solver)) if on]
    if args.sampler:
        chosen.append(args.sampler)
    if len(set(chosen)) > 1:
        raise ValueError(f"choose one sampler: {', '.join(chosen)} given")
    return chosen[0] if chosen else "ddim"


def check_outdir(outdir: Path, folders):
    """Create the output folders and prove they take files, before any model is loaded."""
    import tempfile

    try:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
    except OSError as e:
        raise ValueError(f"cannot write to --outdir {outdir}: {os_error_message(e)}") from None


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        given = explicit_flags(argv)
    except UsageError as e:
        print(f"{PROG}: error: {one_line(e)} (see {PROG} --help)", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub, whatever gets imported
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    set_openmp_defaults()  # before torch is imported; a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins

    handler = _LogHandler(logging.INFO if args.verbose else logging.WARNING)
    ldm_log = logging.getLogger("ldm")
    old_level = ldm_log.level
    ldm_log.addHandler(handler)
    ldm_log.setLevel(handler.level)
    try:
        return _run(args, given)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        print(f"{PROG}: error{_rank_tag()}: {one_line(os_error_message(e))}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:
        from .checkpoint import CheckpointError
        from .config import ConfigError
        from .safety import SafetyCheckerError

        if isinstance(e, (ConfigError, CheckpointError, SafetyCheckerError, ValueError, RunError)):
            print(f"{PROG}: error{_rank_tag()}: {one_line(e)}", file=sys.stderr)
            return EXIT_ERROR
        raise
    finally:
        ldm_log.removeHandler(handler)
        ldm_log.setLevel(old_level)


def _run(args, given) -> int:
    from .samplers import SAMPLERS

    if args.list_samplers:
        width = max(map(len, SAMPLERS))
        for name, s in SAMPLERS.items():
            print(f"{name:<{width}}  {s.description}")
        return 0
    if args.laion400m:
        raise ValueError("--laion400m: the original's LAION-400M latent diffusion model is not supported; "
                         "this tool runs Stable Diffusion v1 checkpoints (--ckpt)")
    if args.from_png and args.from_file:
        raise ValueError("--from_png and --from-file cannot be combined")

    from . import pipeline
    from .backends import BackendOptions
    from .pipeline import Options, Txt2Img

    # --- what to run: flags, then --demo and --from_png where the flags were not given explicitly
    if args.demo:
        for dest, value in (("config", pipeline.DEMO_CONFIG), ("ckpt", pipeline.DEMO_CKPT), ("H", 64), ("W", 64)):
            if dest not in given:
                setattr(args, dest, value)
    sampler = resolve_sampler(args)
    negative = args.negative_prompt
    png_meta = None
    if args.from_png:
        from .images import read_parameters

        png_meta = pipeline.options_from_parameters(read_parameters(args.from_png))
        explicit_sampler = given & {"sampler", "plms", "dpm_solver"}
        overrides = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "ddim_steps", "scale": "scale",
                     "seed": "seed", "H": "H", "W": "W", "eta": "ddim_eta"}
        for key, dest in overrides.items():
            if key in png_meta and dest not in given:
                setattr(args, dest, png_meta[key])
        negative = args.negative_prompt
        if "sampler" in png_meta and not explicit_sampler:
            sampler = png_meta["sampler"]
        if "no_emphasis" not in given:
            args.no_emphasis = not png_meta["emphasis"]
        for dest in ("n_samples", "n_iter"):
            if dest not in given:
                setattr(args, dest, 1)

    opts = Options(sampler=sampler, steps=args.ddim_steps, scale=args.scale, eta=args.ddim_eta, H=args.H, W=args.W,
                   C=args.C, f=args.f, emphasis=not args.no_emphasis, intermediates=args.save_intermediates,
                   batched=args.batched)
    opts.validate()
    for name in ("n_samples", "n_iter"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.n_rows < 0:
        raise ValueError(f"--n_rows must not be negative, got {args.n_rows}")
    if not args.no_watermark and not args.watermark:
        raise ValueError("--watermark needs a text; --no_watermark writes images without one")

    if args.from_file:
        prompts, negatives = read_prompt_file(args.from_file, negative)
        batches = pipeline.prompt_batches(prompts, negatives, args.n_samples, repeat=False)
    else:
        batches = pipeline.prompt_batches(args.prompt, negative, args.n_samples, repeat=True)
    plan = pipeline.plan_work(batches, args.n_iter, args.seed, args.fixed_code)

    config, ckpt = pipeline.repo_path(args.config), pipeline.repo_path(args.ckpt)
    if args.demo and not ckpt.is_file():
        raise ValueError(f"the bundled demo model is not at {ckpt}: --demo needs a source checkout of txt2img")
    from .config import load_config

    load_config(config)  # a bad config fails here, before anything slow
    if not ckpt.exists():
        from .checkpoint import CheckpointError

        raise CheckpointError(pipeline.missing_checkpoint_message(ckpt))

    outdir = Path(args.outdir)
    sample_dir, inter_dir = outdir / "samples", outdir / "intermediates"
    check_outdir(outdir, [outdir] + ([sample_dir] if not args.skip_save else [])
                 + ([inter_dir] if args.save_intermediates else []))

    # --- under torchrun: this rank's share of the work, named by global image index
    from .distributed import Job, world_from_env

    global _WORLD
    _WORLD = world = world_from_env(args.device)
    job = None
    if world.launched or args.resume:
        job = Job(plan, sample_dir, args.resume, world, check_files=not args.skip_save)

    # --- the safety checker first: a missing one fails fast, before the model loads
    device = pipeline.pick_device(str(world.device(args.device)) if world.launched else args.device)
    checker, checker_note = None, None
    if args.no_safety_checker:
        checker_note = "safety checker disabled (--no_safety_checker): images are written unchecked"
    elif args.demo and not given & {"ckpt", "safety_checker"}:
        checker_note = "safety checker: not needed for the bundled demo model (it only draws simple shapes)"
    else:
        from .safety import SafetyChecker

        checker = SafetyChecker.load(args.safety_checker, device)

    t0 = time.perf_counter()
    pipe = Txt2Img.from_files(config, ckpt, device=device, precision=args.precision, use_ema=args.use_ema,
                              safety_checker=checker, nsfw=args.nsfw,
                              backend=BackendOptions.from_env(cuda_graphs=args.cuda_graphs, compile=args.compile,
                                                              prepack_latent_size=opts.latent_shape()[1:]))
    opts.validate(pipe.model)
    if checker_note:
        notice(checker_note)
    if png_meta and png_meta.get("model_hash") and pipe.model_hash and png_meta["model_hash"] != pipe.model_hash:
        notice(f"{args.from_png} was made with model hash {png_meta['model_hash']} ({png_meta.get('model', '?')}); "
               f"this run uses {pipe.model_hash} ({pipe.model_name}): the image will differ")
    load_s = time.perf_counter() - t0
    try:
        return _generate(args, pipe, opts, plan, outdir, sample_dir, inter_dir, load_s, job)
    finally:
        world.close()


_WORLD = None


def _rank_tag() -> str:
    return f" (rank {_WORLD.rank})" if _WORLD is not None and _WORLD.world_size > 1 else ""


def _generate(args, pipe, opts, plan, outdir, sample_dir, inter_dir, load_s, job=None) -> int:
    from tqdm import tqdm

    from . import images as imagelib

    world = job.world if job else None
    if job:
        plan = job.plan
    samples = imagelib.NumberedFiles(sample_dir, 5)
    intermediates = imagelib.NumberedFiles(inter_dir, 5)
    grids = imagelib.NumberedFiles(outdir, 4, prefix="grid-")
    watermark = None if args.no_watermark else args.watermark
    warned_small = False

    def finish(img):
        nonlocal warned_small
        if watermark is None:
            return img
        if not imagelib.watermark_fits(img):
            if not warned_small:
                notice(f"images smaller than 256x256 pixels ({img.size[0]}x{img.size[1]}) are written without the "
                       "invisible watermark (the watermark library needs at least 256x256)")
                warned_small = True
            return img
        return imagelib.put_watermark(img, watermark)

    done, written, flagged = [], [], []
    sampling_s, steps_run = 0.0, 0
    n_images = sum(len(items) for items in plan)
    status = EXIT_INTERRUPTED
    try:
        quiet = world is not None and not world.is_main  # one set of progress bars per job
        with tqdm(total=n_images, desc="images", unit="img", position=0, disable=quiet) as image_bar:
            for items in plan:
                runs = pipe.sampler_runs(items, opts)
                with tqdm(total=opts.steps * len(runs), desc="steps", unit="step", leave=False, position=1,
                          disable=quiet) as step_bar:
                    t0 = time.perf_counter()
                    results = pipe.generate_batch(items, opts, callback=lambda i, x, x0: step_bar.update(1))
                    sampling_s += time.perf_counter() - t0
                    steps_run += opts.steps * len(runs)
                for r in results:
                    path = None
                    if not args.skip_save:
                        if job:
                            path = imagelib.save_png(finish(r.image), job.path(r.item), r.parameters)
                        else:
                            path = imagelib.save_numbered(finish(r.image), samples, r.parameters)
                        written.append(path)
                    if r.intermediates is not None:
                        if job:
                            target = inter_dir / job.path(r.item).name
                        else:
                            target = inter_dir / path.name if path else intermediates.claim()
                        imagelib.save_png(r.intermediates, target, r.parameters)
                    if r.nsfw:
                        where = str(path) if path else f"image {r.item.index}"
                        flagged.append(where)
                        _write(f"{PROG}: flagged by the safety checker: {where} (seed {r.item.seed}), "
                               f"written as a {'black' if args.nsfw == 'black' else 'blurred'} image", sys.stdout)
                    done.append(r)
                    image_bar.update(1)
        status = 0
    except OSError as e:
        saved = f"{len(written)} image(s) saved in {sample_dir} before it" if written else "no image saved"
        raise RunError(f"{os_error_message(e)} ({saved})") from None
    finally:
        # on success or Ctrl-C, the grid of what finished; after any other error, nothing more
        grid_path = None
        interrupted = sys.exc_info()[0] is KeyboardInterrupt
        if job and status == 0:  # the images of every rank, and those a --resume found, in index order
            gathered = world.gather([(r.item.index, r.image) for r in done])
            stats = world.gather((len(written), flagged, sampling_s, steps_run))
            if not world.is_main:
                return 0
            pictures = sorted([pair for part in gathered for pair in part]
                              + [(item.index, imagelib.read_rgb(job.path(item))) for item in job.skipped])
            done = [SimpleNamespace(image=img) for _, img in pictures]
            written = [None] * sum(n for n, *_ in stats)
            flagged = [f for _, part, *_ in stats for f in part]
            sampling_s, steps_run = sum(s[2] for s in stats), sum(s[3] for s in stats)
        if (status == 0 or (interrupted and not (world and world.active))) and done and not args.skip_grid:
            n_rows = args.n_rows or args.n_samples
            grid = imagelib.make_grid([r.image for r in done], n_rows)
            grid_path = imagelib.save_numbered(finish(grid), grids, None)
        if interrupted:
            saved = f"{len(written)} image(s) saved in {sample_dir}" if written else "no image saved"
            grid_note = f"; grid of the finished images: {grid_path}" if grid_path else ""
            print(f"{PROG}: interrupted: {saved}{grid_note}", file=sys.stderr)
            return EXIT_INTERRUPTED  # noqa: B012 (the interrupt is reported, not re-raised)

    per_step = sampling_s / steps_run if steps_run else 0.0
    where = []
    if written:
        where.append(f"{len(written)} sample(s) in {sample_dir}")
    if grid_path:
        where.append(f"grid {grid_path}")
    summary = " and ".join(where) if where else "nothing written (--skip_save --skip_grid)"
    if job and job.skipped:
        summary += f" ({len(job.skipped)} already there, skipped)"
    flagged_note = f"; {len(flagged)} flagged by the safety checker" if flagged else ""
    print(f"Your samples are ready: {summary}{flagged_note}. "
          f"{per_step:.2f} s/step (model loaded in {load_s:.1f} s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
