"""The latent diffusion wrapper: UNet + autoencoder + text conditioner + the noise schedule.

Corresponds to the original `ldm.models.diffusion.ddpm.LatentDiffusion`, inference half only.
Submodules sit under the checkpoint names `model.diffusion_model`, `first_stage_model` and
`cond_stage_model`; the schedule buffers keep the original names (`betas`, `alphas_cumprod`...).
"""

import logging

import torch
from torch import nn

from ..samplers.schedule import schedule_buffers

log = logging.getLogger(__name__)

# Latent pixels (h * w) above which decode_first_stage decodes in bands: beyond 1024x1024 images.
TILED_DECODE_ABOVE = 128 * 128

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

# LatentDiffusion/DDPM parameters that only matter for training or logging; accepted and ignored.
TRAINING_ONLY_PARAMS = (
    "base_learning_rate", "monitor", "num_timesteps_cond", "log_every_t", "first_stage_key", "cond_stage_key",
    "cond_stage_trainable", "use_ema", "scheduler_config", "loss_type", "ckpt_path", "ignore_keys",
    "load_only_unet", "use_positional_encodings", "learn_logvar", "logvar_init", "original_elbo_weight",
    "l_simple_weight", "make_it_fit", "reset_ema", "reset_num_ema_updates", "ucg_training", "use_fp16",
    "cond_stage_forward", "concat_mode", "image_size", "clip_denoised", "v_posterior", "given_betas",
    "cosine_s", "conditioning_key_drop", "scale_by_std", "load_ema", "unet_trainable", "embedding_reg_weight",
)


# What the UNet predicts: the noise eps, or v = sqrt(a) eps - sqrt(1 - a) x0 (SD 2.x 768-v models).
PARAMETERIZATIONS = ("eps", "v")


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` (checkpoint keys `model.diffusion_model.*`)."""

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, context):
        return self.diffusion_model(x, t, context)


class LatentDiffusion(nn.Module):
    """Latent diffusion with cross-attention text conditioning (SD v1 and 2.x), eps- or v-prediction."""

    def __init__(self, unet_config, first_stage_config, cond_stage_config, linear_start=0.00085, linear_end=0.012,
                 timesteps=1000, beta_schedule="linear", parameterization="eps", channels=4,
                 conditioning_key="crossattn", scale_factor=1.0, **training_only):
        super().__init__()
        from ..config import instantiate  # the config module knows which class each target names

        unknown = sorted(set(training_only) - set(TRAINING_ONLY_PARAMS))
        if unknown:
            raise ValueError(f"LatentDiffusion: unknown parameter(s): {', '.join(unknown)}")
        if beta_schedule != "linear":
            raise ValueError(f"LatentDiffusion: beta_schedule {beta_schedule!r} is not supported (SD v1 uses 'linear')")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"LatentDiffusion: parameterization {parameterization!r} is not supported "
                             f"(choose from {', '.join(PARAMETERIZATIONS)})")
        if conditioning_key != "crossattn":
            raise ValueError(f"LatentDiffusion: conditioning_key {conditioning_key!r} is not supported (SD v1 uses 'crossattn')")

        self.model = DiffusionWrapper(instantiate(unet_config))
        self.first_stage_model = instantiate(first_stage_config)
        self.cond_stage_model = instantiate(cond_stage_config)
        self.parameterization = parameterization  # what the UNet predicts: "eps" (noise) or "v" (SD 2.x 768-v)
        self.channels = channels
        self.scale_factor = float(scale_factor)
        self.linear_start, self.linear_end, self.num_timesteps = linear_start, linear_end, int(timesteps)
        self.reset_schedule()

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

    def apply_model(self, x_noisy, t, cond):
        """Noise prediction eps(x_t, t, text context)."""
        return self.model(x_noisy, t, cond)

    def get_learned_conditioning(self, prompts):
        return self.cond_stage_model(prompts)

    def encode_first_stage(self, x):
        """Images in [-1, 1] -> the posterior distribution over (unscaled) latents."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior, generator=None):
        return self.scale_factor * posterior.sample(generator)

    def decode_first_stage(self, z):
        """Scaled latents -> images in about [-1, 1]. Beyond 1024x1024 images, the autoencoder decodes one
        image at a time in bands of rows (`decode_tiled`: the same result, in less memory)."""
        z = z / self.scale_factor
        if z.shape[-2] * z.shape[-1] > TILED_DECODE_ABOVE and not torch.is_grad_enabled():
            return self.first_stage_model.decode_tiled(z)
        return self.first_stage_model.decode(z)
