"""Noise schedules of the discrete v1 diffusion: the training schedule and the samplers' step selections.

Two parameterisations of the same process appear here:

- variance preserving (DDPM/DDIM): x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, with a_t = alphas_cumprod[t];
- variance exploding (k-diffusion, Karras et al. 2022): x = x_0 + sigma eps, sigma_t = sqrt((1 - a_t) / a_t),
  so that x_ve = x_vp / sqrt(a_t) = x_vp * sqrt(sigma^2 + 1).

Everything is computed in float64 on the CPU; samplers cast the scalars they need.
"""

import torch


def as_float64(alphas_cumprod) -> torch.Tensor:
    """The schedule as a float64 CPU tensor, whatever the caller holds (a float32 model buffer, numpy, a list)."""
    return torch.as_tensor(alphas_cumprod).detach().to(device="cpu", dtype=torch.float64)


def make_alphas_cumprod(linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000) -> torch.Tensor:
    """The v1 'linear' schedule of the original (betas linear in sqrt(beta), 'scaled_linear' in diffusers)."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The original's 'uniform' DDIM selection, ascending: stride num_train // steps, offset +1 (50 steps: 1, 21, ..., 981).

    The original builds range(0, num_train, stride) + 1, which yields more than `steps` entries when `steps`
    does not divide num_train, and indexes past the schedule (index 1000) when the last entry is 999
    (3, 999 and 1000 steps, among others). Here there are always exactly `steps` entries (the same as the
    original whenever steps divides num_train, and as diffusers' "leading" spacing with steps_offset=1),
    and the +1 offset is dropped only where it would leave the schedule (1000 steps: 0, 1, ..., 999).
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps}, got {steps}")
    stride = num_train_timesteps // steps
    offset = min(1, num_train_timesteps - 1 - (steps - 1) * stride)
    return torch.arange(steps, dtype=torch.long) * stride + offset


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of the points (xp, fp), xp increasing, held constant outside (as numpy.interp)."""
    x = torch.as_tensor(x, dtype=xp.dtype)
    i = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1) - 1
    w = ((x - xp[i]) / (xp[i + 1] - xp[i])).clamp(0.0, 1.0)
    return fp[i] + w * (fp[i + 1] - fp[i])


def sigmas_from_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    """The k-diffusion noise levels sigma_t = sqrt((1 - a_t) / a_t), one per training step, increasing in t."""
    ac = as_float64(alphas_cumprod)
    return ((1.0 - ac) / ac).sqrt()


def t_to_sigma(t, sigmas: torch.Tensor, space: str = "log") -> torch.Tensor:
    """Noise level at a (fractional) discrete time t, interpolating the training sigmas in log-sigma
    (k-diffusion's DiscreteSchedule) or in sigma itself (space="linear", diffusers' discrete schedulers)."""
    steps = torch.arange(len(sigmas), dtype=torch.float64)
    if space == "log":
        return interp(t, steps, sigmas.log()).exp()
    if space == "linear":
        return interp(t, steps, sigmas)
    raise ValueError(f"space must be 'log' or 'linear', got {space!r}")


def sigma_to_t(sigma, sigmas: torch.Tensor, space: str = "log") -> torch.Tensor:
    """The inverse of t_to_sigma: the discrete time of a noise level, clamped to [0, len(sigmas) - 1]."""
    steps = torch.arange(len(sigmas), dtype=torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if space == "log":
        return interp(sigma.log(), sigmas.log(), steps)
    if space == "linear":
        return interp(sigma, sigmas, steps)
    raise ValueError(f"space must be 'log' or 'linear', got {space!r}")


def linspace_sigmas(sigmas: torch.Tensor, n: int) -> torch.Tensor:
    """n noise levels at times linspace(T - 1, 0, n), interpolated in sigma, then 0, as diffusers'
    LMSDiscreteScheduler with timestep_spacing="linspace" (20 steps: t = 999, 946.4211, ..., 52.5789, 0)."""
    t = torch.linspace(len(sigmas) - 1, 0, n, dtype=torch.float64)
    return torch.cat([t_to_sigma(t, sigmas, space="linear"), t.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n noise levels evenly spaced in sigma^(1/rho) from sigma_max to sigma_min, then 0 (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = float(sigma_max) ** (1 / rho), float(sigma_min) ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def vp_log_alpha(t, alphas_cumprod) -> torch.Tensor:
    """log sqrt(a_t) at a (fractional) discrete time t, linear in t between training steps, as the original
    DPM-Solver's NoiseScheduleVP('discrete') (Lu et al. 2022)."""
    ac = as_float64(alphas_cumprod)
    return interp(t, torch.arange(len(ac), dtype=torch.float64), 0.5 * ac.log())
