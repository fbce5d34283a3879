"""DDIM and PLMS over the original's DDIM timestep selection (variance-preserving latents, start noise scale 1).

Both step from the selected time t_i to the previous selected one t_{i-1}; the last step lands on
alphas_cumprod[0] (not on a_0 = 1), as the original's ddim_alphas_prev and diffusers' set_alpha_to_one=False.

Started part-way (img2img, `first_step=k`), they run the last steps - k steps of the same schedule from a
latent noised to `start_alpha`: as the original img2img.py, one DDIM stride *above* the first time run (its
stochastic_encode noises to ddim_alphas[t_enc], its decode then runs ddim_timesteps[:t_enc] from the top).
"""

import math

import torch

from . import schedule
from .common import randn_like, time_tensor
from .parameterization import check_parameterization, eps_and_x0


def _ddim_coefficients(alphas_cumprod, steps: int, eta: float):
    """Per step, from the noisiest: (t, a_t, a_prev, sigma_t) as python floats (DDIM, Song et al. 2021, eq. 16)."""
    ac = schedule.as_float64(alphas_cumprod)
    ts = schedule.ddim_timesteps(steps, len(ac)).flip(0)  # descending
    a = ac[ts]
    a_prev = torch.cat([ac[ts[1:]], ac[:1]])
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    return list(zip(ts.tolist(), a.tolist(), a_prev.tolist(), sigma.tolist()))


def start_alpha(alphas_cumprod, steps: int, first_step: int) -> float:
    """a_t of the latent a part-way run from `first_step` starts from: the original img2img.py's
    `stochastic_encode` level ddim_alphas[t_enc] with t_enc = steps - first_step, i.e. the DDIM time one
    stride above the first one run. The original indexes past its schedule at t_enc = steps (strength 1);
    here that level continues the schedule by one stride, capped at the last training time."""
    ac = schedule.as_float64(alphas_cumprod)
    ts = schedule.ddim_timesteps(steps, len(ac))
    t_enc = steps - first_step
    if not 0 <= t_enc <= steps:
        raise ValueError(f"first_step must be between 0 and {steps}, got {first_step}")
    t = ts[t_enc].item() if t_enc < steps else min(ts[-1].item() + len(ac) // steps, len(ac) - 1)
    return ac[t].item()


def _ddim_step(eps, pred_x0, a_prev, sigma_t, noise=None):
    """One DDIM update to x_{t_prev} from the predicted noise and clean latent (Song et al. 2021, eq. 12)."""
    x_prev = math.sqrt(a_prev) * pred_x0 + math.sqrt(max(1 - a_prev - sigma_t**2, 0.0)) * eps
    if noise is not None:
        x_prev = x_prev + sigma_t * noise
    return x_prev


def sample_ddim(model_fn, x_T, alphas_cumprod, steps, *, parameterization="eps", generator=None, callback=None,
                eta=None, first_step=None):
    """DDIM, deterministic at eta=0, ancestral-like noise for eta>0 (Song et al. 2021, arXiv:2010.02502)."""
    check_parameterization(parameterization)
    eta = 0.0 if eta is None else float(eta)
    x = x_T
    for i, (t, a_t, a_prev, sigma_t) in enumerate(_ddim_coefficients(alphas_cumprod, steps, eta)[first_step or 0:]):
        eps, pred_x0 = eps_and_x0(model_fn(x, time_tensor(t, x)), x, a_t, parameterization)
        noise = randn_like(x, generator) if eta > 0 else None
        x = _ddim_step(eps, pred_x0, a_prev, sigma_t, noise)
        if callback is not None:
            callback(i, x, pred_x0)
    return x


def sample_plms(model_fn, x_T, alphas_cumprod, steps, *, parameterization="eps", callback=None, first_step=None):
    """Pseudo linear multistep as the CompVis PLMSSampler (PNDM, Liu et al. 2022, arXiv:2202.09778, eq. 12).

    The first step warms up with a pseudo improved Euler step: a DDIM step with eps(x, t), a second
    evaluation at the next timestep from that result, then the real step with the average of the two.
    Later steps combine the current eps with up to three stored ones (Adams-Bashforth, orders 2 to 4).
    A v model's output is turned into eps at each evaluation's own x_t and a_t.
    """
    check_parameterization(parameterization)
    coeffs = _ddim_coefficients(alphas_cumprod, steps, 0.0)[first_step or 0:]  # part-way: warm up at first_step

    def eps_at(x, t, a_t):
        return eps_and_x0(model_fn(x, time_tensor(t, x)), x, a_t, parameterization)[0]

    x = x_T
    old_eps = []  # eps(x_t, t) of the previous steps, oldest first
    for i, (t, a_t, a_prev, _) in enumerate(coeffs):
        eps = eps_at(x, t, a_t)
        if len(old_eps) == 0:
            t_next, a_next = coeffs[min(i + 1, len(coeffs) - 1)][:2]  # the original's t_next: itself at the last step
            x_next = _ddim_step(*eps_and_x0(eps, x, a_t), a_prev, 0.0)
            eps_prime = (eps + eps_at(x_next, t_next, a_next)) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        eps_prime, pred_x0 = eps_and_x0(eps_prime, x, a_t)
        x = _ddim_step(eps_prime, pred_x0, a_prev, 0.0)
        old_eps = (old_eps + [eps])[-3:]
        if callback is not None:
            callback(i, x, pred_x0)
    return x
