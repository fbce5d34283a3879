"""The `txt2img` command line: the original CompVis script's flags, over `ldm.pipeline`; and, with
`main(prog="img2img")`, the `img2img` one: the original img2img.py's flags and defaults, over
`ldm.img2img.Img2Img`, through the same settings, checks, outputs and launcher handling.

This module parses arguments, checks everything that can be checked before a model is loaded,
writes files, draws progress bars and prints; the generation itself is `ldm.pipeline.Txt2Img`.
Heavy imports (torch, the models) happen after parsing, so `--help` is instant. Nothing is
downloaded but the safety checker, once, on first use (unless HF_HUB_OFFLINE=1); Hugging Face
libraries are imported only when the safety checker needs them.

Where a setting comes from, highest first: a flag given on the command line, the image of
--from_png (its settings and the checkpoint found by its model hash), the --demo preset, the
defaults (`DEFAULTS`). The parser itself has no defaults (argparse.SUPPRESS), so what it returns
is exactly the flags given.

Exit status: 0 done, 1 error (one line `txt2img: error: ...` on stderr), 2 usage error, 130
interrupted, 143 terminated (SIGTERM) (the images already saved stay, and the grid of those is written).
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
from .paths import DEMO_CKPT, DEMO_CONFIG
from .signals import exit_status, interrupts

PROG = "txt2img"
NEGATIVE_MARK = "--negative_prompt"  # separates a line's prompt from its negative prompt in --from-file

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

# Every flag's value when nothing else sets it (argparse destinations).
DEFAULTS = {
    "prompt": DEFAULT_PROMPT, "negative_prompt": "", "from_file": None, "from_png": None, "no_emphasis": False,
    "sampler": None, "list_samplers": False, "plms": False, "dpm_solver": False, "ddim_steps": 50, "ddim_eta": None,
    "scale": 7.5, "seed": 42, "fixed_code": False, "n_iter": 2, "n_samples": 3, "batched": False,
    "H": None, "W": None, "C": 4, "f": 8, "repeat": 1,  # H, W: 768 for a v-prediction model, else 512
    "config": None, "parameterization": None, "bf16": False, "torchscript": False, "ipex": False,
    "ckpt": DEFAULT_CKPT, "demo": False, "use_ema": False, "device": None,
    "precision": "autocast", "threads": None, "compile": False, "cuda_graphs": False, "laion400m": False,
    "outdir": DEFAULT_OUTDIR, "skip_grid": False, "skip_save": False, "n_rows": 0, "resume": False,
    "save_intermediates": False,
    "safety_checker": None, "no_safety_checker": False, "nsfw": "black", "watermark": "StableDiffusionV1",
    "no_watermark": False, "verbose": False,
    "original_size": None, "crop_coords": None, "aesthetic_score": None,  # SDXL's size conditioning
    "vae": None, "refiner": None, "refiner_switch": 0.8,
    "hr_scale": None, "hr_steps": None, "hr_strength": 0.5, "hr_upscaler": "latent",  # the hires fix
    "init_img": None, "strength": None, "mask": None, "mask_blur": 4,  # img2img only
    "lora": [], "lora_dir": "models/Lora", "embeddings_dir": "models/embeddings", "clip_skip": 1,
}
IMG2IMG = "img2img"  # the `img2img` command: the same machinery, an init image instead of noise (ldm.img2img)
# img2img's defaults where the original img2img.py's differ from txt2img.py's
IMG2IMG_DEFAULTS = {**DEFAULTS, "strength": 0.75, "outdir": "outputs/img2img-samples", "n_iter": 1, "n_samples": 2,
                    "scale": 5.0}
DEMO_PRESET = {"config": DEMO_CONFIG, "ckpt": DEMO_CKPT, "H": 64, "W": 64}
SAMPLER_FLAGS = ("sampler", "plms", "dpm_solver")  # one choice: a layer that sets any of them replaces all three


class UsageError(Exception):
    pass


class RunError(Exception):
    """A failure in the middle of a run, with what was saved before it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, no usage dump: `txt2img: error: ...`, exit status 2."""
        raise UsageError(message)


def _pair(flag):
    """argparse type of "A,B" flags: two integers (ldm.conditioning.parse_pair), one-line errors."""

    def parse(text):
        from .conditioning import parse_pair

        try:
            return parse_pair(flag, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def defaults() -> dict:
    """The defaults of the command running: `DEFAULTS`, or `IMG2IMG_DEFAULTS`."""
    return IMG2IMG_DEFAULTS if PROG == IMG2IMG else DEFAULTS


def build_parser() -> argparse.ArgumentParser:
    """The flags, without defaults: parse_args returns only those given (see `DEFAULTS`)."""
    d = defaults()
    img2img = PROG == IMG2IMG
    p = _Parser(
        prog=PROG, allow_abbrev=False, argument_default=argparse.SUPPRESS,
        description=f"Stable Diffusion v1 and 2.x {'image-to-image' if img2img else 'text-to-image'}. Samples go to "
                    "OUTDIR/samples/NNNNN.png, grids to OUTDIR/grid-NNNN.png.",
        epilog="Image k of a run (in the order files are written) starts from the noise of seed + k: "
               "regenerate it alone with --seed <seed + k> --n_samples 1 --n_iter 1. "
               "Start with --demo to try the bundled demo model.",
    )
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", type=str, nargs="?", const=DEFAULT_PROMPT,
                   help=f"the prompt to render (default: {d['prompt']!r})")
    g.add_argument("--negative_prompt", type=str,
                   help="what the image should not show (the unconditional prompt of guidance)")
    g.add_argument("--from-file", dest="from_file", type=str, metavar="FILE",
                   help="UTF-8 file of prompts, one a line (blank lines skipped), batched by --n_samples; "
                        f"'PROMPT {NEGATIVE_MARK} NEGATIVE' gives a line its own negative prompt")
    g.add_argument("--from_png", type=str, metavar="FILE",
                   help="re-run the image FILE from its PNG metadata (prompt, seed, sampler, steps, scale, size), "
                        "with the checkpoint its model hash names (searched in the demo model, models/ and the "
                        "checkpoints hashed before); flags given explicitly still win")
    g.add_argument("--repeat", type=int,
                   help=f"with --from-file, render each prompt of the file this many times in a row (default {d['repeat']})")
    g.add_argument("--no_emphasis", action="store_true",
                   help="take prompts literally: no (word), [word], {word}, (word:1.3) weighting")

    if img2img:
        g.add_argument("--init-img", dest="init_img", type=str, metavar="FILE",
                       help="the image to rework; resized down to sides that are multiples of 32 (64 for the SD "
                            "UNets), LANCZOS, as the original")
        g.add_argument("--mask", type=str, metavar="FILE",
                       help="inpainting: repaint only where this image is white (resized to the init image's size)")
        g.add_argument("--mask_blur", type=int, metavar="N",
                       help=f"radius of the Gaussian blur that softens the mask's edge (default {d['mask_blur']})")
    g.add_argument("--lora", action="append", metavar="FILE[:MULT]",
                   help="apply this LoRA file to every image (multiplier default 1; repeatable); in a prompt, "
                        "<lora:NAME:MULT> or <lora:NAME:TE_MULT:UNET_MULT> applies NAME from --lora_dir")
    g.add_argument("--lora_dir", type=str, metavar="DIR",
                   help=f"where <lora:NAME:...> finds NAME.safetensors / .pt (default {d['lora_dir']})")
    g.add_argument("--embeddings_dir", type=str, metavar="DIR",
                   help="textual-inversion embeddings, used where their file name is a word of the prompt "
                        f"(default {d['embeddings_dir']})")
    g.add_argument("--clip_skip", type=int, metavar="N",
                   help="stop the text encoder N-1 layers before its last, as the web UIs (default 1; v1 models; "
                        "SD 2.x and SDXL fix their layers: 1 and 2 only)")

    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", type=str, metavar="NAME", help="sampler (default ddim); see --list_samplers")
    g.add_argument("--list_samplers", action="store_true", help="list the samplers and exit")
    g.add_argument("--plms", action="store_true", help="same as --sampler plms")
    g.add_argument("--dpm_solver", "--dpm", action="store_true", help="same as --sampler dpm_solver")
    g.add_argument("--ddim_steps", "--steps", type=int, help=f"number of sampling steps (default {d['ddim_steps']})")
    g.add_argument("--ddim_eta", type=float,
                   help="DDIM eta (default 0.0: deterministic), or the noise scale of the ancestral samplers (default 1.0)")
    g.add_argument("--scale", type=float,
                   help="classifier-free guidance scale: eps = eps(neg) + scale * (eps(prompt) - eps(neg)) "
                        f"(default {d['scale']})")
    g.add_argument("--seed", type=int, help=f"seed of image 0; image k uses seed + k (default {d['seed']})")
    g.add_argument("--fixed_code", action="store_true",
                   help="every batch reuses the start codes (seeds) of the first batch")
    g.add_argument("--n_iter", type=int, help=f"how many times to sample each batch (default {d['n_iter']})")
    g.add_argument("--n_samples", type=int,
                   help="batch size: images per prompt per iteration; with --from-file, prompts per batch "
                        f"(default {d['n_samples']})")
    g.add_argument("--batched", action="store_true",
                   help="sample the --n_samples images of a batch through the model together: faster on a GPU, but an "
                        "image then matches its regeneration alone only up to rounding (default: one at a time, exact)")
    if img2img:
        g.add_argument("--strength", type=float,
                       help="denoising strength in [0, 1]: the last int(strength x --ddim_steps) steps run from the "
                            f"init image noised to that level (default {d['strength']})")
    else:
        g.add_argument("--H", type=int,
                       help="image height in pixels (default 1024 for SDXL, 768 for v-prediction models, else 512)")
        g.add_argument("--W", type=int,
                       help="image width in pixels (default 1024 for SDXL, 768 for v-prediction models, else 512)")
        g.add_argument("--hr_scale", type=float, metavar="S",
                       help="hires fix: after the H x W pass, an img2img pass at S times the size (S >= 1)")
        g.add_argument("--hr_steps", type=int, help="hires fix: the second pass's steps (default --ddim_steps)")
        g.add_argument("--hr_strength", type=float,
                       help=f"hires fix: the second pass's denoising strength (default {d['hr_strength']})")
        g.add_argument("--hr_upscaler", choices=["latent", "lanczos"],
                       help="hires fix: upscale the latent (bilinear) or the decoded picture (LANCZOS, encoded "
                            f"again) (default {d['hr_upscaler']})")
    g.add_argument("--original_size", type=_pair("original_size"), metavar="H,W",
                   help="SDXL size conditioning: the original image size the model is told (default: --H,--W)")
    g.add_argument("--crop_coords", type=_pair("crop_coords"), metavar="TOP,LEFT",
                   help="SDXL size conditioning: the top-left crop coordinates the model is told (default 0,0)")
    g.add_argument("--aesthetic_score", type=float,
                   help="SDXL refiner conditioning: the aesthetic score of the prompt (default 6.0; the negative "
                        "prompt gets 2.5)")
    g.add_argument("--C", type=int, help=f"latent channels (default {d['C']})")
    g.add_argument("--f", type=int, help=f"downsampling factor of the autoencoder (default {d['f']})")

    g = p.add_argument_group("model and device")
    g.add_argument("--config", type=str,
                   help="model config YAML (default: chosen from the checkpoint: SD v1 -> "
                        f"{DEFAULT_CONFIG}, SD 2.x -> configs/stable-diffusion/v2-inference.yaml or v2-inference-v.yaml, "
                        "SDXL -> configs/sdxl/sd_xl_base.yaml or sd_xl_refiner.yaml)")
    g.add_argument("--parameterization", choices=["eps", "v"],
                   help="what the UNet predicts, overriding the config: eps (SD v1, SD 2.x 512-base) or v (SD 2.x "
                        "768-v); without it and without --config, an SD 2.x model is told apart by one UNet evaluation")
    g.add_argument("--ckpt", type=str, help=f"checkpoint, .ckpt or .safetensors (default {d['ckpt']})")
    g.add_argument("--demo", action="store_true",
                   help=f"the bundled demo model: --config {DEMO_CONFIG} --ckpt {DEMO_CKPT} --H 64 --W 64")
    g.add_argument("--use_ema", action="store_true", help="use the checkpoint's EMA weights of the UNet")
    g.add_argument("--vae", type=str,
                   help="a VAE file (.ckpt or .safetensors, original layout, bare or first_stage_model.* keys) whose "
                        "weights replace the checkpoint's autoencoder")
    g.add_argument("--refiner", type=str,
                   help="an SDXL refiner checkpoint that takes over the denoising at --refiner_switch (config detected)")
    g.add_argument("--refiner_switch", type=float,
                   help="fraction of the denoising done by --ckpt before --refiner takes over (default 0.8)")
    g.add_argument("--device", type=str, help="cpu, cuda, cuda:1, mps (default: the best available)")
    g.add_argument("--precision", type=str, choices=["full", "autocast", "half", "bf16"],
                   help="autocast: fp16 compute on CUDA, no-op elsewhere; half: fp16 weights on a GPU "
                        "(full precision on the CPU); bf16: bfloat16 weights (a GPU, or a CPU with bfloat16 support); "
                        f"full: float32 (default {d['precision']})")
    g.add_argument("--bf16", action="store_true", help="same as --precision bf16")
    g.add_argument("--torchscript", action="store_true", help="accepted for the Stability script's sake; not needed")
    g.add_argument("--ipex", action="store_true", help="accepted for the Stability script's sake; not needed")
    g.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads per operator (default: OMP_NUM_THREADS if set, else 1 for small models and "
                        "images, where threads only wait on each other, and every core for large ones)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: fused kernels, after a compile of tens of seconds at the first image")
    g.add_argument("--cuda_graphs", action="store_true",
                   help="on CUDA, replay each UNet step from a CUDA graph instead of launching its kernels one by one")
    g.add_argument("--laion400m", action="store_true", help="the original's LAION-400M model: not supported")

    g = p.add_argument_group("output")
    g.add_argument("--outdir", type=str, help=f"output folder (default {d['outdir']})")
    g.add_argument("--skip_grid", action="store_true", help="do not write the grid")
    g.add_argument("--skip_save", action="store_true", help="do not write the individual samples")
    g.add_argument("--n_rows", type=int, help="images per row of the grid (default: --n_samples)")
    g.add_argument("--resume", action="store_true",
                   help="finish an interrupted job: name samples by image index (OUTDIR/samples/<k>.png) and skip "
                        "the images whose file is already a valid PNG (implied naming under torchrun)")
    g.add_argument("--save_intermediates", action="store_true",
                   help="also write OUTDIR/intermediates/NNNNN.png per image: x_t (top) and predicted x_0 "
                        "(bottom) every few steps")

    g = p.add_argument_group("safety checker and watermark")
    g.add_argument("--safety_checker", type=str, metavar="DIR",
                   help="folder of a StableDiffusionSafetyChecker (save_pretrained); default: the Hugging Face "
                        "cache of CompVis/stable-diffusion-safety-checker, downloaded there once if missing")
    g.add_argument("--no_safety_checker", action="store_true", help="run without the safety checker")
    g.add_argument("--nsfw", choices=["black", "blur"], help=f"what replaces a flagged image (default {d['nsfw']})")
    g.add_argument("--watermark", type=str, help=f"invisible watermark text (default {d['watermark']})")
    g.add_argument("--no_watermark", action="store_true", help="do not watermark images")
    g.add_argument("-v", "--verbose", action="store_true", help="also print the library's informational messages")
    return p


def parse_explicit(argv) -> dict:
    """The flags given on the command line, as {destination: value} (UsageError when malformed)."""
    return vars(build_parser().parse_args(argv))


def merge_settings(*layers: dict) -> SimpleNamespace:
    """The layers' values, each layer over the ones before it (lowest first). The sampler flags are
    one choice: a layer that sets any of them replaces all three of the layers below."""
    out = {}
    for layer in layers:
        if any(k in layer for k in SAMPLER_FLAGS):
            out.update({k: defaults()[k] for k in SAMPLER_FLAGS})
        out.update(layer)
    return SimpleNamespace(**out)


def png_settings(path, explicit: dict) -> tuple[dict, dict]:
    """(settings layer, metadata) of --from_png: the image's prompt, seed, sampler, steps, scale,
    size and eta; one image (n_samples = n_iter = 1); and the checkpoint its model hash names,
    unless --ckpt was given (with the demo config for the demo model, else the default config)."""
    from . import hashing, metadata
    from .images import read_parameters
    from .paths import is_demo_checkpoint

    meta = metadata.options_from_parameters(read_parameters(path))
    names = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "ddim_steps", "scale": "scale",
             "seed": "seed", "H": "H", "W": "W", "eta": "ddim_eta", "sampler": "sampler",
             "original_size": "original_size", "crop_coords": "crop_coords", "aesthetic_score": "aesthetic_score",
             "clip_skip": "clip_skip"}
    names.update({k: k for k in ("strength",) if PROG == IMG2IMG})
    names.update({k: k for k in ("hr_scale", "hr_steps", "hr_strength", "hr_upscaler") if PROG != IMG2IMG})
    layer = {dest: meta[key] for key, dest in names.items() if key in meta}
    layer.update(no_emphasis=not meta["emphasis"], n_samples=1, n_iter=1)
    if meta.get("model_hash") and "ckpt" not in explicit:
        ckpt = hashing.find_checkpoint(meta["model_hash"], DEFAULT_CKPT)
        if ckpt is None:
            raise ValueError(f"{path} was made with the model {meta.get('model', '?')} (hash {meta['model_hash']}), "
                             f"found in none of {hashing.searched_places(DEFAULT_CKPT)}; pass --ckpt PATH")
        layer["ckpt"] = str(ckpt)
        layer["config"] = DEMO_CONFIG if is_demo_checkpoint(ckpt) else None  # None: detected from the checkpoint
    if meta.get("vae_hash") and "vae" not in explicit:  # a VAE that replaced the checkpoint's, found by its hash
        vae = hashing.find_checkpoint(meta["vae_hash"])
        if vae is None:
            raise ValueError(f"{path} was made with the VAE {meta.get('vae', '?')} (hash {meta['vae_hash']}), "
                             f"found in none of {hashing.searched_places()}; pass --vae FILE")
        layer["vae"] = str(vae)
    return layer, meta


def check_args(args):
    """Checks of the flags themselves that need no model (ValueError)."""
    if args.repeat <= 0:
        raise ValueError(f"--repeat must be a positive integer, got {args.repeat}")
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be a positive integer, got {args.threads}")
    if not args.no_watermark and not args.watermark:
        raise ValueError("--watermark needs a text; --no_watermark writes images without one")
    if args.from_png and args.from_file:
        raise ValueError("--from_png and --from-file cannot be combined")


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


def main(argv=None, prog: str = "txt2img") -> int:
    """The `txt2img` command line, or with prog="img2img" the `img2img` one."""
    global PROG
    PROG = prog
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        explicit = parse_explicit(argv)
    except UsageError as e:
        print(f"{PROG}: error: {one_line(e)} (see {PROG} --help)", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0

    # The hub is reached only to fetch a missing safety checker once (ldm.safety; HF_HUB_OFFLINE=1 forbids it):
    # every other Hugging Face load here is local_files_only.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    set_openmp_defaults()  # before torch is imported; a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins

    handler = _LogHandler(logging.INFO if explicit.get("verbose") else logging.WARNING)
    ldm_log = logging.getLogger("ldm")
    old_level = ldm_log.level
    ldm_log.addHandler(handler)
    ldm_log.setLevel(handler.level)
    threads_before = _torch_threads()
    try:
        with interrupts():  # SIGTERM as SIGINT; a second signal ends the process at once
            return _run(explicit)
    except KeyboardInterrupt as e:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return exit_status(e)
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
        if threads_before is not None:  # main() called in-process (tests) leaves the caller's thread count
            import torch

            torch.set_num_threads(threads_before)


def settle_args(explicit: dict) -> tuple[SimpleNamespace, dict | None]:
    """(the run's settings, the --from_png metadata or None): explicit flags over --from_png over
    --demo over the defaults."""
    if explicit.get("from_png") and explicit.get("from_file"):
        raise ValueError("--from_png and --from-file cannot be combined")
    layers = [defaults(), DEMO_PRESET if explicit.get("demo") else {}]
    png_meta = None
    if explicit.get("from_png"):
        png_layer, png_meta = png_settings(explicit["from_png"], explicit)
        layers.append(png_layer)
    layers.append(explicit)
    return merge_settings(*layers), png_meta


def _run(explicit: dict) -> int:
    if explicit.get("list_samplers"):
        from .samplers import SAMPLERS

        width = max(map(len, SAMPLERS))
        for name, s in SAMPLERS.items():
            print(f"{name:<{width}}  {s.description}")
        return 0
    if explicit.get("laion400m"):
        raise ValueError("--laion400m: the original's LAION-400M latent diffusion model is not supported; "
                         "this tool runs Stable Diffusion v1 checkpoints (--ckpt)")
    args, png_meta = settle_args(explicit)
    check_args(args)
    if args.torchscript or args.ipex:
        notice("--torchscript/--ipex: not needed: the UNet already runs through fused oneDNN kernels on the CPU "
               "(see --compile for torch.compile); continuing without them")
    if args.bf16:
        if "precision" in explicit and args.precision != "bf16":
            raise ValueError(f"--bf16 and --precision {args.precision} contradict each other")
        args.precision = "bf16"
    args.init_image = None
    if PROG == IMG2IMG:  # the size is the init image's (resized when the model is loaded)
        from .img2img import ORIGINAL_MULTIPLE, fit_size, read_init_image

        if not args.init_img:
            raise ValueError("img2img needs --init-img FILE: the image to rework")
        args.init_image = read_init_image(args.init_img)
        args.mask_image = read_init_image(args.mask, "--mask") if args.mask else None
        args.W, args.H = fit_size(args.init_image, ORIGINAL_MULTIPLE, f"--init-img {args.init_img}")[0].size
    args.auto_size = [name for name in ("H", "W") if getattr(args, name) is None]  # 768 for a v model, else 512
    for name in args.auto_size:
        setattr(args, name, 512)

    from . import checks, pipeline
    from .pipeline import Options

    opts = Options(sampler=resolve_sampler(args), steps=args.ddim_steps, scale=args.scale, eta=args.ddim_eta,
                   H=args.H, W=args.W, C=args.C, f=args.f, emphasis=not args.no_emphasis,
                   intermediates=args.save_intermediates, batched=args.batched, original_size=args.original_size,
                   crop_coords=args.crop_coords, aesthetic_score=args.aesthetic_score, strength=args.strength,
                   hr_scale=args.hr_scale, hr_steps=args.hr_steps, hr_strength=args.hr_strength,
                   hr_upscaler=args.hr_upscaler, clip_skip=args.clip_skip)
    checks.check_flags(args)  # finite, in range, a known device form: after --from_png filled in its values
    opts.validate()
    if args.from_file:
        prompts, negatives = read_prompt_file(args.from_file, args.negative_prompt)
        prompts = [p for p in prompts for _ in range(args.repeat)]
        negatives = [n for n in negatives for _ in range(args.repeat)]
        batches = pipeline.prompt_batches(prompts, negatives, args.n_samples, repeat=False)
    else:
        batches = pipeline.prompt_batches(args.prompt, args.negative_prompt, args.n_samples, repeat=True)
    plan = pipeline.plan_work(batches, args.n_iter, args.seed, args.fixed_code)
    checks.seeds_fit(args.seed, sum(len(items) for items in plan))

    config = pipeline.repo_path(args.config) if args.config else None  # None: detected from the checkpoint
    ckpt = pipeline.repo_path(args.ckpt)
    if args.demo and not ckpt.is_file():
        raise ValueError(f"the bundled demo model is not at {ckpt}: --demo needs a source checkout of txt2img")
    from .config import load_config

    if config is not None:
        load_config(config)  # a bad config fails here, before anything slow
    if not ckpt.exists():
        from .checkpoint import CheckpointError

        raise CheckpointError(pipeline.missing_checkpoint_message(ckpt))

    outdir = Path(args.outdir)
    dirs = SimpleNamespace(out=outdir, samples=outdir / "samples", inter=outdir / "intermediates")
    check_outdir(outdir, [outdir] + ([dirs.samples] if not args.skip_save else [])
                 + ([dirs.inter] if args.save_intermediates else []))

    # --- under a launcher: this rank's share of the work, named by global image index
    from .distributed import Job, world_from_env

    global _WORLD
    _WORLD = world = world_from_env(args.device)
    try:
        job = Job(plan, dirs.samples, args.resume, world, check_files=not args.skip_save) \
            if world.launched or args.resume else None
        error, pipe, load_s = None, None, 0.0
        try:
            pipe, load_s = _load(args, explicit, config, ckpt, opts, world, png_meta)
            pipe.extras.check([item for items in plan for item in items])  # every LoRA named, before any image
        except Exception as e:  # every rank learns that this one cannot start
            error = e
        _agree(world, error)
        return _generate(args, pipe, opts, job.plan if job else plan, dirs, load_s, world, job)
    finally:
        world.close()


def _load(args, explicit, config, ckpt, opts, world, png_meta):
    """The pipeline ready to run (safety checker first: a missing one fails before the model loads),
    with the CPU threads set; (pipe, seconds it took)."""
    from . import pipeline
    from .paths import is_demo_checkpoint

    device = pipeline.pick_device(str(world.device(args.device)) if world.launched else args.device)
    checker, checker_note = None, None
    if args.no_safety_checker:
        checker_note = "safety checker disabled (--no_safety_checker): images are written unchecked"
    elif is_demo_checkpoint(ckpt) and "safety_checker" not in explicit:
        checker_note = "safety checker: not needed for the bundled demo model (it only draws simple shapes)"
    else:
        from .safety import SafetyChecker

        checker = SafetyChecker.load(args.safety_checker, device)

    t0 = time.perf_counter()
    from .backends import BackendOptions

    backend = BackendOptions.from_env(cuda_graphs=args.cuda_graphs, compile=args.compile,
                                      prepack_latent_size=opts.latent_shape()[1:])
    cls = pipeline.Txt2Img
    if args.init_image is not None:
        from .img2img import Img2Img as cls
    pipe = cls.from_files(config, ckpt, device=device, precision=args.precision, use_ema=args.use_ema,
                                       safety_checker=checker, nsfw=args.nsfw, backend=backend,
                                       parameterization=args.parameterization, vae=args.vae, refiner=args.refiner,
                                       refiner_switch=args.refiner_switch, lora_dir=args.lora_dir,
                                       embeddings_dir=args.embeddings_dir, loras=_cli_loras(args.lora))
    if png_meta:
        pipe.extras.restore(png_meta.get("lora_hashes", {}), png_meta.get("ti_hashes", {}))
    if pipe.detection is not None:
        notice(pipe.detection.message)
    if args.init_image is None and type(pipe.model).__name__ == "LatentInpaintDiffusion":
        raise ValueError(f"{ckpt} is an inpainting checkpoint (9-channel UNet): run it with img2img --init-img FILE "
                         "--mask FILE")
    for name in args.auto_size:
        setattr(opts, name, pipe.default_size)
        setattr(args, name, pipe.default_size)
    if args.init_image is not None:
        notes = [pipe.set_init_image(args.init_image, f"--init-img {args.init_img}")]
        if args.mask_image is not None:
            notes.append(pipe.set_mask(args.mask_image, args.mask_blur, f"--mask {args.mask}"))
        for note in filter(None, notes):
            notice(note)
        opts.W, opts.H = args.W, args.H = pipe.init_image.size
    opts.validate(pipe.model)
    if device.type == "cpu":
        _set_threads(args.threads, pipe, opts)
    if checker_note:
        notice(checker_note)
    if png_meta and png_meta.get("model_hash") and pipe.model_hash \
            and png_meta["model_hash"].lower() != pipe.model_hash.lower():
        notice(f"{args.from_png} was made with model hash {png_meta['model_hash']} ({png_meta.get('model', '?')}); "
               f"this run uses {pipe.model_hash} ({pipe.model_name}): the image will differ")
    return pipe, time.perf_counter() - t0


def _cli_loras(specs) -> list[tuple[str, float]]:
    """--lora FILE[:MULT] flags -> [(file, multiplier)]."""
    from .lora import parse_cli_lora

    return [parse_cli_lora(spec) for spec in specs or []]


def _torch_threads():
    """torch's intra-op thread count when torch is already imported (main called in-process), else None."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def _set_threads(requested, pipe, opts):
    """--threads N; else OMP_NUM_THREADS when set (torch already follows it); else the rule of
    `ldm.devices.choose_threads` for this model and image size, up to torch's own count."""
    import torch

    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        return
    n = requested or pipe.threads_for(opts, torch.get_num_threads())
    torch.set_num_threads(n)
    logging.getLogger("ldm").info("%d CPU thread(s)", n)


_WORLD = None


def _rank_tag() -> str:
    return f" (rank {_WORLD.rank})" if _WORLD is not None and _WORLD.world_size > 1 else ""


def _agree(world, error):
    """Every rank (failed or not) reports its status in one collective, so a failure ends every
    rank at once under any launcher. Raises this rank's own error, or a RunError naming the first
    rank that failed; returns when every rank is fine."""
    failed = world.failures(error)
    if error is not None:
        raise error
    if failed:
        rank, message = failed[0]
        raise RunError(f"rank {rank} failed: {message}")


# ----------------------------------------------------------------------------- the run


class _Output:
    """Where a run's files go and how they are finished (watermark); counts what it wrote."""

    def __init__(self, args, dirs, job):
        from . import images as imagelib

        self.args, self.dirs, self.job = args, dirs, job
        self.samples = imagelib.NumberedFiles(dirs.samples, 5)
        self.intermediates = imagelib.NumberedFiles(dirs.inter, 5)
        self.grids = imagelib.NumberedFiles(dirs.out, 4, prefix="grid-")
        self.watermark = None if args.no_watermark else args.watermark
        self.warned_small = False
        self.done, self.written, self.flagged = [], [], []  # results, sample paths, flagged paths

    def finish(self, img):
        from . import images as imagelib

        if self.watermark is None:
            return img
        if not imagelib.watermark_fits(img):
            if not self.warned_small:
                notice(f"images smaller than 256x256 pixels ({img.size[0]}x{img.size[1]}) are written without the "
                       "invisible watermark (the watermark library needs at least 256x256)")
                self.warned_small = True
            return img
        return imagelib.put_watermark(img, self.watermark)

    def save(self, r):
        """One result's sample (and intermediates) files; reports a flagged image."""
        from . import images as imagelib

        path = None
        if not self.args.skip_save:
            if self.job:
                path = imagelib.save_png(self.finish(r.image), self.job.path(r.item), r.parameters)
            else:
                path = imagelib.save_numbered(self.finish(r.image), self.samples, r.parameters)
            self.written.append(path)
        if r.intermediates is not None:
            if self.job:
                target = self.dirs.inter / self.job.path(r.item).name
            else:
                target = self.dirs.inter / path.name if path else self.intermediates.claim()
            imagelib.save_png(r.intermediates, target, r.parameters)
        if r.nsfw:
            where = str(path) if path else f"image {r.item.index}"
            self.flagged.append(where)
            _write(f"{PROG}: flagged by the safety checker: {where} (seed {r.item.seed}), "
                   f"written as a {'black' if self.args.nsfw == 'black' else 'blurred'} image", sys.stdout)
        self.done.append(r)

    def saved_note(self) -> str:
        return f"{len(self.written)} image(s) saved in {self.dirs.samples}" if self.written else "no image saved"

    def grid(self, pictures):
        """The grid of `pictures` (unless --skip_grid or none); its path or None."""
        from . import images as imagelib

        if self.args.skip_grid or not pictures:
            return None
        grid = imagelib.make_grid(pictures, self.args.n_rows or self.args.n_samples)
        return imagelib.save_numbered(self.finish(grid), self.grids, None)


def _generate(args, pipe, opts, plan, dirs, load_s, world, job) -> int:
    """Sample this rank's plan, then (all ranks fine) gather the job's images on rank 0 for the grid
    and the summary. Ctrl-C: the grid of what finished, exit status 130."""
    output = _Output(args, dirs, job)
    timing = SimpleNamespace(sampling_s=0.0, steps_run=0)
    try:
        _sample_plan(pipe, opts, plan, output, timing, world)
    except KeyboardInterrupt as stop:
        grid_path = output.grid([r.image for r in output.done]) if not world.active else None
        grid_note = f"; grid of the finished images: {grid_path}" if grid_path else ""
        print(f"{PROG}: interrupted: {output.saved_note()}{grid_note}", file=sys.stderr)
        return exit_status(stop)

    n_written, flagged, sampling_s, steps_run = (len(output.written), output.flagged, timing.sampling_s,
                                                 timing.steps_run)
    pictures = [r.image for r in output.done]
    if job:  # the images of every rank, and those a --resume found, in index order
        from . import images as imagelib

        gathered = world.gather([(r.item.index, r.image) for r in output.done])
        stats = world.gather((n_written, flagged, sampling_s, steps_run))
        if not world.is_main:
            return 0
        pictures = [img for _, img in sorted([pair for part in gathered for pair in part]
                                             + [(item.index, imagelib.read_rgb(job.path(item)))
                                                for item in job.skipped])]
        n_written = sum(s[0] for s in stats)
        flagged = [f for s in stats for f in s[1]]
        sampling_s, steps_run = sum(s[2] for s in stats), sum(s[3] for s in stats)
    grid_path = output.grid(pictures)

    per_step = sampling_s / steps_run if steps_run else 0.0
    where = []
    if n_written:
        where.append(f"{n_written} sample(s) in {dirs.samples}")
    if grid_path:
        where.append(f"grid {grid_path}")
    summary = " and ".join(where) if where else "nothing written (--skip_save --skip_grid)"
    if job and job.skipped:
        summary += f" ({len(job.skipped)} already there, skipped)"
    flagged_note = f"; {len(flagged)} flagged by the safety checker" if flagged else ""
    print(f"Your samples are ready: {summary}{flagged_note}. "
          f"{per_step:.2f} s/step (model loaded in {load_s:.1f} s).")
    return 0


def _sample_plan(pipe, opts, plan, output, timing, world):
    """Every batch of `plan`, its files written as it finishes. Under a launcher, all ranks pass
    through the same number of rounds and report their status after each (`_agree`), so one rank's
    failure stops every rank at the end of its current batch."""
    from tqdm import tqdm

    rounds = world.max_over_ranks(len(plan))
    quiet = world.active and not world.is_main  # one set of progress bars per job
    with tqdm(total=sum(len(items) for items in plan), desc="images", unit="img", position=0,
              disable=quiet) as image_bar:
        for i in range(rounds):
            error = None
            if i < len(plan):
                try:
                    _sample_batch(pipe, opts, plan[i], output, timing, image_bar, quiet)
                except OSError as e:
                    error = RunError(f"{os_error_message(e)} ({output.saved_note()} before it)")
                except Exception as e:
                    error = e
            _agree(world, error)


def _sample_batch(pipe, opts, items, output, timing, image_bar, quiet):
    from tqdm import tqdm

    runs = pipe.sampler_runs(items, opts)
    with tqdm(total=pipe.steps_per_run(opts) * len(runs), desc="steps", unit="step", leave=False, position=1,
              disable=quiet) as step_bar:
        t0 = time.perf_counter()
        results = pipe.generate_batch(items, opts, callback=lambda i, x, x0: step_bar.update(1))
        timing.sampling_s += time.perf_counter() - t0
        timing.steps_run += pipe.steps_per_run(opts) * len(runs)
    for r in results:
        output.save(r)
        image_bar.update(1)


def img2img_main(argv=None) -> int:
    """The `img2img` console script."""
    return main(argv, prog=IMG2IMG)


if __name__ == "__main__":
    sys.exit(main())
