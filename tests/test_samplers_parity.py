"""Trajectory parity of our samplers with diffusers' schedulers: same model, start noise, conditioning, guidance.

Every test runs over the models of MODELS (`model(x, t, cond) -> eps or v`, float64, with its parameterisation:
diffusers' schedulers get the matching `prediction_type`); to add a model, add a factory there. A float32
network can be wrapped as `lambda x, t, c: net(x.float(), t.float(), c.float()).double()`.
"""

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from torch import nn

from helpers import fast_first
from ldm.samplers import sample, schedule
from ldm.samplers.guidance import cfg_denoiser

TOL = 1e-4  # max abs difference / max abs value of the final latents
SV1 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ORIGINAL = dict(SV1, steps_offset=1, set_alpha_to_one=False)  # the original's DDIM/PLMS schedule


def analytic_eps_model():
    """Exact eps prediction for Gaussian data x_0 ~ N(mu(cond), 0.25), plus a small time-dependent nonlinearity."""
    ac = schedule.make_alphas_cumprod()

    def eps_model(x, t, cond):
        a = schedule.interp(t.double().cpu(), torch.arange(1000.0, dtype=torch.float64), ac)
        a = a.to(x)[:, None, None, None]
        mu = cond.mean(dim=(1, 2))[:, None, None, None].to(x)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (0.25 * a + 1 - a)
        return eps + 0.05 * torch.tanh(x * torch.cos(t.to(x)[:, None, None, None] / 150))

    return eps_model


class TinyEpsNet(nn.Module):
    """A small random convolutional eps network with a sinusoidal time embedding and pooled conditioning."""

    def __init__(self, channels=4, hidden=16, context_dim=8, time_dim=32, seed=0):
        super().__init__()
        self.time_dim = time_dim
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, hidden)
        self.context_proj = nn.Linear(context_dim, hidden)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))

    def forward(self, x, t, cond):
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=x.dtype) / half)
        angles = t.to(x.dtype)[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, time_dim)
        h = self.conv_in(x) + self.time_proj(emb)[:, :, None, None] + self.context_proj(cond.mean(1))[:, :, None, None]
        h = self.conv_mid(nn.functional.silu(h))
        return self.conv_out(nn.functional.silu(h))


def analytic_v_model():
    """The v = sqrt(a) eps - sqrt(1 - a) x_0 of analytic_eps_model's Gaussian data, plus a nonlinearity of its own."""
    ac = schedule.make_alphas_cumprod()

    def v_model(x, t, cond):
        a = schedule.interp(t.double().cpu(), torch.arange(1000.0, dtype=torch.float64), ac)
        a = a.to(x)[:, None, None, None]
        mu = cond.mean(dim=(1, 2))[:, None, None, None].to(x)
        x0 = (0.25 * a.sqrt() * x + (1 - a) * mu) / (0.25 * a + 1 - a)  # E[x_0 | x_t]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        wobble = 0.05 * torch.sin(x * torch.cos(t.to(x)[:, None, None, None] / 120))
        return a.sqrt() * eps - (1 - a).sqrt() * x0 + wobble

    return v_model


def tiny_net_eps_model():
    return TinyEpsNet().double().eval().requires_grad_(False)


def reduced_unet_eps_model():
    """Our real UNet class at reduced width and depth, random weights, context 8."""
    from helpers import randomize_, tiny_config
    from ldm.config import instantiate

    node = tiny_config()["model"]["params"]["unet_config"]
    node["params"].update(context_dim=8, num_res_blocks=1, channel_mult=[1, 2], attention_resolutions=[1, 2])
    net = randomize_(instantiate(node), seed=5).eval().requires_grad_(False)
    return lambda x, t, c: net(x.float(), t.float(), c.float()).double()  # float32 convs are much faster


# name -> (factory, the parameterisation its output is read in). The random tiny network serves as both.
MODELS = {
    "analytic": (analytic_eps_model, "eps"),
    "tiny_net": (tiny_net_eps_model, "eps"),
    "reduced_unet": (reduced_unet_eps_model, "eps"),
    "analytic_v": (analytic_v_model, "v"),
    "tiny_net_v": (tiny_net_eps_model, "v"),
}
PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction"}  # diffusers' name of each parameterisation


@dataclass
class Problem:
    """Guided model (scale 7.5, a 'negative prompt' uncond), standard normal start noise, batch 2, float64."""

    model_fn: Callable
    x_T: torch.Tensor
    parameterization: str

    @property
    def prediction_type(self) -> str:
        return PREDICTION_TYPE[self.parameterization]

    def sample(self, name, model_fn=None, x_T=None, *args, **kwargs):
        """Our sampler `name` on this problem (or on a float32 variant of its model and start noise)."""
        model_fn = self.model_fn if model_fn is None else model_fn
        x_T = self.x_T if x_T is None else x_T
        return sample(name, model_fn, x_T, *args, parameterization=self.parameterization, **kwargs)


# The reduced UNet costs about 1 s a test: full runs (CI) only; the sampler code is the same for every model.
@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.slow) if name == "reduced_unet" else name
                                        for name in sorted(MODELS)])
def problem(request):
    factory, parameterization = MODELS[request.param]
    g = torch.Generator().manual_seed(1234)
    x_T = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    uncond = torch.randn(1, 3, 8, generator=g, dtype=torch.float64)
    return Problem(cfg_denoiser(factory(), cond, uncond, 7.5), x_T, parameterization)


def relative_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def run_diffusers(scheduler, model_fn, x, model_times=None, generator=None, **step_kwargs):
    """The diffusers sampling loop; `x` is the scaled start latent, `model_times` overrides the model's t."""
    times = scheduler.timesteps if model_times is None else model_times
    for t, model_t in zip(scheduler.timesteps, times):
        t_in = torch.full((x.shape[0],), float(model_t), dtype=x.dtype)
        output = model_fn(scheduler.scale_model_input(x, t), t_in)
        if generator is not None:
            step_kwargs["generator"] = generator
        x = scheduler.step(output, t, x, **step_kwargs).prev_sample
    return x


def check(ours, theirs):
    assert ours.dtype == theirs.dtype and torch.isfinite(ours).all()
    err = relative_error(ours, theirs)
    assert err < TOL, err


@pytest.mark.parametrize("steps", fast_first(10, 7, 20))
def test_ddim_matches_diffusers(problem, steps):
    scheduler = DDIMScheduler(**ORIGINAL, clip_sample=False, timestep_spacing="leading",
                              prediction_type=problem.prediction_type)
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.flip(0).tolist() == schedule.ddim_timesteps(steps).tolist()
    theirs = run_diffusers(scheduler, problem.model_fn, problem.x_T, eta=0.0)
    check(problem.sample("ddim", None, None, scheduler.alphas_cumprod, steps), theirs)


@pytest.mark.parametrize("steps", fast_first(10, 20))
def test_ddim_eta_matches_diffusers_with_same_generator(problem, steps):
    model_fn32 = lambda x, t: problem.model_fn(x.double(), t.double()).float()  # noqa: E731
    scheduler = DDIMScheduler(**ORIGINAL, clip_sample=False, timestep_spacing="leading",
                              prediction_type=problem.prediction_type)
    scheduler.set_timesteps(steps)
    theirs = run_diffusers(scheduler, model_fn32, problem.x_T.float(), eta=0.7,
                           generator=torch.Generator().manual_seed(5))
    ours = problem.sample("ddim", model_fn32, problem.x_T.float(), scheduler.alphas_cumprod, steps,
                          generator=torch.Generator().manual_seed(5), eta=0.7)
    check(ours, theirs)


def eps_of(problem, alphas_cumprod):
    """The problem's model as an eps model at integer times: a v output turned into eps by the closed form
    eps = sqrt(a_t) v + sqrt(1 - a_t) x_t (Salimans & Ho 2022), written out here independently of ldm."""
    if problem.parameterization == "eps":
        return problem.model_fn
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)

    def eps_fn(x, t):
        a = ac[t.round().long()].to(x)[:, None, None, None]
        return a.sqrt() * problem.model_fn(x, t) + (1 - a).sqrt() * x

    return eps_fn


@pytest.mark.parametrize("steps", fast_first(2, 3, 10, 7, 20, fast=3))
def test_plms_matches_diffusers_pndm(problem, steps):
    """PNDM driven by the eps each evaluation implies. (diffusers' PNDM with prediction_type="v_prediction"
    instead combines the raw v outputs of several steps and converts the combination at the current x_t,
    a first-order error: see test_plms_v_is_exact_where_the_eps_is_constant.)"""
    scheduler = PNDMScheduler(**ORIGINAL, skip_prk_steps=True)
    scheduler.set_timesteps(steps)
    theirs = run_diffusers(scheduler, eps_of(problem, scheduler.alphas_cumprod), problem.x_T)
    check(problem.sample("plms", None, None, scheduler.alphas_cumprod, steps), theirs)


@pytest.mark.parametrize("steps", fast_first(9, 27))  # 999 / steps integral: the original's uniform times are integers
def test_dpm_solver_matches_diffusers(problem, steps):
    # The original stops at t = 0 (sigma_min), and lowers the order of the last step only below 15 steps.
    scheduler = DPMSolverMultistepScheduler(**SV1, algorithm_type="dpmsolver++", solver_order=2,
                                            timestep_spacing="linspace", final_sigmas_type="sigma_min",
                                            lower_order_final=True, prediction_type=problem.prediction_type)
    scheduler.set_timesteps(steps)
    theirs = run_diffusers(scheduler, problem.model_fn, problem.x_T)
    check(problem.sample("dpm_solver", None, None, scheduler.alphas_cumprod, steps), theirs)


K_SCHEDULERS = {"lms": LMSDiscreteScheduler, "euler": EulerDiscreteScheduler, "heun": HeunDiscreteScheduler}


@pytest.mark.parametrize("karras", [False, True], ids=["linspace", "karras"])
@pytest.mark.parametrize("name", sorted(K_SCHEDULERS))
@pytest.mark.parametrize("steps", fast_first(10, 20))
def test_k_samplers_match_diffusers(problem, name, karras, steps):
    scheduler = K_SCHEDULERS[name](**SV1, timestep_spacing="linspace", use_karras_sigmas=karras,
                                   prediction_type=problem.prediction_type)
    scheduler.set_timesteps(steps)
    theirs = run_diffusers(scheduler, problem.model_fn, problem.x_T * scheduler.init_noise_sigma)
    ours = problem.sample(name + "_karras" * karras, None, None, scheduler.alphas_cumprod, steps)
    check(ours, theirs)


def test_lms_linspace_timesteps_match_diffusers():
    scheduler = LMSDiscreteScheduler(**SV1, timestep_spacing="linspace")
    scheduler.set_timesteps(20)
    train_sigmas = schedule.sigmas_from_alphas_cumprod(scheduler.alphas_cumprod)
    sigmas = schedule.linspace_sigmas(train_sigmas, 20)
    torch.testing.assert_close(sigmas.float(), scheduler.sigmas, rtol=1e-6, atol=0)
    t = schedule.sigma_to_t(sigmas[:-1], train_sigmas, space="linear")
    torch.testing.assert_close(t.float(), scheduler.timesteps, rtol=0, atol=1e-4)
    assert [round(v, 4) for v in t[:3].tolist()] == [999.0, 946.4211, 893.8421]
    assert [round(v, 4) for v in t[-2:].tolist()] == [52.5789, 0.0]


def test_time_uniform_levels_are_the_dpm_solver_timesteps_of_diffusers():
    scheduler = DPMSolverMultistepScheduler(**SV1, timestep_spacing="linspace", final_sigmas_type="sigma_min")
    scheduler.set_timesteps(9)
    train_sigmas = schedule.sigmas_from_alphas_cumprod(scheduler.alphas_cumprod)
    sigmas = schedule.time_uniform_sigmas(train_sigmas, 9)
    assert scheduler.timesteps.tolist() == list(range(999, 0, -111))
    torch.testing.assert_close(sigmas.float(), scheduler.sigmas, rtol=1e-6, atol=0)
    t = schedule.sigma_to_t(sigmas, train_sigmas, space="vp")
    torch.testing.assert_close(t, torch.arange(999.0, -1.0, -111.0, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("karras", [False, True], ids=["linspace", "karras"])
def test_dpmpp_2m_matches_diffusers(problem, karras):
    steps = 10
    scheduler = DPMSolverMultistepScheduler(**SV1, algorithm_type="dpmsolver++", solver_order=2,
                                            final_sigmas_type="zero", lower_order_final=True,
                                            use_karras_sigmas=karras, prediction_type=problem.prediction_type)
    if karras:
        scheduler.set_timesteps(steps)
        # diffusers rounds these model times to integers; k-diffusion (and we) keep t(sigma) exact,
        # as diffusers' Euler does for the same Karras noise levels.
        euler = EulerDiscreteScheduler(**SV1, timestep_spacing="linspace", use_karras_sigmas=True)
        euler.set_timesteps(steps)
        assert torch.equal(euler.sigmas, scheduler.sigmas)
        model_times = euler.timesteps
    else:
        # The k-diffusion linspace levels at t = 999, 888, ..., 111, 0, then sigma 0.
        scheduler.set_timesteps(timesteps=list(range(999, -1, -111)))
        model_times = None
    # Same start latent: k-diffusion's x_T * sigma_max, in the variance-preserving scale diffusers uses here.
    sigma_max = scheduler.sigmas[0].item()
    x_start = problem.x_T * (sigma_max / math.sqrt(sigma_max**2 + 1))
    theirs = run_diffusers(scheduler, problem.model_fn, x_start, model_times=model_times)
    check(problem.sample("dpmpp_2m" + "_karras" * karras, None, None, scheduler.alphas_cumprod, steps), theirs)


@pytest.mark.parametrize("karras", [False, True], ids=["linspace", "karras"])
@pytest.mark.parametrize("steps", fast_first(10, 20))
def test_euler_ancestral_matches_diffusers_with_same_generator(problem, karras, steps):
    model_fn32 = lambda x, t: problem.model_fn(x.double(), t.double()).float()  # noqa: E731
    scheduler = EulerAncestralDiscreteScheduler(**SV1, timestep_spacing="linspace",
                                                prediction_type=problem.prediction_type)
    scheduler.set_timesteps(steps)
    if karras:  # diffusers' ancestral scheduler has no Karras option: give it the Euler scheduler's levels
        euler = EulerDiscreteScheduler(**SV1, timestep_spacing="linspace", use_karras_sigmas=True)
        euler.set_timesteps(steps)
        scheduler.sigmas, scheduler.timesteps = euler.sigmas, euler.timesteps
    x_start = problem.x_T.float() * scheduler.init_noise_sigma
    theirs = run_diffusers(scheduler, model_fn32, x_start, generator=torch.Generator().manual_seed(7))
    ours = problem.sample("euler_a" + "_karras" * karras, model_fn32, problem.x_T.float(), scheduler.alphas_cumprod,
                          steps, generator=torch.Generator().manual_seed(7))
    check(ours, theirs)


def test_plms_v_is_exact_where_the_eps_is_constant():
    """Data concentrated at one point c: along the probability-flow ODE eps is constant, so every DDIM-type
    step is exact and PLMS with a v model must land on sqrt(a_0) c + sqrt(1 - a_0) eps. Turning each v into
    eps at its own x_t and a_t keeps that; diffusers' PNDM with prediction_type="v_prediction" (which
    extrapolates the raw v outputs, v changing along the path as sqrt(a_t) eps - sqrt(1 - a_t) c) does not."""
    ac = schedule.make_alphas_cumprod()
    c = torch.linspace(-1.0, 1.0, 2 * 4 * 8 * 8, dtype=torch.float64).reshape(2, 4, 8, 8)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def v_model(x, t):
        a = ac[t.round().long()][:, None, None, None]
        eps = (x - a.sqrt() * c) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * c

    a_T, a_0 = ac[schedule.ddim_timesteps(10)[-1]], ac[0]
    eps = (x_T - a_T.sqrt() * c) / (1 - a_T).sqrt()  # the constant eps of the path through x_T
    exact = a_0.sqrt() * c + (1 - a_0).sqrt() * eps
    for name in ("ddim", "plms"):
        ours = sample(name, v_model, x_T, ac, 10, parameterization="v")
        torch.testing.assert_close(ours, exact, rtol=1e-9, atol=1e-9)
    pndm = PNDMScheduler(**ORIGINAL, skip_prk_steps=True, prediction_type="v_prediction")
    pndm.set_timesteps(10)
    assert relative_error(run_diffusers(pndm, v_model, x_T), exact) > 1e-3  # the reason we differ from it
