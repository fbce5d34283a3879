"""SDXL's conditioning as the pipeline uses it: weighted prompts through both text encoders, the size
vector y, and classifier-free guidance carrying y beside the text context.

    context  CLIP-L hidden layer 11 ++ bigG penultimate layer, each weighted and mean-restored on its own
             (as the web UIs do per encoder), chunk by chunk for prompts over 75 tokens
    pooled   bigG's pooled embedding of the first chunk (as the web UIs do)
    y        pooled ++ embeddings of original_size, crop_coords_top_left, target_size (refiner:
             aesthetic_score)

An empty negative prompt on the base model conditions the unconditional branch on zeros (context and
pooled; the size part of y stays), as diffusers' `force_zeros_for_empty_prompt` and sgm's sampling
scripts (`force_uc_zero_embeddings=["txt"]`) do; the refiner encodes the empty text.
"""

from __future__ import annotations

import math

import torch

from .models.sdxl import DiffusionEngine
from .prompt import PromptChunks, encode_weighted

DEFAULT_AESTHETIC = 6.0
NEGATIVE_AESTHETIC = 2.5
MAX_SIZE_CONDITION = 16384  # pixels, as checks.MAX_SIDE


def is_sdxl(model) -> bool:
    return isinstance(model, DiffusionEngine)


def tokenizer(model):
    """The tokenizer that frames prompts into chunks for this model's text encoder(s)."""
    return model.conditioner.tokenizer if is_sdxl(model) else model.cond_stage_model.tokenizer


def encode_prompt(conditioner, chunks: PromptChunks, vectors=None):
    """(context [1, 77 n, sum of widths], pooled [1, P] or None) of a weighted, chunked prompt
    (`vectors`: each text encoder's textual-inversion vectors, see GeneralConditioner.encode_ids)."""
    hidden, pooled = conditioner.encode_ids(chunks.ids, vectors)
    context = torch.cat([encode_weighted(chunks, lambda ids, h=h: h) for h in hidden], dim=-1)
    return context, None if pooled is None else pooled[:1]


def size_conditioning(model, H, W, original_size=None, crop_coords=None, aesthetic_score=None, negative=False):
    """{input_key: numbers} for the model's size embedders: original = target = (H, W) and crop (0, 0)
    unless given; the aesthetic score 6.0 unless given, and 2.5 for the negative prompt whatever the
    positive one (diffusers' refiner pipeline: `negative_aesthetic_score`)."""
    values = {
        "original_size_as_tuple": tuple(original_size or (H, W)),
        "crop_coords_top_left": tuple(crop_coords or (0, 0)),
        "target_size_as_tuple": (H, W),
        "aesthetic_score": (NEGATIVE_AESTHETIC if negative else
                            (DEFAULT_AESTHETIC if aesthetic_score is None else aesthetic_score),),
    }
    return {k: values[k] for k in model.conditioner.size_keys}


def vectors(model, pooled_c, pooled_u, opts, zero_uncond: bool):
    """(y_cond, y_uncond), each [1, adm_in_channels], for one image."""
    args = (opts.H, opts.W, opts.original_size, opts.crop_coords, opts.aesthetic_score)
    y_c = model.conditioner.vector(pooled_c, size_conditioning(model, *args))
    if zero_uncond:
        pooled_u = torch.zeros_like(pooled_u)
    y_u = model.conditioner.vector(pooled_u, size_conditioning(model, *args, negative=True))
    return y_c, y_u


def guided_denoiser(eps_model, cond, uncond, scale: float, fans_out: bool = False):
    """Classifier-free guidance with the vector y: cond and uncond are (context [B, L, D], y [B, adm]).

    eps_u + scale (eps_c - eps_u) in one pass; `fans_out`: eps_model takes the B latents once with the
    2B contexts and vectors (an optimized UNet), otherwise the latents are repeated to 2B."""
    (c, y_c), (u, y_u) = cond, uncond
    if scale == 1.0:
        return lambda x, t: eps_model(x, t, c, y_c)
    context, y = torch.cat([u, c]), torch.cat([y_u, y_c])  # unconditional half first

    def eps_fn(x, t):
        if fans_out:
            eps_u, eps_c = eps_model(x, t, context, y).chunk(2)
        else:
            eps_u, eps_c = eps_model(torch.cat([x, x]), torch.cat([t, t]), context, y).chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return eps_fn


def hand_over(first, second, switch: float, num_timesteps: int = 1000):
    """One denoiser from two: `first` at timesteps t >= (1 - switch) * num_timesteps, `second` below (the
    SDXL refiner's ensemble of experts; diffusers' denoising_end / denoising_start split by timestep). Both
    models predict on the same schedule, so one sampler run hands the latent over at that point."""
    cutoff = round(num_timesteps * (1 - switch))
    return lambda x, t: (first if float(torch.as_tensor(t).flatten()[0]) >= cutoff else second)(x, t)


def parse_pair(flag: str, text: str) -> tuple[int, int]:
    """"H,W" (or "TOP,LEFT") -> two integers; ValueError in one line otherwise."""
    parts = str(text).replace("x", ",").split(",")
    try:
        a, b = (int(p.strip()) for p in parts)
    except ValueError:
        raise ValueError(f"--{flag} must be two integers separated by a comma, got {text!r}") from None
    return a, b


def check_options(original_size=None, crop_coords=None, aesthetic_score=None) -> None:
    """ValueError (one line) for size conditioning values no model was trained on."""
    if original_size is not None:
        if len(original_size) != 2 or not all(isinstance(v, int) and 0 < v <= MAX_SIZE_CONDITION
                                                  for v in original_size):
            raise ValueError(f"--original_size must be two integers in 1..{MAX_SIZE_CONDITION}, got {original_size}")
    if crop_coords is not None:
        if len(crop_coords) != 2 or not all(isinstance(v, int) and 0 <= v <= MAX_SIZE_CONDITION for v in crop_coords):
            raise ValueError(f"--crop_coords must be two integers in 0..{MAX_SIZE_CONDITION}, got {crop_coords}")
    if aesthetic_score is not None:
        if isinstance(aesthetic_score, bool) or not isinstance(aesthetic_score, (int, float)) \
                or not math.isfinite(aesthetic_score) or not 0 <= aesthetic_score <= 10:
            raise ValueError(f"--aesthetic_score must be a finite number in 0..10, got {aesthetic_score}")
