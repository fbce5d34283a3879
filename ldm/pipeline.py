"""Text to image as a library: what the `txt2img` command line runs, callable from Python.

    from ldm.pipeline import Txt2Img
    pipe = Txt2Img.from_files("configs/stable-diffusion/v1-inference.yaml", "models/ldm/stable-diffusion-v1/model.ckpt")
    results = pipe("a watercolor fox", negative_prompt="blurry", steps=30, seed=7, n_samples=2, n_iter=1)
    results[0].image.save("fox.png")      # PIL image
    print(results[0].parameters)          # the PNG `parameters` text (prompt, seed, sampler, ...)

A run is planned up front as a list of batches of work items (`ldm.planning`), and
`Txt2Img.generate_batch` turns one batch of items into images; nothing else carries state from one
batch to the next, so the items of a run can be split among processes.

Reproducibility: image k of a run starts from
`torch.randn([C, H/f, W/f], generator=torch.Generator("cpu").manual_seed(seed + k))` moved to
the device (with `fixed_code`, the items of every batch reuse the seeds of the first batch);
stochastic samplers draw their step noise from a CPU generator seeded with that same number. Images
are sampled one at a time (unless `batched=True`), so an image depends only on its own work item:
regenerated alone from its seed it is bit-identical on the same machine, and CPU and GPU runs start
from the same noise.

The helpers of a run live in small modules, re-exported here: `ldm.paths` (where files are),
`ldm.hashing` (the model hash and the search by hash), `ldm.devices` (device, precision, threads),
`ldm.planning` (work items), `ldm.metadata` (the web UIs' `parameters` text).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from . import checks, detect
from . import conditioning as xl
from . import images as imagelib
from .backends import BackendOptions, fans_out, optimize
from .checkpoint import CheckpointError, load_model
from .config import load_config
from .defaults import DEFAULT_CKPT, DEFAULT_CONFIG, DEFAULT_PROMPT
from .devices import PRECISIONS, choose_threads, pick_device, resolve_precision  # noqa: F401 (re-exported)
from .hashing import checkpoint_hash, find_checkpoint  # noqa: F401 (re-exported)
from .metadata import (  # noqa: F401 (re-exported)
    WEBUI_SAMPLER_NAMES,
    options_from_parameters,
    parameters_text,
    sampler_from_label,
    settings,
)
from .networks import PromptExtras, clip_skip_error
from .paths import DEMO_CKPT, DEMO_CONFIG, REPO_ROOT, missing_checkpoint_message, repo_path  # noqa: F401
from .planning import WorkItem, check_counts, plan_work, prompt_batches, start_code  # noqa: F401 (re-exported)
from .prompt import encode_weighted, pad_chunks, tokenize_weighted
from .samplers import cfg_denoiser, check_eta, get_sampler
from .samplers import sample as run_sampler

log = logging.getLogger(__name__)

__all__ = [  # the library's API, and what the command line and the tests import from here
    "Txt2Img", "generate", "Options", "Result", "latent_factor",
    "WorkItem", "prompt_batches", "plan_work", "start_code", "check_counts",
    "pick_device", "resolve_precision", "choose_threads", "PRECISIONS",
    "checkpoint_hash", "find_checkpoint", "repo_path", "missing_checkpoint_message", "REPO_ROOT", "DEMO_CONFIG",
    "DEMO_CKPT", "WEBUI_SAMPLER_NAMES", "options_from_parameters", "sampler_from_label", "settings", "parameters_text",
]

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
    # SDXL's size conditioning (None: the defaults, see ldm.conditioning.size_conditioning)
    original_size: tuple[int, int] | None = None
    crop_coords: tuple[int, int] | None = None
    aesthetic_score: float | None = None  # the refiner's
    strength: float | None = None  # img2img's denoising strength (ldm.img2img); None in txt2img
    hr_scale: float | None = None  # the hires fix (ldm.img2img.hires_pass): a second pass at hr_scale x the size
    hr_steps: int | None = None  # its schedule's steps (None: steps)
    hr_strength: float = 0.5  # its denoising strength
    hr_upscaler: str = "latent"  # "latent" (bilinear on the latent) or "lanczos" (on the decoded picture)
    clip_skip: int = 1  # the web UIs' meaning: 1 the last layer, 2 the penultimate (v1; see ldm.networks)

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
        checks.number("scale", self.scale)
        if self.eta is not None:
            checks.number("ddim_eta", self.eta)
        check_eta(sampler.name, self.eta)
        xl.check_options(self.original_size, self.crop_coords, self.aesthetic_score)
        self._validate_img2img()
        skip_error = clip_skip_error(model, self.clip_skip)
        if skip_error:
            raise ValueError(skip_error)
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

    def _validate_img2img(self):
        if self.strength is not None:
            checks.number("strength", self.strength, 0, 1)
        if self.hr_scale is not None:
            checks.number("hr_scale", self.hr_scale, 1, checks.MAX_SIDE / max(self.H, self.W))
            checks.number("hr_strength", self.hr_strength, 0, 1)
            if self.hr_steps is not None:
                checks.integer("hr_steps", self.hr_steps, 1, 1000)
            if self.hr_upscaler not in ("latent", "lanczos"):
                raise ValueError(f"--hr_upscaler must be latent or lanczos, got {self.hr_upscaler!r}")

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


class _LRU(OrderedDict):
    """A dict that keeps its `size` most recently used entries."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or_make(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.size:
            self.popitem(last=False)
        return value


def _model_placement(model):
    p = next(model.model.parameters())
    return p.device, p.dtype


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are the same device when the current CUDA device is 0."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


class Txt2Img:
    """A loaded model on a device with a precision; call it (or `generate_batch`) to make images.

    The model must already be on `device` with the weight dtype `precision` asks for (float16 for
    "half" on a GPU, else float32): `from_files` loads it that way. Txt2Img never moves or casts a
    model it was handed (that would change the caller's object, or double its memory as a copy);
    a mismatch is a ValueError saying what to do.

    `backend` (an `ldm.backends.BackendOptions`) puts the model through `ldm.backends.optimize`, the
    one change ever made to a model handed in (it swaps fused modules in, keeps every parameter, and
    `ldm.backends.deoptimize` reverses it); without it the model runs as it is, reference or already
    optimized. `from_files` always passes one (default `BackendOptions()`; the command line
    `BackendOptions.from_env()`), with `cuda_graphs=True` (replay the UNet from CUDA graphs on CUDA,
    one capture per input shape) and `compile=True` (torch.compile) folded in: both opt-in until a
    GPU benchmark shows they pay (see bench/README.md).


    `safety_checker` (an `ldm.safety.SafetyChecker`, or None for none) checks every image; a
    flagged one is replaced as `nsfw` says ("black" or "blur") and marked in its Result. The
    command line always loads one unless told not to; a Python caller passes it explicitly.
    Watermarking happens when files are written (`ldm.images.put_watermark`), not here.
    """

    PROMPT_CACHE = 64  # distinct prompt texts whose tokens / embeddings are kept

    def __init__(self, model, device="cpu", precision="autocast", model_name="model", model_hash=None,
                 safety_checker=None, nsfw="black", backend=None, lora_dir=None, embeddings_dir=None, loras=()):
        self.device = torch.device(device)
        self.dtype, self.autocast, notice = resolve_precision(self.device, precision)
        if notice:
            log.warning(notice)
        model_device, model_dtype = _model_placement(model)
        if not _same_device(model_device, self.device) or model_dtype != self.dtype:
            raise ValueError(
                f"the model is on {model_device} in {model_dtype}; precision {precision!r} on {self.device} needs "
                f"{self.dtype} weights there: load it with Txt2Img.from_files, or ldm.checkpoint.load_model(config, "
                f"ckpt, device={str(self.device)!r}, dtype={self.dtype})")
        self.model = optimize(model, backend) if backend is not None else model
        self.unet = self.model.apply_model  # the denoiser as the samplers call it
        self.model_name = model_name
        self.model_hash = model_hash
        self.safety_checker = safety_checker
        self.nsfw = nsfw
        self._chunks = _LRU(self.PROMPT_CACHE)  # (text, emphasis) -> PromptChunks
        self._embeddings = _LRU(self.PROMPT_CACHE)  # (text, emphasis, n_chunks) -> (1, 77 * n_chunks, D)
        self._text_encoded = False  # a prompt was encoded since the text encoder's pages were last let go
        self.detection = None  # what ldm.detect chose, when the config was not given (see from_files)
        # (Txt2Img, switch): a second model denoising from the fraction `switch` of the schedule on
        # (SDXL's ensemble of experts), or None
        self.refiner = None
        self.vae = None  # (file name, hash) of a VAE that replaced the checkpoint's (from_files' `vae`)
        # LoRA tags, embedding words, clip skip: `loras` [(file, multiplier)] apply to every image
        self.extras = PromptExtras(self.model, lora_dir, embeddings_dir, loras)

    @classmethod
    def from_files(cls, config=None, ckpt=DEFAULT_CKPT, device=None, precision="autocast", use_ema=False,
                   hash_model=True, parameterization=None, backend=None, cuda_graphs=False, compile=False,
                   vae=None, refiner=None, refiner_switch=0.8, refiner_config=None, **kwargs) -> Txt2Img:
        """Load the model of `config` with the weights of `ckpt` (local files only, nothing downloaded)
        on `device` (default: the best available) in the weight dtype of `precision`.

        With `config=None` the bundled config is chosen from the checkpoint's keys, and for SD 2.x
        whether it predicts eps or v from one UNet evaluation (`ldm.detect`; `pipe.detection` says
        what was chosen). `parameterization` ("eps" or "v") overrides the config's and skips that test.
        `vae`: a VAE file whose weights replace the checkpoint's autoencoder (ldm.checkpoint.load_vae).
        `refiner`: a second checkpoint (the SDXL refiner) that takes over the denoising for the last
        1 - `refiner_switch` of it (see `Txt2Img.refiner`), loaded with `refiner_config` (default: detected).
        """
        device = pick_device(device)
        dtype, _, _ = resolve_precision(device, precision)
        if device.type == "cpu":  # the CPU's activations from the heap from the first step (a user's MALLOC_* wins)
            from .backends.memory import set_heap_defaults

            set_heap_defaults()
        ckpt = repo_path(ckpt)
        if not ckpt.is_file():
            raise CheckpointError(missing_checkpoint_message(ckpt) if not ckpt.exists()
                                  else f"checkpoint {ckpt} is not a file")
        if not os.access(ckpt, os.R_OK):
            raise CheckpointError(f"cannot read checkpoint {ckpt}: permission denied")
        detection = detect.choose_config(ckpt) if config is None else None
        if config is None:
            config = detection.config if detection else DEFAULT_CONFIG
        config_dict = load_config(repo_path(config))
        t0 = time.perf_counter()
        model = load_model(config_dict, ckpt, device=device, dtype=dtype, use_ema=use_ema)
        if vae is not None:
            from .checkpoint import load_vae

            load_vae(model, repo_path(vae))
        log.info("loaded %s in %.1f s", ckpt, time.perf_counter() - t0)
        model_hash = checkpoint_hash(ckpt) if hash_model else None
        backend = backend or BackendOptions()
        backend = backend.replace(cuda_graphs=backend.cuda_graphs or cuda_graphs, compile=backend.compile or compile)
        pipe = cls(model, device, precision, model_name=ckpt.stem, model_hash=model_hash, backend=backend, **kwargs)
        if vae is not None:  # named in the PNG as the web UIs do: "VAE hash: ..., VAE: file name"
            pipe.vae = (repo_path(vae).name, checkpoint_hash(repo_path(vae)) if hash_model else None)
        with pipe._autocast():
            pipe.detection = detect.resolve_parameterization(pipe.model, detection, parameterization)
        if pipe.detection is not None:
            log.info(pipe.detection.message)
        if refiner is not None:
            checks.number("refiner_switch", refiner_switch, minimum=0, maximum=1)
            second = cls.from_files(refiner_config, refiner, device=device, precision=precision, hash_model=False,
                                    backend=backend)
            if (second.model.channels, latent_factor(second.model)) != (pipe.model.channels, latent_factor(pipe.model)):
                raise ValueError(f"--refiner {refiner}: its latent space differs from the model's")
            pipe.refiner = (second, float(refiner_switch))
        return pipe

    @property
    def default_size(self) -> int:
        """Image side when none is given: 1024 for SDXL, 768 for v-prediction models (SD 2.x 768-v), else 512."""
        if xl.is_sdxl(self.model):
            return 1024
        return 768 if self.model.parameterization == "v" else 512

    @property
    def unet_params(self) -> int:
        return sum(p.numel() for p in self.model.model.diffusion_model.parameters())

    def threads_for(self, opts: Options, cores: int) -> int:
        """The thread count `ldm.devices.choose_threads` gives this model at the size of `opts`."""
        _, h, w = opts.latent_shape()
        return choose_threads(self.unet_params, h * w, cores)

    # --- conditioning

    def _autocast(self):
        if self.autocast:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _tokens(self, text: str, emphasis: bool):
        def tokenize():
            tokenizer = self.extras.tokenizer(xl.tokenizer(self.model))  # embedding words as placeholder ids
            chunks = tokenize_weighted(self.extras.clean(text), tokenizer, emphasis=emphasis)
            if chunks.n_chunks > 1:
                log.warning("prompt of %d tokens is longer than 75: encoded in %d chunks of 75 tokens (%s)",
                            chunks.n_tokens, chunks.n_chunks, _short(text))
            return chunks

        return self._chunks.get_or_make((text, emphasis), tokenize)

    def _encode(self, text: str, emphasis: bool, chunks, clip_skip: int = 1) -> torch.Tensor:
        def encode():
            with torch.no_grad(), self._autocast():
                if xl.is_sdxl(self.model):  # (context, pooled)
                    return xl.encode_prompt(self.model.conditioner, chunks, self.extras.xl_vectors())
                return encode_weighted(chunks, self.extras.encoder(self.model.cond_stage_model, clip_skip))

        # the merged LoRA set changes the text encoder: a different set encodes again
        key = (text, emphasis, chunks.n_chunks, clip_skip, self.extras.state)
        if key not in self._embeddings:
            self._text_encoded = True  # its pages are let go once the run's prompts are encoded (guided_denoiser)
        return self._embeddings.get_or_make(key, encode)

    def text_encoder(self):
        """The module that encodes prompts: SDXL's conditioner (both text encoders), else the CLIP text model."""
        return self.model.conditioner if xl.is_sdxl(self.model) else self.model.cond_stage_model

    def conditioning(self, prompt: str, negative_prompt: str = "", emphasis: bool = True, clip_skip: int = 1):
        """(cond, uncond), each (1, 77 * n_chunks, D): the two prompts encoded in the same number
        of 75-token chunks (the shorter padded with empty chunks), each distinct text once. The
        LoRA set merged now (`self.extras.activate`) applies. For SDXL each is (context, pooled)
        (see ldm.conditioning)."""
        tokenizer = xl.tokenizer(self.model)
        c, u = pad_chunks(self._tokens(prompt, emphasis), self._tokens(negative_prompt, emphasis), tokenizer)
        return self._encode(prompt, emphasis, c, clip_skip), self._encode(negative_prompt, emphasis, u, clip_skip)

    def _n_chunks(self, item: WorkItem, emphasis: bool) -> int:
        return max(self._tokens(item.prompt, emphasis).n_chunks, self._tokens(item.negative_prompt, emphasis).n_chunks)

    # --- sampling

    def _eps_model(self, x, t, context, y=None):
        if y is not None:  # SDXL's vector conditioning
            return self.unet(x.to(self.dtype), t, context.to(self.dtype), y.to(self.dtype)).float()
        return self.unet(x.to(self.dtype), t, context.to(self.dtype)).float()

    def sampler_runs(self, items: list[WorkItem], opts: Options) -> list[list[int]]:
        """How `generate_batch` splits a batch: positions sampled together. One image at a time
        unless `opts.batched`; then items whose prompts encode to the same length share a run,
        except with a stochastic sampler, whose step noise must come from each image's own seed."""
        if opts.stochastic or not opts.batched:
            return [[i] for i in range(len(items))]
        groups = {}
        for i, item in enumerate(items):  # one LoRA set a run
            groups.setdefault((self._n_chunks(item, opts.emphasis), self.extras.uses(item)), []).append(i)
        return list(groups.values())

    def guided_denoiser(self, items: list[WorkItem], opts: Options):
        """The classifier-free guided noise prediction for these items, sampled together."""
        conds, unconds = zip(*(self.conditioning(item.prompt, item.negative_prompt, opts.emphasis, opts.clip_skip)
                               for item in items))
        if self._text_encoded:  # not used again while sampling: off the resident set (a new prompt reads it back)
            self._text_encoded = False
            _release_idle(self.text_encoder(), "the text encoder")
        if xl.is_sdxl(self.model):
            return self._guided_xl(items, conds, unconds, opts)
        return cfg_denoiser(self._eps_model, torch.cat(conds), torch.cat(unconds), opts.scale,
                            fans_out=fans_out(self.model))

    def _guided_xl(self, items, conds, unconds, opts: Options):
        """SDXL: the text conditioning is (context, pooled); y adds the size conditioning. The base model
        conditions an empty negative prompt on zeros (ldm.conditioning)."""
        rows = []  # per item: (context_c, y_c, context_u, y_u)
        for item, (c, pooled_c), (u, pooled_u) in zip(items, conds, unconds):
            zero = self.model.force_zeros_for_empty_prompt and not item.negative_prompt
            y_c, y_u = xl.vectors(self.model, pooled_c, pooled_u, opts, zero)
            rows.append((c, y_c, torch.zeros_like(u) if zero else u, y_u))
        c, y_c, u, y_u = (torch.cat(column) for column in zip(*rows))
        return xl.guided_denoiser(self._eps_model, (c, y_c), (u, y_u), opts.scale, fans_out=fans_out(self.model))

    def start_noise(self, items: list[WorkItem], opts: Options) -> torch.Tensor:
        """x_T of these items, [len(items), C, h, w] on the device: each from its own seed."""
        return torch.stack([start_code(item.seed, opts.latent_shape()) for item in items]).to(self.device)

    def sample(self, items: list[WorkItem], opts: Options, callback: Callable | None = None) -> torch.Tensor:
        """The final latents of items sampled together. `callback(i, x_t, x0_pred)` after every step;
        the step noise of a stochastic sampler comes from the first item's seed."""
        generator = torch.Generator("cpu").manual_seed(items[0].seed)
        denoiser = self.guided_denoiser(items, opts)
        if self.refiner is not None:
            second, switch = self.refiner
            denoiser = xl.hand_over(denoiser, second.guided_denoiser(items, opts), switch, self.model.num_timesteps)
        z = run_sampler(opts.sampler, denoiser, self.start_noise(items, opts),
                        self.model.alphas_cumprod, opts.steps, generator=generator, callback=callback, eta=opts.eta,
                        parameterization=getattr(self.model, "parameterization", "eps"))
        if opts.hr_scale is not None:  # the hires fix: img2img of this pass at hr_scale x the size
            from .img2img import hires_pass

            z = hires_pass(self, items, opts, z, callback)
        return z

    def steps_per_run(self, opts: Options) -> int:
        """Sampler steps (callbacks) in one sampler run of `sample`: the hires fix's second pass included."""
        if opts.hr_scale is None:
            return opts.steps
        from .img2img import hires_steps_run

        return opts.steps + hires_steps_run(opts)

    def generate_batch(self, items: list[WorkItem], opts: Options, callback: Callable | None = None) -> list[Result]:
        """Images for a batch of work items, in order. `callback(i, x_t, x0_pred)` is called once
        per step of each sampler run (see `sampler_runs`)."""
        opts.validate(self.model)
        self.extras.check(items)
        keep = _intermediate_steps(opts.steps) if opts.intermediates else set()
        latents = [None] * len(items)
        kept = [[] for _ in items]  # per item: [(x_t, x0_pred)] at the kept steps, on the CPU
        with torch.no_grad(), self._autocast():
            for run in self.sampler_runs(items, opts):
                self.extras.activate(items[run[0]])
                z = self.sample([items[i] for i in run], opts, _step_hook(run, keep, kept, callback))
                for j, pos in enumerate(run):
                    latents[pos] = z[j]
            _release_freed_heap("sampling")  # the decode's activations need room, not the sampler's freed holes
            for pipe in (self, *(self.refiner[:1] if self.refiner else ())):  # the UNets are not read while decoding
                _release_idle(pipe.model.model, "the UNet" if pipe is self else "the refiner's UNet")
            pictures = self.decode(torch.stack(latents)) if opts.batched else [self.decode(z[None])[0] for z in latents]
            strips = [self._strip(steps) if steps else None for steps in kept]
        flags = self.safety_flags(pictures)
        return [self._result(*row, opts) for row in zip(items, pictures, flags, strips)]

    # --- after sampling

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

    def safety_flags(self, pictures) -> list[bool]:
        """Which pictures the safety checker flags (none without a checker)."""
        return self.safety_checker.flags(pictures) if self.safety_checker is not None else [False] * len(pictures)

    def _result(self, item: WorkItem, picture, flagged: bool, strip, opts: Options) -> Result:
        if flagged:
            from .safety import replacement

            picture = replacement(picture, self.nsfw)
            strip = None  # the intermediates would show what the replacement hides
        line = self.settings(item, opts)
        return Result(item, picture, parameters_text(item, line), flagged, strip, line)

    def settings(self, item: WorkItem, opts: Options) -> dict:
        """The web UI's settings line of one image, as an ordered dict."""
        line = {**settings(item, opts, self.model_name, self.model_hash), **self.extras.settings(item, opts.clip_skip)}
        if self.vae is not None:
            name, vae_hash = self.vae
            if vae_hash:
                line["VAE hash"] = vae_hash
            line["VAE"] = name
        if self.refiner is not None:  # as the web UI writes an SDXL refiner
            line["Refiner"] = self.refiner[0].model_name
            line["Refiner switch at"] = f"{self.refiner[1]:g}"
        return line

    # --- the whole run

    def __call__(self, prompt=DEFAULT_PROMPT, negative_prompt="", *, sampler="ddim", steps=50, scale=7.5, eta=None,
                 H=None, W=None, C=4, f=8, seed=42, n_samples=3, n_iter=2, fixed_code=False, emphasis=True,
                 intermediates=False, batched=False, clip_skip=1, callback=None, original_size=None, crop_coords=None,
                 aesthetic_score=None, hr_scale=None, hr_steps=None, hr_strength=0.5,
                 hr_upscaler="latent") -> list[Result]:
        """Generate n_iter x n_samples images of `prompt` (a string), or, for a list of prompts, each
        prompt once per iteration in batches of n_samples (as --from-file). `negative_prompt` is one
        string or a list matching the prompts. H and W default to `default_size`. `original_size` (h, w),
        `crop_coords` (top, left) and `aesthetic_score` condition SDXL models (see ldm.conditioning);
        `hr_scale` turns on the hires fix (see `ldm.img2img.hires_pass`)."""
        H, W = (self.default_size if side is None else side for side in (H, W))
        opts = Options(sampler, steps, scale, eta, H, W, C, f, emphasis, intermediates, batched,
                       original_size=original_size, crop_coords=crop_coords, aesthetic_score=aesthetic_score,
                       hr_scale=hr_scale, hr_steps=hr_steps, hr_strength=hr_strength, hr_upscaler=hr_upscaler,
                       clip_skip=clip_skip)
        opts.validate(self.model)
        check_counts(n_samples, n_iter)
        batches = prompt_batches(prompt, negative_prompt, n_samples, repeat=isinstance(prompt, str))
        plan = plan_work(batches, n_iter, seed, fixed_code)
        self.extras.check([item for items in plan for item in items])  # a bad LoRA fails before any image
        results = []
        for items in plan:
            results += self.generate_batch(items, opts, callback)
        return results


def generate(prompt=DEFAULT_PROMPT, negative_prompt="", *, config=None, ckpt=DEFAULT_CKPT, device=None,
             precision="autocast", use_ema=False, safety_checker=None, nsfw="black", cuda_graphs=False, compile=False,
             parameterization=None, **options) -> list[Result]:
    """Load a model and run it once: `Txt2Img.from_files(...)(prompt, negative_prompt, **options)`."""
    pipe = Txt2Img.from_files(config, ckpt, device=device, precision=precision, use_ema=use_ema,
                              safety_checker=safety_checker, nsfw=nsfw, cuda_graphs=cuda_graphs, compile=compile,
                              parameterization=parameterization)
    return pipe(prompt, negative_prompt, **options)


def _step_hook(run: list[int], keep: set[int], kept: list[list], callback: Callable | None):
    """The sampler's per-step callback for one run: keeps (x_t, x0_pred) of each of the run's items
    at the steps in `keep` (in kept[position]), then calls the caller's callback."""

    def step(i, x_t, x0_pred):
        if i in keep:
            for j, pos in enumerate(run):
                kept[pos].append((x_t[j].float().cpu(), x0_pred[j].float().cpu()))
        if callback is not None:
            callback(i, x_t, x0_pred)

    return step


def _intermediate_steps(steps: int) -> set[int]:
    """About ten evenly spaced steps, the last included."""
    every = max(1, steps // 10)
    return {i for i in range(steps) if i % every == every - 1 or i == steps - 1}


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _release_idle(module, what):
    """Let go of the resident pages of the weights of `module` that are views of a mapped file (the checkpoint,
    or the scratch file of weights narrowed at load), for a phase of the run that does not read them
    (ldm.backends.memory.release_module_pages); they come back from the page cache when it next runs.
    Weights in memory of their own (on a GPU, converted into memory, written to) are left alone."""
    from .backends.memory import release_module_pages, resident_bytes

    before, t0 = resident_bytes(), time.perf_counter()
    if release_module_pages(module):
        log.info("let go of %.2f GB of resident checkpoint pages under %s (%.0f ms)",
                 (before - resident_bytes()) / 1e9, what, (time.perf_counter() - t0) * 1e3)


def _release_freed_heap(phase):
    """Return the C heap's free pages to the system after `phase` (ldm.backends.memory.trim_heap)."""
    from .backends.memory import trim_heap

    freed = trim_heap()
    if freed:
        log.info("returned %.2f GB of freed heap memory to the system after %s", freed / 1e9, phase)
