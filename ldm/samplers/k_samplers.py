"""The k-diffusion family over the discrete v1 schedule: LMS, Euler, Euler ancestral, Heun, DPM++ 2M.

The solvers below work in the variance-exploding parameterisation: a denoiser D(x, sigma) -> x_0 and a
decreasing list of noise levels ending in 0. The `sample_*` entry points wrap the eps model as a denoiser,
pick the noise levels (diffusers' "linspace" spacing, or Karras et al.'s), scale the standard normal
start noise by sigma_max, and report latents to the callback in the model's variance-preserving scale.
"""

import math
from functools import partial

from numpy.polynomial import Polynomial

from . import schedule
from .common import check_no_eta, randn_like, time_tensor


def discrete_denoiser(eps_fn, sigma_to_t):
    """x_0 = x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma)), k-diffusion's discrete eps wrapper (Karras et al. 2022, Table 1)."""

    def denoise(x, sigma):
        t = time_tensor(sigma_to_t(sigma), x)
        return x - sigma * eps_fn(x / math.sqrt(sigma**2 + 1), t)

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


def dpmpp_2m(denoise, x, sigmas, *, callback=None):
    """DPM-Solver++(2M) in log-sigma time, first order on the first step and into sigma 0 (Lu et al. 2022, arXiv:2211.01095)."""
    old_denoised = None  # the multistep history
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sigmas[i] / sigmas[i + 1])
            d = denoised
            if old_denoised is not None:
                r = math.log(sigmas[i - 1] / sigmas[i]) / h
                d = denoised + (denoised - old_denoised) / (2 * r)
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * d
        old_denoised = denoised
        if callback is not None:
            callback(i, x, denoised)
    return x


def _run(solver, eps_fn, x_T, alphas_cumprod, steps, karras, callback, **kwargs):
    """The common entry: noise levels and denoiser for the discrete schedule, then `solver` from sigma_max to 0."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    train_sigmas = schedule.sigmas_from_alphas_cumprod(alphas_cumprod)
    if karras:
        sigmas = schedule.karras_sigmas(steps, train_sigmas[0], train_sigmas[-1])
        space = "log"  # t(sigma) as k-diffusion and diffusers do for Karras levels
    else:
        sigmas = schedule.linspace_sigmas(train_sigmas, steps)
        space = "linear"  # the exact inverse of how the levels were interpolated: t = 999, 946.42..., ...
    sigmas = sigmas.tolist()

    def sigma_to_t(sigma):
        return schedule.sigma_to_t(sigma, train_sigmas, space).item()

    vp_callback = None
    if callback is not None:

        def vp_callback(i, x, denoised):
            callback(i, x / math.sqrt(sigmas[i + 1] ** 2 + 1), denoised)

    denoise = discrete_denoiser(eps_fn, sigma_to_t)
    return solver(denoise, x_T * sigmas[0], sigmas, callback=vp_callback, **kwargs)


def sample_euler(eps_fn, x_T, alphas_cumprod, steps, *, generator=None, callback=None, eta=None, karras=False):
    """Euler (Karras et al. 2022) on the discrete v1 schedule."""
    check_no_eta("euler", eta)
    return _run(euler, eps_fn, x_T, alphas_cumprod, steps, karras, callback)


def sample_euler_ancestral(eps_fn, x_T, alphas_cumprod, steps, *, generator=None, callback=None, eta=None, karras=False):
    """Euler ancestral (k-diffusion) on the discrete v1 schedule; eta scales the fresh noise (default 1)."""
    eta = 1.0 if eta is None else float(eta)
    return _run(euler_ancestral, eps_fn, x_T, alphas_cumprod, steps, karras, callback, generator=generator, eta=eta)


def sample_heun(eps_fn, x_T, alphas_cumprod, steps, *, generator=None, callback=None, eta=None, karras=False):
    """Heun (Karras et al. 2022) on the discrete v1 schedule: 2 model evaluations per step, 1 on the last."""
    check_no_eta("heun", eta)
    return _run(heun, eps_fn, x_T, alphas_cumprod, steps, karras, callback)


def sample_lms(eps_fn, x_T, alphas_cumprod, steps, *, generator=None, callback=None, eta=None, karras=False):
    """Linear multistep, order 4 (k-diffusion) on the discrete v1 schedule."""
    check_no_eta("lms", eta)
    return _run(lms, eps_fn, x_T, alphas_cumprod, steps, karras, callback)


def sample_dpmpp_2m(eps_fn, x_T, alphas_cumprod, steps, *, generator=None, callback=None, eta=None, karras=False):
    """DPM-Solver++(2M) (Lu et al. 2022) on the k-diffusion sigma schedule of the discrete v1 model."""
    check_no_eta("dpmpp_2m", eta)
    return _run(dpmpp_2m, eps_fn, x_T, alphas_cumprod, steps, karras, callback)


sample_euler_karras = partial(sample_euler, karras=True)
sample_euler_ancestral_karras = partial(sample_euler_ancestral, karras=True)
sample_heun_karras = partial(sample_heun, karras=True)
sample_lms_karras = partial(sample_lms, karras=True)
sample_dpmpp_2m_karras = partial(sample_dpmpp_2m, karras=True)
