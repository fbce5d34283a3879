"""Which model a checkpoint holds, when no --config says: SD v1, SD 2.x (512, eps), SD 2.x (768, v),
SDXL base or SDXL refiner.

The family comes from the keys and shapes alone, read without loading any weights (a
.safetensors header, or the lazily memory-mapped tensors of a .ckpt):

    v1   `cond_stage_model.transformer.*` (OpenAI CLIP ViT-L/14), cross-attention context 768
    2.x  `cond_stage_model.model.*` (OpenCLIP ViT-H/14), cross-attention context 1024
    XL   `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG/14 beside CLIP ViT-L/14); the refiner
         has bigG alone, `conditioner.embedders.0.model.*`

A 2.x file does not say whether its UNet predicts the noise eps (the 512 base models) or
v = sqrt(a) eps - sqrt(1 - a) x0 (the 768 models). As the web UIs do, one UNet evaluation decides:
at the last training timestep (a = alpha_bar_999 ~ 0.005) the input x_t is almost pure noise, so
an eps model must return about x_t itself (E[eps | x_t] ~ sqrt(1 - a) x_t), while a v model returns
about sqrt(a) E[eps | x_t] - sqrt(1 - a) E[x0 | x_t], which carries next to nothing of the noise
(exactly 0 x_t for Gaussian data). We regress the output on a fixed noise input: a slope near 1
means eps, near 0 means v; the threshold is 1/2.
"""

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import UNET, CheckpointError, read_state_dict

log = logging.getLogger(__name__)

CONFIGS = {
    "v1": "configs/stable-diffusion/v1-inference.yaml",
    "v2": "configs/stable-diffusion/v2-inference.yaml",
    "v2-v": "configs/stable-diffusion/v2-inference-v.yaml",
    "sdxl": "configs/sdxl/sd_xl_base.yaml",
    "sdxl-refiner": "configs/sdxl/sd_xl_refiner.yaml",
    "v1-inpainting": "configs/stable-diffusion/v1-inpainting-inference.yaml",
    "v2-inpainting": "configs/stable-diffusion/v2-inpainting-inference.yaml",
}
DESCRIPTIONS = {
    "v1": "Stable Diffusion v1 (CLIP ViT-L/14, eps-prediction, 512x512)",
    "v2": "Stable Diffusion 2.x 512-base (OpenCLIP ViT-H/14, eps-prediction, 512x512)",
    "v2-v": "Stable Diffusion 2.x 768-v (OpenCLIP ViT-H/14, v-prediction, 768x768)",
    "sdxl": "Stable Diffusion XL base (CLIP ViT-L/14 + OpenCLIP ViT-bigG/14, size conditioning, 1024x1024)",
    "sdxl-refiner": "Stable Diffusion XL refiner (OpenCLIP ViT-bigG/14, aesthetic-score conditioning, 1024x1024)",
    "v1-inpainting": "Stable Diffusion v1 inpainting (9-channel UNet: latent, mask, masked image; img2img --mask)",
    "v2-inpainting": "Stable Diffusion 2.x inpainting (OpenCLIP ViT-H/14, 9-channel UNet, eps; img2img --mask)",
}
V2_KINDS = ("v2", "v2-v")  # the families whose parameterization one UNet evaluation decides
SDXL_BIGG = "conditioner.embedders.1.model."  # the base's second text encoder
SDXL_REFINER_BIGG = "conditioner.embedders.0.model."  # the refiner's only one
V1_TEXT = "cond_stage_model.transformer."
V2_TEXT = "cond_stage_model.model."
SLOPE_THRESHOLD = 0.5
PROBE_SIZE = 32  # latent side of the probe input (256x256 pixels): 4096 values per channel


def checkpoint_shapes(path) -> dict[str, tuple]:
    """{key: shape} of a checkpoint, without reading its weights."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        except (OSError, ValueError, struct.error, KeyError, TypeError):
            raise CheckpointError(f"cannot read safetensors file {path}: malformed header") from None
    return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}  # memory-mapped: nothing is read


def _context_dim(shapes) -> int | None:
    """The UNet's cross-attention context width (the in-features of an attn2.to_k)."""
    for key, shape in shapes.items():
        if key.startswith(UNET) and key.endswith(".attn2.to_k.weight") and len(shape) == 2:
            return shape[1]
    return None


def family(shapes) -> str | None:
    """"v1", "v2", "sdxl" or "sdxl-refiner" from a checkpoint's {key: shape}; None when it is none of
    them (the caller then keeps the default config, and the loader explains the mismatch).
    CheckpointError for model kinds txt2img knows it does not run."""
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        if any(k.startswith(SDXL_BIGG) for k in shapes):
            return "sdxl"
        if any(k.startswith(SDXL_REFINER_BIGG) for k in shapes):
            return "sdxl-refiner"
        raise CheckpointError("this checkpoint has sgm-style conditioner keys but neither SDXL base nor refiner "
                              "text encoders (conditioner.embedders.N.model.*): txt2img does not run it")
    first = shapes.get(UNET + "input_blocks.0.0.weight")
    if first is not None and len(first) == 4 and first[1] == 9:
        inpainting = {768: "v1-inpainting", 1024: "v2-inpainting"}.get(_context_dim(shapes))
        if inpainting is not None:
            return inpainting
    if first is not None and len(first) == 4 and first[1] != 4:
        kind = {9: "an inpainting", 8: "an InstructPix2Pix", 5: "a depth-conditioned"}.get(first[1], "a non-txt2img")
        raise CheckpointError(f"this looks like {kind} checkpoint ({first[1]} UNet input channels), "
                              "which txt2img does not run")
    context = _context_dim(shapes)
    if any(k.startswith(V2_TEXT) for k in shapes) or context == 1024:
        return "v2"
    if any(k.startswith(V1_TEXT) for k in shapes) or context == 768:
        return "v1"
    return None


@torch.no_grad()
def noise_slope(model, size=PROBE_SIZE, seed=0) -> float:
    """<out, x> / <x, x> for the UNet's output `out` at the last training timestep on noise x,
    conditioned on the empty prompt: about 1 for an eps model, about 0 for a v model."""
    dtype = model.dtype
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(1, model.channels, size, size, generator=g).to(model.device)
    t = torch.full((1,), model.num_timesteps - 1, device=model.device, dtype=torch.long)
    context = model.cond_stage_model.encode_ids(model.cond_stage_model.tokenizer([""]))
    out = model.apply_model(x.to(dtype), t, context.to(dtype)).float()
    slope = (out * x).sum() / (x * x).sum()
    if not torch.isfinite(slope):
        raise CheckpointError("cannot tell whether this SD 2.x model predicts eps or v (its UNet output is not "
                              "finite); pass --parameterization eps (512 models) or v (768 models)")
    return float(slope)


def parameterization(model) -> str:
    """"eps" or "v": what this model's UNet predicts, from one evaluation (see the module docstring)."""
    slope = noise_slope(model)
    choice = "eps" if slope > SLOPE_THRESHOLD else "v"
    log.info("UNet output regressed on the noise at t=%d: slope %.3f -> %s-prediction",
             model.num_timesteps - 1, slope, choice)
    return choice


@dataclass
class Detection:
    """What auto-detection chose for a checkpoint."""

    kind: str  # "v1", "v2" or "v2-v" (the key of CONFIGS)
    config: str  # the bundled config to load it with
    how: str  # how the parameterization was decided

    @property
    def message(self) -> str:
        return f"model: {DESCRIPTIONS[self.kind]}, detected from the checkpoint ({self.how}); config {self.config}"


def choose_config(ckpt) -> Detection | None:
    """The bundled config for a checkpoint's family (the 2.x eps config for any 2.x file until
    `resolve_parameterization` has looked at its UNet); None when the keys match no family."""
    kind = family(checkpoint_shapes(ckpt))
    if kind is None:
        return None
    return Detection(kind, CONFIGS[kind], "keys and shapes")


def resolve_parameterization(model, detection: Detection | None, override: str | None = None) -> Detection | None:
    """Set `model.parameterization`: `override` when given, else for a detected 2.x model the
    choice of one UNet evaluation. Returns the detection updated to what was chosen."""
    if override is not None:
        if override not in ("eps", "v"):
            raise ValueError(f"--parameterization must be eps or v, got {override!r}")
        model.parameterization = override
        if detection is not None and detection.kind in V2_KINDS:
            kind = "v2-v" if override == "v" else "v2"
            detection = Detection(kind, CONFIGS[kind], f"{override}-prediction from --parameterization")
        return detection
    if detection is None or detection.kind not in V2_KINDS:
        return detection
    choice = parameterization(model)
    model.parameterization = choice
    kind = "v2-v" if choice == "v" else "v2"
    return Detection(kind, CONFIGS[kind], f"{choice}-prediction from one UNet evaluation")
