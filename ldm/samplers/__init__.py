"""Samplers: plain functions over a guided model, and the registry the command line lists.

Every sampler has the signature

    fn(model_fn, x_T, alphas_cumprod, steps, *, parameterization="eps", callback=None[, generator=None, eta=None])
        -> x_0

- model_fn(x, t): the (guided, see guidance.cfg_denoiser) model output, eps or v as `parameterization`
  says (see parameterization.py); x a latent [B, 4, h, w], t a float tensor [B] of (possibly fractional)
  discrete times in [0, 999];
- x_T: standard normal start noise; each sampler applies its own scale (see k_samplers.SPACINGS);
- alphas_cumprod: the model's training schedule (1000 values);
- callback(i, x_t, x0_pred): once per step, with the latent after step i (in the model's scale) and the
  clean latent predicted during it;
- generator and eta, only for the samplers that take an eta (`Sampler.takes_eta`): eta is DDIM's eta
  (default 0) or the ancestral noise scale of euler_a (default 1), and every noise draw comes from the
  explicit torch.Generator. The others are deterministic: `check_eta` refuses a nonzero eta for them.
- first_step (img2img, hires fix): None for a whole run from x_T as above; k in [0, steps] to run only the
  steps k, ..., steps - 1 of the sampler's own schedule, x_T then being the latent noised to the level
  `start_alpha(name, alphas_cumprod, steps, k)` gives: x_T = sqrt(a) x_0 + sqrt(1 - a) noise. DDIM and PLMS
  take the original img2img.py's level (one DDIM stride above the first time run), the k-diffusion family
  the first level it runs; `img2img_plan` turns a strength into (first_step, a).
"""

from dataclasses import dataclass
from typing import Callable

from . import ddim, k_samplers
from .ddim import sample_ddim, sample_plms
from .guidance import cfg_denoiser
from .parameterization import PARAMETERIZATIONS


@dataclass(frozen=True)
class Sampler:
    """A registry entry: the function, a one-line description, and how it uses noise."""

    name: str
    fn: Callable
    description: str
    stochastic: bool = False  # draws noise at every step by default, so it needs a generator (ddim only when eta > 0)
    takes_eta: bool = False  # takes eta and a generator: ddim and the ancestral samplers
    levels: str = "linspace"  # its step selection: "ddim", or a k_samplers.SPACINGS key (for start_alpha)


_KARRAS = " with the Karras et al. (2022) noise levels"

SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in [
        Sampler("ddim", sample_ddim, "DDIM (Song et al. 2021), the original's default; --ddim_eta > 0 adds noise",
                takes_eta=True, levels="ddim"),
        Sampler("plms", sample_plms, "PLMS (Liu et al. 2022) as the original --plms", levels="ddim"),
        Sampler("dpm_solver", k_samplers.sample_dpm_solver,
                "DPM-Solver++(2M), time-uniform steps, as the original --dpm_solver", levels="time_uniform"),
        Sampler("lms", k_samplers.sample_lms, "k-diffusion linear multistep, order 4"),
        Sampler("euler", k_samplers.sample_euler, "k-diffusion Euler (Karras et al. 2022)"),
        Sampler("euler_a", k_samplers.sample_euler_ancestral, "k-diffusion Euler ancestral: fresh noise every step",
                stochastic=True, takes_eta=True),
        Sampler("heun", k_samplers.sample_heun, "k-diffusion Heun (Karras et al. 2022), 2 evaluations per step"),
        Sampler("dpmpp_2m", k_samplers.sample_dpmpp_2m, "k-diffusion DPM-Solver++(2M) (Lu et al. 2022)"),
        Sampler("lms_karras", k_samplers.sample_lms_karras, "lms" + _KARRAS, levels="karras"),
        Sampler("euler_karras", k_samplers.sample_euler_karras, "euler" + _KARRAS, levels="karras"),
        Sampler("euler_a_karras", k_samplers.sample_euler_ancestral_karras, "euler_a" + _KARRAS,
                stochastic=True, takes_eta=True, levels="karras"),
        Sampler("heun_karras", k_samplers.sample_heun_karras, "heun" + _KARRAS, levels="karras"),
        Sampler("dpmpp_2m_karras", k_samplers.sample_dpmpp_2m_karras, "dpmpp_2m" + _KARRAS, levels="karras"),
    ]
}


def get_sampler(name: str) -> Sampler:
    """The registry entry called `name`; an unknown name is a ValueError listing the valid ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}") from None


def check_eta(name: str, eta: float | None) -> None:
    """ValueError unless `eta` suits the sampler `name`: None (its default), not negative, and nonzero only
    for the samplers that take one (the original's default --ddim_eta 0 is accepted everywhere)."""
    sampler = get_sampler(name)
    if eta is not None and eta < 0:
        raise ValueError(f"--ddim_eta must not be negative, got {eta}")
    if eta and not sampler.takes_eta:
        raise ValueError(f"sampler {name!r} is deterministic: --ddim_eta applies to ddim and the ancestral samplers")


def sample(name, model_fn, x_T, alphas_cumprod, steps, generator=None, callback=None, eta=None, parameterization="eps",
           first_step=None):
    """Run the sampler called `name` (see the module docstring for the arguments); returns the final latent."""
    sampler = get_sampler(name)
    check_eta(name, eta)
    noise = {"generator": generator, "eta": eta} if sampler.takes_eta else {}
    part = {"first_step": first_step} if first_step is not None else {}
    return sampler.fn(model_fn, x_T, alphas_cumprod, steps, parameterization=parameterization, callback=callback,
                      **noise, **part)


def start_alpha(name, alphas_cumprod, steps: int, first_step: int) -> float:
    """a_t of the latent the sampler `name` expects when started at `first_step` of its `steps`-step schedule."""
    levels = get_sampler(name).levels
    if levels == "ddim":
        return ddim.start_alpha(alphas_cumprod, steps, first_step)
    return k_samplers.start_alpha(alphas_cumprod, steps, first_step, levels)


def img2img_plan(name, alphas_cumprod, steps: int, strength: float) -> tuple[int, float]:
    """(first_step, a_t) of an img2img run at denoising `strength` in [0, 1]: as the original img2img.py,
    t_enc = int(strength * steps) steps run, the last t_enc of the schedule (first_step = steps - t_enc)."""
    if not 0 <= strength <= 1:
        raise ValueError(f"--strength must be between 0 and 1, got {strength}")
    first_step = steps - int(strength * steps)
    return first_step, start_alpha(name, alphas_cumprod, steps, first_step)


__all__ = ["PARAMETERIZATIONS", "SAMPLERS", "Sampler", "cfg_denoiser", "check_eta", "get_sampler", "img2img_plan",
           "sample", "start_alpha"]
