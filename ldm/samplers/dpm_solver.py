"""DPM-Solver++(2M) as the original `--dpm_solver` flag: data prediction, multistep order 2, time-uniform steps.

The original maps the 1000 training steps to continuous times t_c = (n + 1) / 1000 and steps uniformly
in t_c from 1 to 1/1000, which is uniform in the discrete time n from 999 to 0. log sqrt(a) is linear in
time between training steps. The result is the latent at the last time (n = 0), with no final denoising.
"""

import math

import torch

from . import schedule
from .common import check_no_eta, time_tensor


def sample_dpm_solver(eps_fn, x_T, alphas_cumprod, steps, *, generator=None, callback=None, eta=None):
    """DPM-Solver++(2M), multistep data prediction (Lu et al. 2022, arXiv:2211.01095, Algorithm 2)."""
    check_no_eta("dpm_solver", eta)
    ac = schedule.as_float64(alphas_cumprod)
    t = torch.linspace(len(ac) - 1, 0, steps + 1, dtype=torch.float64)
    log_alpha = schedule.vp_log_alpha(t, ac)
    sigma = (-torch.expm1(2 * log_alpha)).sqrt()  # sqrt(1 - alpha^2)
    lam = log_alpha - sigma.log()  # half log-SNR, the solver's time variable
    t, alpha, sigma, lam = t.tolist(), log_alpha.exp().tolist(), sigma.tolist(), lam.tolist()
    # As the original (lower_order_final): the last step is first order, but only for short runs.
    lower_order_final = steps < 15

    x = x_T
    x0_prev = None  # data prediction of the previous step, the multistep history
    for i in range(steps):
        x0 = (x - sigma[i] * eps_fn(x, time_tensor(t[i], x))) / alpha[i]
        h = lam[i + 1] - lam[i]
        if x0_prev is None or (lower_order_final and i == steps - 1):
            d = x0  # DPM-Solver++(1), i.e. DDIM
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = x0 + (x0 - x0_prev) / (2 * r)  # D_i of Algorithm 2
        x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(-h)) * d
        x0_prev = x0
        if callback is not None:
            callback(i, x, x0)
    return x
