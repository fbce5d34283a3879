"""Noise schedules of the discrete v1 diffusion: the training schedule and the samplers' step selections.

Two parameterisations of the same process appear here:

- variance preserving (DDPM/DDIM): x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, with a_t = alphas_cumprod[t];
- variance exploding (k-diffusion, Karras et al. 2022): x = x_0 + sigma eps, sigma_t = sqrt((1 - a_t) / a_t),
  so that x_ve = x_vp / sqrt(a_t) = x_vp * sqrt(sigma^2 + 1).

Everything is computed in float64 on the CPU; samplers cast the scalars they need, and the model keeps
float32 copies of the training schedule as buffers (`schedule_buffers`).
"""

import torch


def as_float64(alphas_cumprod) -> torch.Tensor:
    """The schedule as a float64 CPU tensor, whatever the caller holds (a float32 model buffer, numpy, a list)."""
    return torch.as_tensor(alphas_cumprod).detach().to(device="cpu", dtype=torch.float64)


def linear_betas(linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000) -> torch.Tensor:
    """The v1 'linear' schedule of the original: betas linear in sqrt(beta) ('scaled_linear' in diffusers)."""
    return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2


def make_alphas_cumprod(linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000) -> torch.Tensor:
    """a_t = prod_{s <= t} (1 - beta_s) of the v1 'linear' schedule, float64."""
    return torch.cumprod(1.0 - linear_betas(linear_start, linear_end, timesteps), dim=0)


def schedule_buffers(linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000) -> dict:
    """Every schedule quantity the original's register_schedule keeps as a buffer, in its order, float64
    (the model casts them to float32, as the original does after computing them in float64 numpy)."""
    betas = linear_betas(linear_start, linear_end, timesteps)
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)  # the DDPM posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7)
    return {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }


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


def _interpolated(sigmas: torch.Tensor, space: str) -> torch.Tensor:
    """The training sigmas transformed to the quantity that is piecewise linear in t between training steps."""
    if space == "log":
        return sigmas.log()  # k-diffusion's DiscreteSchedule
    if space == "linear":
        return sigmas  # diffusers' discrete schedulers
    if space == "vp":
        return torch.log1p(sigmas**2)  # -log a_t: log sqrt(a_t) linear in t, the original DPM-Solver's NoiseScheduleVP
    raise ValueError(f"space must be 'log', 'linear' or 'vp', got {space!r}")


def _from_interpolated(y: torch.Tensor, space: str) -> torch.Tensor:
    """The inverse of _interpolated."""
    if space == "log":
        return y.exp()
    if space == "linear":
        return y
    return torch.expm1(y).sqrt()


def t_to_sigma(t, sigmas: torch.Tensor, space: str = "log") -> torch.Tensor:
    """Noise level at a (fractional) discrete time t, interpolating the training sigmas in log-sigma
    (space="log", k-diffusion), in sigma itself (space="linear", diffusers' discrete schedulers) or in
    log sqrt(a_t) (space="vp", the original DPM-Solver's discrete schedule)."""
    steps = torch.arange(len(sigmas), dtype=torch.float64)
    return _from_interpolated(interp(t, steps, _interpolated(sigmas, space)), space)


def sigma_to_t(sigma, sigmas: torch.Tensor, space: str = "log") -> torch.Tensor:
    """The inverse of t_to_sigma: the discrete time of a noise level, clamped to [0, len(sigmas) - 1]."""
    steps = torch.arange(len(sigmas), dtype=torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return interp(_interpolated(sigma, space), _interpolated(sigmas, space), steps)


def linspace_sigmas(sigmas: torch.Tensor, n: int) -> torch.Tensor:
    """n noise levels at times linspace(T - 1, 0, n), interpolated in sigma, then 0, as diffusers'
    LMSDiscreteScheduler with timestep_spacing="linspace" (20 steps: t = 999, 946.4211, ..., 52.5789, 0)."""
    t = torch.linspace(len(sigmas) - 1, 0, n, dtype=torch.float64)
    return torch.cat([t_to_sigma(t, sigmas, space="linear"), t.new_zeros(1)])


def time_uniform_sigmas(sigmas: torch.Tensor, n: int) -> torch.Tensor:
    """n + 1 noise levels at times linspace(T - 1, 0, n + 1), interpolated in log sqrt(a_t), ending at sigma_min
    (not 0): the original `--dpm_solver` steps (continuous times (t + 1) / 1000 uniform from 1 to 1/1000)."""
    t = torch.linspace(len(sigmas) - 1, 0, n + 1, dtype=torch.float64)
    return t_to_sigma(t, sigmas, space="vp")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n noise levels evenly spaced in sigma^(1/rho) from sigma_max to sigma_min, then 0 (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = float(sigma_max) ** (1 / rho), float(sigma_min) ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])
