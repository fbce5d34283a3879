"""Text to image as a library: what the `txt2img` command line runs, callable from Python.

    from ldm.pipeline import Txt2Img
    pipe = Txt2Img.from_files("configs/stable-diffusion/v1-inference.yaml", "models/ldm/stable-diffusion-v1/model.ckpt")
    results = pipe("a watercolor fox", negative_prompt="blurry", steps=30, seed=7, n_samples=2, n_iter=1)
    results[0].image.save("fox.png")      # PIL image
    print(results[0].parameters)          # the PNG `parameters` text (prompt, seed, sampler, ...)

A run is planned up front as a list of batches of work items (prompt, negative prompt, image index
k, seed), and `generate_batch` turns one batch of items into images; nothing else carries state
from one batch to the next, so the items of a run can be split among processes.

Reproducibility: image k of a run starts from
`torch.randn([C, H/f, W/f], generator=torch.Generator("cpu").manual_seed(seed + k))` moved to
the device (with `fixed_code`, the items of every batch reuse the seeds of the first batch);
stochastic samplers draw their step noise from a CPU generator seeded with that same number. Images
are sampled one at a time (unless `batched=True`), so an image depends only on its own work item:
regenerated alone from its seed it is bit-identical on the same machine, and CPU and GPU runs start
from the same noise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from . import images as imagelib
from .backends import BackendOptions, fans_out, optimize
from .checkpoint import CheckpointError, load_model
from .config import load_config
from .defaults import DEFAULT_CKPT, DEFAULT_CONFIG, DEFAULT_PROMPT
from .prompt import encode_weighted, pad_chunks, tokenize_weighted
from .samplers import cfg_denoiser, get_sampler
from .samplers import sample as run_sampler

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = "configs/demo/shapes.yaml"
DEMO_CKPT = "models/demo/shapes.safetensors"
PRECISIONS = ("full", "autocast", "half")

# Registry name -> the name the AUTOMATIC1111 web UI writes in its `parameters` text, where it has one.
WEBUI_SAMPLER_NAMES = {
    "ddim": "DDIM", "plms": "PLMS", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M", "lms_karras": "LMS Karras", "dpmpp_2m_karras": "DPM++ 2M Karras",
}


# ----------------------------------------------------------------------------- files and devices


def repo_path(path) -> Path:
    """`path` as given when it exists (relative to the working directory); else, when relative,
    the same path in the source checkout this package runs from, so defaults work from any cwd."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    in_repo = REPO_ROOT / path
    return in_repo if in_repo.exists() else path


def missing_checkpoint_message(path) -> str:
    return (
        f"checkpoint not found: {path}. Stable Diffusion v1 weights (e.g. sd-v1-4.ckpt from "
        "huggingface.co/CompVis/stable-diffusion-v-1-4-original or v1-5-pruned-emaonly.safetensors from "
        f"huggingface.co/runwayml/stable-diffusion-v1-5) go to {DEFAULT_CKPT}, or pass --ckpt PATH; "
        "--demo runs the bundled demo model"
    )


def checkpoint_hash(path) -> str:
    """First 10 hex digits of the file's sha256, the web UI's "Model hash".

    Hashing a 4 GB checkpoint takes seconds, so the result is cached in
    $XDG_CACHE_HOME/txt2img/model-hashes.json (default ~/.cache), keyed by path, size and mtime.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "txt2img" / "model-hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), str):
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    value = digest.hexdigest()[:10]
    try:  # a cache we cannot write is only slower next time
        cache = cache if isinstance(cache, dict) else {}
        cache[key] = value
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return value


def pick_device(name: str | None = None) -> torch.device:
    """The named device, or the best available: cuda > mps > cpu."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine")
        if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {name!r}: Apple MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(device: torch.device, precision: str) -> tuple[torch.dtype, bool, str | None]:
    """(weight dtype, use CUDA fp16 autocast, notice) for a device and a --precision choice.

    full: float32 everywhere. autocast: fp32 weights with torch.autocast(fp16) on CUDA; elsewhere
    it does not help, so it is float32 (a no-op). half: fp16 weights on a GPU (CUDA, MPS); on the
    CPU, where fp16 is slow or unsupported, it falls back to float32 with a notice.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "half":
        if device.type == "cpu":
            return torch.float32, False, "--precision half: fp16 weights need a GPU; running in full precision on the CPU"
        return torch.float16, False, None
    return torch.float32, precision == "autocast" and device.type == "cuda", None


# ----------------------------------------------------------------------------- the plan of a run


@dataclass(frozen=True)
class WorkItem:
    """One image of a run: its prompts, its index k in the run (the order files are written) and
    its seed (seed + k, or with fixed_code the seed of the same position in the first batch)."""

    index: int
    prompt: str
    negative_prompt: str
    seed: int


def prompt_batches(prompts, negative_prompts, n_samples: int, repeat: bool) -> list[list[tuple[str, str]]]:
    """The (prompt, negative) pairs of one iteration, in batches of at most n_samples.

    repeat=True (a single --prompt): one batch of n_samples copies of each prompt. repeat=False
    (--from-file): the prompts in order, n_samples per batch, the last batch possibly smaller.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if negative_prompts is None or isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts or ""] * len(prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    if not prompts:
        raise ValueError("no prompts")
    pairs = list(zip(prompts, negative_prompts))
    if repeat:
        return [[pair] * n_samples for pair in pairs]
    return [pairs[i:i + n_samples] for i in range(0, len(pairs), n_samples)]


def plan_work(batches: list[list[tuple[str, str]]], n_iter: int, seed: int,
              fixed_code: bool = False) -> list[list[WorkItem]]:
    """All work items of a run, batch by batch: n_iter passes over `batches`, image index k counting
    up in that order. With fixed_code, position i of every batch gets the seed of position i of
    the first batch (the original reused one start code tensor for all batches)."""
    plan, k = [], 0
    for _ in range(n_iter):
        for batch in batches:
            items = []
            for i, (prompt, negative) in enumerate(batch):
                items.append(WorkItem(k, prompt, negative, seed + (i if fixed_code else k)))
                k += 1
            plan.append(items)
    return plan


def start_code(item_seed: int, shape) -> torch.Tensor:
    """The start noise of one image: [C, H/f, W/f] from a CPU generator seeded with item_seed."""
    return torch.randn(list(shape), generator=torch.Generator("cpu").manual_seed(item_seed))


# ----------------------------------------------------------------------------- options and results


@dataclass
class Options:
    """How to sample, shared by every batch of a run (the command line's flags of the same names)."""

    sampler: str = "ddim"
    steps: int = 50
    scale: float = 7.5
    eta: float | None = None  # None: the sampler's default (DDIM 0, euler_a 1)
    H: int = 512
    W: int = 512
    C: int = 4
    f: int = 8
    emphasis: bool = True
    intermediates: bool = False  # also return a strip of x_t / predicted x_0 every few steps
    # Sample the images of a batch through the model together: faster on a GPU, but convolution
    # kernels chosen by batch size make an image differ from its regeneration alone in rounding.
    # False (the default) runs them one at a time, so an image depends only on its own item.
    batched: bool = False

    def validate(self, model=None):
        """ValueError for anything a run cannot do; with a model, also its latent channels and factor."""
        sampler = get_sampler(self.sampler)
        for name, flag in (("steps", "ddim_steps"), ("H", "H"), ("W", "W"), ("C", "C"), ("f", "f")):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{flag} must be a positive integer, got {value}")
        if self.steps > 1000:
            raise ValueError(f"--ddim_steps must be at most 1000 (the model's training steps), got {self.steps}")
        for name in ("H", "W"):
            if getattr(self, name) % self.f:
                raise ValueError(f"--{name} must be a multiple of --f ({self.f}), got {getattr(self, name)}")
        if self.eta is not None and self.eta < 0:
            raise ValueError(f"--ddim_eta must not be negative, got {self.eta}")
        if self.eta and not sampler.stochastic and sampler.name != "ddim":
            raise ValueError(f"sampler {sampler.name!r} is deterministic: "
                             "--ddim_eta applies to ddim and the ancestral samplers")
        if model is not None:
            if self.C != model.channels:
                raise ValueError(f"--C {self.C}: this model has {model.channels} latent channels")
            f = latent_factor(model)
            if self.f != f:
                raise ValueError(f"--f {self.f}: this model's autoencoder downsamples by {f}")
            multiple = f * model.model.diffusion_model.downsample_factor
            for name in ("H", "W"):
                if getattr(self, name) % multiple:
                    raise ValueError(f"--{name} must be a multiple of {multiple} for this model "
                                     f"(--f {f} x the UNet's {multiple // f}), got {getattr(self, name)}")

    @property
    def stochastic(self) -> bool:
        sampler = get_sampler(self.sampler)
        return sampler.stochastic if sampler.name != "ddim" else bool(self.eta)

    def latent_shape(self):
        return (self.C, self.H // self.f, self.W // self.f)


def latent_factor(model) -> int:
    """The autoencoder's downsampling factor: 2 per upsampling level of its decoder."""
    return 2 ** sum(1 for level in model.first_stage_model.decoder.up if hasattr(level, "upsample"))


@dataclass
class Result:
    """One generated image and what made it."""

    item: WorkItem
    image: Image.Image  # the replacement when the safety checker flagged it
    parameters: str  # the PNG `parameters` text
    nsfw: bool = False  # flagged by the safety checker
    intermediates: Image.Image | None = None  # x_t (top) and predicted x_0 (bottom) every few steps
    settings: dict = field(default_factory=dict)  # the settings line as a dict (Steps, Sampler, Seed, ...)


# ----------------------------------------------------------------------------- the pipeline


class Txt2Img:
    """A loaded model on a device with a precision; call it (or `generate_batch`) to make images.

    The model goes through `ldm.backends.optimize` with `backend` (default `BackendOptions()`; the
    command line passes `BackendOptions.from_env()`): that pass is the only change made to it.
    `cuda_graphs=True` replays the UNet from CUDA graphs on CUDA (one capture per input shape);
    `compile=True` puts it through torch.compile. Both are opt-in until a GPU benchmark shows they
    pay (see bench/README.md).

    `safety_checker` (an `ldm.safety.SafetyChecker`, or None for none) checks every image; a
    flagged one is replaced as `nsfw` says ("black" or "blur") and marked in its Result. The
    command line always loads one unless told not to; a Python caller passes it explicitly.
    Watermarking happens when files are written (`ldm.images.put_watermark`), not here.
    """

    def __init__(self, model, device="cpu", precision="autocast", model_name="model", model_hash=None,
                 safety_checker=None, nsfw="black", cuda_graphs=False, compile=False, backend=None):
        self.device = torch.device(device)
        self.dtype, self.autocast, notice = resolve_precision(self.device, precision)
        if notice:
            log.warning(notice)
        if model.dtype != self.dtype:  # the weights only: the schedule buffers stay float32
            for part in (model.model, model.first_stage_model, model.cond_stage_model):
                part.to(self.dtype)
        backend = backend or BackendOptions()
        backend = backend.replace(cuda_graphs=backend.cuda_graphs or cuda_graphs, compile=backend.compile or compile)
        self.model = optimize(model.to(self.device), backend)
        self.unet = self.model.apply_model  # the denoiser as the samplers call it
        self.model_name = model_name
        self.model_hash = model_hash
        self.safety_checker = safety_checker
        self.nsfw = nsfw
        self._chunks = {}  # (text, emphasis) -> PromptChunks
        self._embeddings = {}  # (text, emphasis, n_chunks) -> (1, 77 * n_chunks, D) on the device

    @classmethod
    def from_files(cls, config=DEFAULT_CONFIG, ckpt=DEFAULT_CKPT, device=None, precision="autocast", use_ema=False,
                   hash_model=True, **kwargs) -> Txt2Img:
        """Load the model of `config` with the weights of `ckpt` (local files only, nothing downloaded)."""
        device = pick_device(device)
        dtype, _, _ = resolve_precision(device, precision)
        config, ckpt = repo_path(config), repo_path(ckpt)
        config_dict = load_config(config)
        if not ckpt.is_file():
            raise CheckpointError(missing_checkpoint_message(ckpt) if not ckpt.exists()
                                  else f"checkpoint {ckpt} is not a file")
        if not os.access(ckpt, os.R_OK):
            raise CheckpointError(f"cannot read checkpoint {ckpt}: permission denied")
        t0 = time.perf_counter()
        model = load_model(config_dict, ckpt, device=device, dtype=dtype, use_ema=use_ema)
        log.info("loaded %s in %.1f s", ckpt, time.perf_counter() - t0)
        model_hash = checkpoint_hash(ckpt) if hash_model else None
        return cls(model, device, precision, model_name=ckpt.stem,
                   model_hash=model_hash, **kwargs)

    # --- conditioning

    def _autocast(self):
        if self.autocast:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _tokens(self, text: str, emphasis: bool):
        key = (text, emphasis)
        if key not in self._chunks:
            chunks = tokenize_weighted(text, self.model.cond_stage_model.tokenizer, emphasis=emphasis)
            if chunks.n_chunks > 1:
                log.warning("prompt of %d tokens is longer than 75: encoded in %d chunks of 75 tokens (%s)",
                            chunks.n_tokens, chunks.n_chunks, _short(text))
            self._chunks[key] = chunks
        return self._chunks[key]

    def _encode(self, text: str, emphasis: bool, chunks) -> torch.Tensor:
        key = (text, emphasis, chunks.n_chunks)
        if key not in self._embeddings:
            with torch.no_grad(), self._autocast():
                self._embeddings[key] = encode_weighted(chunks, self.model.cond_stage_model.encode_ids)
        return self._embeddings[key]

    def conditioning(self, prompt: str, negative_prompt: str = "", emphasis: bool = True):
        """(cond, uncond), each (1, 77 * n_chunks, D): the two prompts encoded in the same number
        of 75-token chunks (the shorter padded with empty chunks), each distinct text once."""
        tokenizer = self.model.cond_stage_model.tokenizer
        c, u = pad_chunks(self._tokens(prompt, emphasis), self._tokens(negative_prompt, emphasis), tokenizer)
        return self._encode(prompt, emphasis, c), self._encode(negative_prompt, emphasis, u)

    def _n_chunks(self, item: WorkItem, emphasis: bool) -> int:
        return max(self._tokens(item.prompt, emphasis).n_chunks, self._tokens(item.negative_prompt, emphasis).n_chunks)

    # --- sampling

    def _eps_model(self, x, t, context):
        return self.unet(x.to(self.dtype), t, context.to(self.dtype)).float()

    def sampler_runs(self, items: list[WorkItem], opts: Options) -> list[list[int]]:
        """How `generate_batch` splits a batch: positions sampled together. One image at a time
        unless `opts.batched`; then items whose prompts encode to the same length share a run,
        except with a stochastic sampler, whose step noise must come from each image's own seed."""
        if opts.stochastic or not opts.batched:
            return [[i] for i in range(len(items))]
        groups = {}
        for i, item in enumerate(items):
            groups.setdefault(self._n_chunks(item, opts.emphasis), []).append(i)
        return list(groups.values())

    def generate_batch(self, items: list[WorkItem], opts: Options, callback: Callable | None = None) -> list[Result]:
        """Images for a batch of work items, in order. `callback(i, x_t, x0_pred)` is called once
        per step of each sampler run (see `sampler_runs`)."""
        opts.validate(self.model)
        shape = opts.latent_shape()
        n_keep = _intermediate_steps(opts.steps) if opts.intermediates else ()
        latents = [None] * len(items)
        inter = [[] for _ in items]  # per item: [(x_t, x0_pred)] at the kept steps, on the CPU
        with torch.no_grad(), self._autocast():
            for run in self.sampler_runs(items, opts):
                pairs = [self.conditioning(items[i].prompt, items[i].negative_prompt, opts.emphasis) for i in run]
                conds, unconds = zip(*pairs)
                eps_fn = cfg_denoiser(self._eps_model, torch.cat(conds), torch.cat(unconds), opts.scale,
                                      fans_out=fans_out(self.model))
                x_T = torch.stack([start_code(items[i].seed, shape) for i in run]).to(self.device)
                generator = torch.Generator("cpu").manual_seed(items[run[0]].seed)

                def step(i, x_t, x0_pred, run=run):
                    if i in n_keep:
                        for j, pos in enumerate(run):
                            inter[pos].append((x_t[j].float().cpu(), x0_pred[j].float().cpu()))
                    if callback is not None:
                        callback(i, x_t, x0_pred)

                z = run_sampler(opts.sampler, eps_fn, x_T, self.model.alphas_cumprod, opts.steps,
                                generator=generator, callback=step, eta=opts.eta)
                for j, pos in enumerate(run):
                    latents[pos] = z[j]
            if opts.batched:
                pictures = self.decode(torch.stack(latents))
            else:
                pictures = [self.decode(z[None])[0] for z in latents]
            strips = [self._strip(steps) if steps else None for steps in inter]

        flags = self.safety_checker.flags(pictures) if self.safety_checker is not None else [False] * len(items)
        results = []
        for item, picture, flagged, strip in zip(items, pictures, flags, strips):
            if flagged:
                from .safety import replacement

                picture = replacement(picture, self.nsfw)
                strip = None  # the intermediates would show what the replacement hides
            settings = self.settings(item, opts)
            meta = {"prompt": item.prompt, "negative_prompt": item.negative_prompt, "settings": settings}
            results.append(Result(item, picture, imagelib.format_parameters(meta), flagged, strip, settings))
        return results

    def decode(self, z: torch.Tensor):
        """Latents [B, C, h, w] -> PIL images (decoded together)."""
        x = self.model.decode_first_stage(z.to(self.dtype))
        if (self.dtype != torch.float32 or self.autocast) and not bool(torch.isfinite(x).all()):
            log.warning("the autoencoder overflowed in half precision: decoding again in float32")
            x = self._decode_float32(z)
        return imagelib.to_pil((x.float() + 1.0) / 2.0)

    def _decode_float32(self, z):
        """The decode in float32, autocast off: the autoencoder's weights upcast for the call and cast back
        after (float16 -> float32 -> float16 is exact)."""
        vae = self.model.first_stage_model
        dtype = next(vae.parameters()).dtype
        vae.float()
        try:
            with torch.autocast(self.device.type, enabled=False):
                return self.model.decode_first_stage(z.float())
        finally:
            vae.to(dtype)

    def _strip(self, steps):
        x_t = [self.decode(s[0][None].to(self.device))[0] for s in steps]
        x_0 = [self.decode(s[1][None].to(self.device))[0] for s in steps]
        return imagelib.make_strip([x_t, x_0])

    def settings(self, item: WorkItem, opts: Options) -> dict:
        """The web UI's settings line of one image, as an ordered dict."""
        s = {
            "Steps": opts.steps,
            "Sampler": WEBUI_SAMPLER_NAMES.get(opts.sampler, opts.sampler),
            "CFG scale": _number(opts.scale),
            "Seed": item.seed,
            "Size": f"{opts.W}x{opts.H}",
        }
        if self.model_hash:
            s["Model hash"] = self.model_hash
        s["Model"] = self.model_name
        if opts.eta is not None and (opts.eta or opts.sampler != "ddim"):
            s["Eta"] = _number(opts.eta)
        if not opts.emphasis:
            s["Emphasis"] = "None"
        return s

    # --- the whole run

    def __call__(self, prompt=DEFAULT_PROMPT, negative_prompt="", *, sampler="ddim", steps=50, scale=7.5, eta=None,
                 H=512, W=512, C=4, f=8, seed=42, n_samples=3, n_iter=2, fixed_code=False, emphasis=True,
                 intermediates=False, batched=False, callback=None) -> list[Result]:
        """Generate n_iter x n_samples images of `prompt` (a string), or, for a list of prompts, each
        prompt once per iteration in batches of n_samples (as --from-file). `negative_prompt` is one
        string or a list matching the prompts."""
        opts = Options(sampler, steps, scale, eta, H, W, C, f, emphasis, intermediates, batched)
        opts.validate(self.model)
        _check_counts(n_samples, n_iter)
        batches = prompt_batches(prompt, negative_prompt, n_samples, repeat=isinstance(prompt, str))
        results = []
        for items in plan_work(batches, n_iter, seed, fixed_code):
            results += self.generate_batch(items, opts, callback)
        return results


def generate(prompt=DEFAULT_PROMPT, negative_prompt="", *, config=DEFAULT_CONFIG, ckpt=DEFAULT_CKPT, device=None,
             precision="autocast", use_ema=False, safety_checker=None, nsfw="black", cuda_graphs=False, compile=False,
             **options) -> list[Result]:
    """Load a model and run it once: `Txt2Img.from_files(...)(prompt, negative_prompt, **options)`."""
    pipe = Txt2Img.from_files(config, ckpt, device=device, precision=precision, use_ema=use_ema,
                              safety_checker=safety_checker, nsfw=nsfw, cuda_graphs=cuda_graphs, compile=compile)
    return pipe(prompt, negative_prompt, **options)


def _check_counts(n_samples, n_iter):
    for name, value in (("n_samples", n_samples), ("n_iter", n_iter)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"--{name} must be a positive integer, got {value}")


def _intermediate_steps(steps: int) -> set[int]:
    """About ten evenly spaced steps, the last included."""
    every = max(1, steps // 10)
    return {i for i in range(steps) if i % every == every - 1 or i == steps - 1}


def _number(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def sampler_from_label(label: str) -> str:
    """The registry name of a sampler as written in a `parameters` text (web UI label or our name)."""
    from .samplers import SAMPLERS

    by_label = {v.lower(): k for k, v in WEBUI_SAMPLER_NAMES.items()}
    name = by_label.get(label.strip().lower(), label.strip().lower())
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {label!r} in the image's parameters; valid samplers: {', '.join(SAMPLERS)}")
    return name


def options_from_parameters(text: str) -> dict:
    """What a `parameters` text records, as keyword arguments of `Txt2Img.__call__` (prompt,
    negative_prompt, steps, sampler, scale, seed, H, W, eta, emphasis) plus "model_hash" and
    "model" when present. ValueError when it lacks the seed or the steps."""
    meta = imagelib.parse_parameters(text)
    s = meta["settings"]
    missing = [k for k in ("Steps", "Seed") if k not in s]
    if missing:
        raise ValueError(f"the image's parameters lack {' and '.join(missing)}")
    out = {"prompt": meta["prompt"], "negative_prompt": meta["negative_prompt"]}
    try:
        out["steps"] = int(s["Steps"])
        out["seed"] = int(s["Seed"])
        if "Sampler" in s:
            out["sampler"] = sampler_from_label(s["Sampler"])
        if "CFG scale" in s:
            out["scale"] = float(s["CFG scale"])
        if "Size" in s:
            w, h = s["Size"].lower().split("x")
            out["W"], out["H"] = int(w), int(h)
        if "Eta" in s:
            out["eta"] = float(s["Eta"])
    except ValueError as e:
        if "unknown sampler" in str(e):
            raise
        raise ValueError(f"malformed settings in the image's parameters: {e}") from None
    out["emphasis"] = s.get("Emphasis", "").lower() not in ("none", "off")
    if "Model hash" in s:
        out["model_hash"] = s["Model hash"]
    if "Model" in s:
        out["model"] = s["Model"]
    return out
