"""Samplers: plain functions over a guided denoiser, and the registry the command line lists.

Every sampler has one signature:

    fn(eps_fn, x_T, alphas_cumprod, steps, *, generator=None, callback=None, eta=None) -> x_0

- eps_fn(x, t) -> eps: the (guided, see guidance.cfg_denoiser) noise prediction; x a latent [B, 4, h, w],
  t a float tensor [B] of (possibly fractional) discrete times in [0, 999];
- x_T: standard normal start noise; each sampler applies its own scale (k-diffusion ones multiply by sigma_max);
- alphas_cumprod: the model's training schedule (1000 values);
- generator: the torch.Generator every noise draw comes from (needed by stochastic samplers only);
- callback(i, x_t, x0_pred): once per step, with the latent after step i (in the model's scale) and the
  clean latent predicted during it;
- eta: DDIM's eta (default 0) or the ancestral noise scale of euler_a (default 1); deterministic
  samplers accept only None or 0.
"""

from dataclasses import dataclass
from typing import Callable

from . import k_samplers
from .ddim import sample_ddim, sample_plms
from .dpm_solver import sample_dpm_solver
from .guidance import cfg_denoiser


@dataclass(frozen=True)
class Sampler:
    """A registry entry: the function, a one-line description, and what a step costs."""

    name: str
    fn: Callable
    description: str
    stochastic: bool = False  # draws noise at every step, so it needs a generator (ddim only when eta > 0)
    evals_per_step: int = 1  # model evaluations per step
    extra_evals: int = 0  # evaluations beyond steps * evals_per_step (PLMS warm-up +1, Heun's last step -1)

    def model_evals(self, steps: int) -> int:
        """Model evaluations (guided denoiser calls) of a run of `steps` steps."""
        return steps * self.evals_per_step + self.extra_evals


_KARRAS = " with the Karras et al. (2022) noise levels"

SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in [
        Sampler("ddim", sample_ddim, "DDIM (Song et al. 2021), the original's default; --ddim_eta > 0 adds noise"),
        Sampler("plms", sample_plms, "PLMS (Liu et al. 2022) as the original --plms", extra_evals=1),
        Sampler("dpm_solver", sample_dpm_solver, "DPM-Solver++(2M), time-uniform steps, as the original --dpm_solver"),
        Sampler("lms", k_samplers.sample_lms, "k-diffusion linear multistep, order 4"),
        Sampler("euler", k_samplers.sample_euler, "k-diffusion Euler (Karras et al. 2022)"),
        Sampler("euler_a", k_samplers.sample_euler_ancestral, "k-diffusion Euler ancestral: fresh noise every step",
                stochastic=True),
        Sampler("heun", k_samplers.sample_heun, "k-diffusion Heun (Karras et al. 2022), 2 evaluations per step",
                evals_per_step=2, extra_evals=-1),
        Sampler("dpmpp_2m", k_samplers.sample_dpmpp_2m, "k-diffusion DPM-Solver++(2M) (Lu et al. 2022)"),
        Sampler("lms_karras", k_samplers.sample_lms_karras, "lms" + _KARRAS),
        Sampler("euler_karras", k_samplers.sample_euler_karras, "euler" + _KARRAS),
        Sampler("euler_a_karras", k_samplers.sample_euler_ancestral_karras, "euler_a" + _KARRAS, stochastic=True),
        Sampler("heun_karras", k_samplers.sample_heun_karras, "heun" + _KARRAS, evals_per_step=2, extra_evals=-1),
        Sampler("dpmpp_2m_karras", k_samplers.sample_dpmpp_2m_karras, "dpmpp_2m" + _KARRAS),
    ]
}


def get_sampler(name: str) -> Sampler:
    """The registry entry called `name`; an unknown name is a ValueError listing the valid ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}") from None


def sample(name, eps_fn, x_T, alphas_cumprod, steps, generator=None, callback=None, eta=None):
    """Run the sampler called `name` (see the module docstring for the arguments); returns the final latent."""
    return get_sampler(name).fn(eps_fn, x_T, alphas_cumprod, steps, generator=generator, callback=callback, eta=eta)


__all__ = ["SAMPLERS", "Sampler", "cfg_denoiser", "get_sampler", "sample"]
