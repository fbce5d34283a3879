"""The model's parameterisation: what the network predicts, turned into what the samplers work with.

An "eps" model predicts the noise eps of x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (Ho et al. 2020). A "v" model
(SD 2.x 768-v) predicts the velocity v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 (Salimans & Ho 2022, arXiv:2202.00512,
section 4), from which

    eps = sqrt(a_t) v + sqrt(1 - a_t) x_t,        x_0 = sqrt(a_t) x_t - sqrt(1 - a_t) v.

The samplers call the (guided) model, then these functions: DDIM and PLMS in the variance-preserving scale
with a_t, the k-diffusion family in the variance-exploding scale with sigma (a_t = 1 / (sigma^2 + 1)).
Each converts at the exact noise level it stepped to, so no a_t is re-interpolated from a fractional t.
"""

import math

PARAMETERIZATIONS = ("eps", "v")


def check_parameterization(parameterization: str) -> None:
    """ValueError unless `parameterization` is one the samplers know."""
    if parameterization not in PARAMETERIZATIONS:
        raise _unknown(parameterization)


def _unknown(parameterization) -> ValueError:
    return ValueError(f"parameterization must be one of {', '.join(PARAMETERIZATIONS)}, got {parameterization!r}")


def eps_and_x0(output, x_t, alpha_bar: float, parameterization: str = "eps"):
    """(eps, x_0) predicted by the model's `output` at the variance-preserving latent x_t with a_t = alpha_bar."""
    a, b = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    if parameterization == "eps":
        return output, (x_t - b * output) / a
    if parameterization == "v":
        return a * output + b * x_t, a * x_t - b * output
    raise _unknown(parameterization)


def denoiser_scalings(sigma: float, parameterization: str = "eps") -> tuple[float, float]:
    """(c_skip, c_out) with x_0 = c_skip * x + c_out * output, for the variance-exploding latent x = x_t / sqrt(a_t)
    at noise level sigma (Karras et al. 2022, arXiv:2206.00364, Table 1; v: k-diffusion's VDenoiser)."""
    if parameterization == "eps":
        return 1.0, -sigma
    if parameterization == "v":
        return 1.0 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)
    raise _unknown(parameterization)
