"""The k-diffusion family over the discrete schedule: LMS, Euler, Euler ancestral, Heun, DPM-Solver++(2M).

The solvers below work in the variance-exploding parameterisation: a denoiser D(x, sigma) -> x_0 and a
decreasing list of noise levels. The `sample_*` entry points wrap the model (eps or v) as a denoiser, pick
the noise levels (see `SPACINGS`), scale the standard normal start noise, and report latents to the callback
(and return the result) in the model's variance-preserving scale.
"""

import math
from functools import partial
from typing import Callable, NamedTuple

from numpy.polynomial import Polynomial

from . import schedule
from .common import randn_like, time_tensor
from .parameterization import check_parameterization, denoiser_scalings


def discrete_denoiser(model_fn, sigma_to_t, parameterization="eps"):
    """D(x, sigma) = c_skip x + c_out model(x / sqrt(sigma^2 + 1), t(sigma)), k-diffusion's discrete-time wrapper
    (for eps, x - sigma * eps; Karras et al. 2022, Table 1)."""
    check_parameterization(parameterization)

    def denoise(x, sigma):
        t = time_tensor(sigma_to_t(sigma), x)
        c_skip, c_out = denoiser_scalings(sigma, parameterization)
        return c_skip * x + c_out * model_fn(x / math.sqrt(sigma**2 + 1), t)

    return denoise


def euler(denoise, x, sigmas, *, callback=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, arXiv:2206.00364, Algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback(i, x, denoised)
    return x


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma_from -> sigma_to into a deterministic one to sigma_down and fresh noise of std sigma_up."""
    if sigma_to == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def euler_ancestral(denoise, x, sigmas, *, generator, eta=1.0, callback=None):
    """Euler ancestral: an Euler step to sigma_down, then fresh noise of std sigma_up (k-diffusion, after Ho et al. 2020)."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigma_down - sigmas[i])
        if sigma_up > 0:
            x = x + randn_like(x, generator) * sigma_up
        if callback is not None:
            callback(i, x, denoised)
    return x


def heun(denoise, x, sigmas, *, callback=None):
    """Heun's second-order method, Euler on the last step to sigma 0 (Karras et al. 2022, Algorithm 1)."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = (x_euler - denoise(x_euler, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d_next) / 2 * dt
        if callback is not None:
            callback(i, x, denoised)
    return x


def lms_coefficient(sigmas, i: int, j: int, order: int) -> float:
    """Weight of the derivative at sigmas[i - j]: its Lagrange basis polynomial over sigmas[i - order + 1 .. i],
    integrated from sigmas[i] to sigmas[i + 1] (exactly, the basis being a polynomial)."""
    nodes = [sigmas[i - k] for k in range(order) if k != j]
    basis = math.prod((Polynomial([-s, 1.0]) / (sigmas[i - j] - s) for s in nodes), start=Polynomial([1.0]))
    integral = basis.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


def lms(denoise, x, sigmas, *, order=4, callback=None):
    """Linear multistep on the probability-flow ODE, up to order 4 (k-diffusion; Karras et al. 2022)."""
    ds = []  # derivatives at the previous noise levels, oldest first
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        ds = (ds + [(x - denoised) / sigmas[i]])[-order:]
        cur_order = len(ds)
        for j, d in enumerate(reversed(ds)):
            x = x + lms_coefficient(sigmas, i, j, cur_order) * d
        if callback is not None:
            callback(i, x, denoised)
    return x


def dpmpp_2m(denoise, x, sigmas, *, lower_order_final=False, callback=None):
    """DPM-Solver++(2M) in log-sigma time (Lu et al. 2022, arXiv:2211.01095, Algorithm 2): first order on the
    first step, into sigma 0, and on the last step when `lower_order_final`."""
    old_denoised = None  # the multistep history
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sigmas[i] / sigmas[i + 1])  # the step in lambda = -log sigma, the half log-SNR
            d = denoised  # DPM-Solver++(1), i.e. DDIM
            if old_denoised is not None and not (lower_order_final and i == len(sigmas) - 2):
                r = math.log(sigmas[i - 1] / sigmas[i]) / h
                d = denoised + (denoised - old_denoised) / (2 * r)  # D_i of Algorithm 2
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * d
        old_denoised = denoised
        if callback is not None:
            callback(i, x, denoised)
    return x


class Spacing(NamedTuple):
    """How a sampler picks its noise levels from the training sigmas."""

    levels: Callable  # (train_sigmas, steps) -> decreasing noise levels, float64
    space: str  # the interpolation that t(sigma) inverts (see schedule.t_to_sigma)
    start_scale: Callable  # sigma_max -> the factor on the standard normal x_T


SPACINGS = {
    # diffusers' "linspace" spacing, t(sigma) the exact inverse of how the levels were interpolated
    # (t = 999, 946.42..., ...); k-diffusion's start noise x_T * sigma_max.
    "linspace": Spacing(schedule.linspace_sigmas, "linear", lambda s: s),
    # Karras et al. (2022); t(sigma) in log-sigma, as k-diffusion and diffusers do for these levels.
    "karras": Spacing(lambda train, n: schedule.karras_sigmas(n, train[0], train[-1]), "log", lambda s: s),
    # The original --dpm_solver: uniform in t from 999 down to 0 (sigma_min, no final denoising), starting
    # from x_T itself in the variance-preserving scale.
    "time_uniform": Spacing(schedule.time_uniform_sigmas, "vp", lambda s: math.sqrt(s**2 + 1)),
}


def _levels(alphas_cumprod, steps, spacing):
    """(the training sigmas, the sampler's decreasing noise levels as floats)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    train_sigmas = schedule.sigmas_from_alphas_cumprod(alphas_cumprod)
    return train_sigmas, SPACINGS[spacing].levels(train_sigmas, steps).tolist()


def start_alpha(alphas_cumprod, steps: int, first_step: int, spacing: str = "linspace") -> float:
    """a_t = 1 / (sigma^2 + 1) of the level a part-way run from `first_step` starts at."""
    _, sigmas = _levels(alphas_cumprod, steps, spacing)
    if not 0 <= first_step <= steps:
        raise ValueError(f"first_step must be between 0 and {steps}, got {first_step}")
    return 1.0 / (sigmas[first_step] ** 2 + 1)


def _run(solver, model_fn, x_T, alphas_cumprod, steps, spacing, parameterization, callback, first_step=None,
         **kwargs):
    """The common entry: noise levels and denoiser for the discrete schedule, then `solver` from sigma_max down
    (from sigmas[first_step], x_T then the variance-preserving latent there, when first_step is given)."""
    train_sigmas, sigmas = _levels(alphas_cumprod, steps, spacing)
    spacing = SPACINGS[spacing]
    if first_step is not None:
        sigmas = sigmas[first_step:]
        x_start = x_T * math.sqrt(sigmas[0] ** 2 + 1)  # variance preserving -> exploding
    else:
        x_start = x_T * spacing.start_scale(sigmas[0])

    def sigma_to_t(sigma):
        return schedule.sigma_to_t(sigma, train_sigmas, spacing.space).item()

    vp_callback = None
    if callback is not None:

        def vp_callback(i, x, denoised):
            callback(i, x / math.sqrt(sigmas[i + 1] ** 2 + 1), denoised)

    denoise = discrete_denoiser(model_fn, sigma_to_t, parameterization)
    if len(sigmas) < 2:  # first_step == steps: nothing left to run
        return x_T
    x = solver(denoise, x_start, sigmas, callback=vp_callback, **kwargs)
    return x / math.sqrt(sigmas[-1] ** 2 + 1)


def sample_euler(model_fn, x_T, alphas_cumprod, steps, *, parameterization="eps", callback=None, spacing="linspace",
                first_step=None):
    """Euler (Karras et al. 2022) on the discrete schedule."""
    return _run(euler, model_fn, x_T, alphas_cumprod, steps, spacing, parameterization, callback, first_step)


def sample_euler_ancestral(model_fn, x_T, alphas_cumprod, steps, *, parameterization="eps", generator=None,
                           callback=None, eta=None, spacing="linspace", first_step=None):
    """Euler ancestral (k-diffusion) on the discrete schedule; eta scales the fresh noise (default 1)."""
    eta = 1.0 if eta is None else float(eta)
    return _run(euler_ancestral, model_fn, x_T, alphas_cumprod, steps, spacing, parameterization, callback,
                first_step, generator=generator, eta=eta)


def sample_heun(model_fn, x_T, alphas_cumprod, steps, *, parameterization="eps", callback=None, spacing="linspace",
                first_step=None):
    """Heun (Karras et al. 2022) on the discrete schedule: 2 model evaluations per step, 1 on the last."""
    return _run(heun, model_fn, x_T, alphas_cumprod, steps, spacing, parameterization, callback, first_step)


def sample_lms(model_fn, x_T, alphas_cumprod, steps, *, parameterization="eps", callback=None, spacing="linspace",
                first_step=None):
    """Linear multistep, order 4 (k-diffusion) on the discrete schedule."""
    return _run(lms, model_fn, x_T, alphas_cumprod, steps, spacing, parameterization, callback, first_step)


def sample_dpmpp_2m(model_fn, x_T, alphas_cumprod, steps, *, parameterization="eps", callback=None,
                    spacing="linspace", first_step=None):
    """DPM-Solver++(2M) (Lu et al. 2022) on the discrete schedule. As the original's --dpm_solver, the last
    step is first order below 15 steps (a step into sigma 0 always is)."""
    return _run(dpmpp_2m, model_fn, x_T, alphas_cumprod, steps, spacing, parameterization, callback,
                first_step, lower_order_final=steps < 15)


sample_euler_karras = partial(sample_euler, spacing="karras")
sample_euler_ancestral_karras = partial(sample_euler_ancestral, spacing="karras")
sample_heun_karras = partial(sample_heun, spacing="karras")
sample_lms_karras = partial(sample_lms, spacing="karras")
sample_dpmpp_2m_karras = partial(sample_dpmpp_2m, spacing="karras")
# The original --dpm_solver: the same solver over time-uniform steps, ending at t = 0 (sigma_min).
sample_dpm_solver = partial(sample_dpmpp_2m, spacing="time_uniform")
