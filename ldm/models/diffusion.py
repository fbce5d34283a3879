"""The latent diffusion wrapper: UNet + autoencoder + text conditioner + the noise schedule.

Corresponds to the original `ldm.models.diffusion.ddpm.LatentDiffusion`, inference half only.
Submodules sit under the checkpoint names `model.diffusion_model`, `first_stage_model` and
`cond_stage_model`; the schedule buffers keep the original names (`betas`, `alphas_cumprod`...).
"""

import logging

import torch
from torch import nn

from ..config import instantiate
from ..samplers.schedule import schedule_buffers

log = logging.getLogger(__name__)

# The derived schedule buffers of the original, in its registration order.
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

# What the UNet predicts: the noise eps, or v = sqrt(a) eps - sqrt(1 - a) x0 (SD 2.x 768-v models).
PARAMETERIZATIONS = ("eps", "v")


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` (checkpoint keys `model.diffusion_model.*`)."""

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, context, y=None):
        return self.diffusion_model(x, t, context, y)


class ScheduledModel(nn.Module):
    """What every latent diffusion model here shares: the training schedule's buffers (from
    `linear_start`, `linear_end`, `num_timesteps`, set by the subclass), its device and dtype, the
    UNet call (`model`) and the autoencoder's way in and out (`first_stage_model`, `scale_factor`)."""

    def apply_model(self, x_noisy, t, cond, y=None):
        """The UNet's prediction (eps, or v for a v-prediction model) at x_t, t under the text context
        (and SDXL's vector y)."""
        return self.model(x_noisy, t, cond, y)

    def encode_first_stage(self, x):
        """Images in [-1, 1] -> the posterior distribution over (unscaled) latents."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior, generator=None):
        return self.scale_factor * posterior.sample(generator)

    def decode_first_stage(self, z):
        """Scaled latents -> images in about [-1, 1]."""
        return self.first_stage_model.decode(z / self.scale_factor)

    def reset_schedule(self, device=None):
        """(Re)compute the schedule buffers from the config, in float32 like the original."""
        for name, value in schedule_buffers(self.linear_start, self.linear_end, self.num_timesteps).items():
            self.register_buffer(name, value.to(device=device, dtype=torch.float32))

    @property
    def device(self):
        return self.betas.device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype


class LatentDiffusion(ScheduledModel):
    """Latent diffusion with cross-attention text conditioning (SD v1 and 2.x), eps- or v-prediction."""

    def __init__(self, unet_config, first_stage_config, cond_stage_config, linear_start=0.00085, linear_end=0.012,
                 timesteps=1000, parameterization="eps", channels=4, scale_factor=1.0):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"LatentDiffusion: parameterization {parameterization!r} is not supported "
                             f"(choose from {', '.join(PARAMETERIZATIONS)})")

        self.model = DiffusionWrapper(instantiate(unet_config))
        self.first_stage_model = instantiate(first_stage_config)
        self.cond_stage_model = instantiate(cond_stage_config)
        self.parameterization = parameterization  # what the UNet predicts: "eps" (noise) or "v" (SD 2.x 768-v)
        self.channels = channels
        self.scale_factor = float(scale_factor)
        self.linear_start, self.linear_end, self.num_timesteps = linear_start, linear_end, int(timesteps)
        self.reset_schedule()

    def get_learned_conditioning(self, prompts):
        return self.cond_stage_model(prompts)


class LatentInpaintDiffusion(LatentDiffusion):
    """The original `LatentInpaintDiffusion` (sd-v1-5-inpainting): conditioning_key "hybrid", a 9-channel UNet
    whose input is the noisy latent, the mask (1 = repaint) at latent size and the masked image's latent,
    concatenated in that order (the original's concat_keys ("mask", "masked_image"))."""

    def __init__(self, unet_config, first_stage_config, cond_stage_config, linear_start=0.00085, linear_end=0.012,
                 timesteps=1000, parameterization="eps", channels=4, scale_factor=1.0, conditioning_key="hybrid",
                 concat_keys=("mask", "masked_image")):
        super().__init__(unet_config, first_stage_config, cond_stage_config, linear_start, linear_end, timesteps,
                         parameterization, channels, scale_factor)
        if conditioning_key != "hybrid" or tuple(concat_keys) != ("mask", "masked_image"):
            raise ValueError("LatentInpaintDiffusion: only conditioning_key hybrid with concat_keys "
                             "[mask, masked_image] is supported")

    def apply_model(self, x_noisy, t, cond, c_concat=None):
        """The prediction at x_t with `c_concat` [B, 5, h, w] (mask, masked image latent) beside it."""
        if c_concat is None:
            raise ValueError("an inpainting model needs the mask and the masked image (c_concat)")
        return self.model(torch.cat([x_noisy, c_concat.to(x_noisy.dtype)], dim=1), t, cond)
