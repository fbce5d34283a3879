"""Samplers without a reference implementation: schedules, step counts, guidance, noise, registry, callbacks,
the model parameterisation."""

import math

import numpy as np
import pytest
import torch

from ldm.models.diffusion import SCHEDULE_BUFFERS
from ldm.samplers import PARAMETERIZATIONS, SAMPLERS, check_eta, get_sampler, sample, schedule
from ldm.samplers.common import randn_like
from ldm.samplers.guidance import cfg_denoiser
from ldm.samplers.k_samplers import discrete_denoiser, euler_ancestral, lms_coefficient
from ldm.samplers.parameterization import denoiser_scalings, eps_and_x0

AC = schedule.make_alphas_cumprod().float()  # as the model's float32 buffer


class CountingModel:
    """A cheap analytic eps model (exact for x_0 ~ N(mu(cond), 0.25)) that records the batch size of each call."""

    def __init__(self):
        self.batch_sizes = []
        self.ac = schedule.make_alphas_cumprod()

    def __call__(self, x, t, cond):
        self.batch_sizes.append(x.shape[0])
        a = schedule.interp(t.double().cpu(), torch.arange(1000.0, dtype=torch.float64), self.ac)
        a = a.to(x)[:, None, None, None]
        mu = cond.mean(dim=(1, 2))[:, None, None, None].to(x)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (0.25 * a + 1 - a)


def setup(batch=1, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(batch, 4, 8, 8, generator=g).to(dtype)
    cond = torch.randn(batch, 3, 8, generator=g).to(dtype)
    uncond = torch.zeros(1, 3, 8, dtype=dtype)
    model = CountingModel()
    return model, cfg_denoiser(model, cond, uncond, scale), x_T


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# --- schedule ---------------------------------------------------------------------------------------------


def test_alphas_cumprod_is_the_scaled_linear_schedule():
    ac = schedule.make_alphas_cumprod()
    assert ac.dtype == torch.float64 and ac.shape == (1000,)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert ac[0].item() == pytest.approx(1 - 0.00085, rel=1e-12)
    assert ac[-1].item() == pytest.approx(math.prod(1 - b for b in betas.tolist()), rel=1e-10)
    assert ac[-1].item() == pytest.approx(0.00466010, rel=1e-6)  # golden


def original_register_schedule(linear_start, linear_end, timesteps):
    """The original's register_schedule ('linear' betas), float64 numpy, then float32 as its buffers."""
    betas = np.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    var = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = [betas, ac, ac_prev, np.sqrt(ac), np.sqrt(1.0 - ac), np.log(1.0 - ac), np.sqrt(1.0 / ac),
              np.sqrt(1.0 / ac - 1), var, np.log(np.maximum(var, 1e-20)), betas * np.sqrt(ac_prev) / (1.0 - ac),
              (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)]
    return [torch.tensor(v, dtype=torch.float32) for v in values]


@pytest.mark.parametrize("args", [(0.00085, 0.012, 1000), (0.0001, 0.02, 1000), (0.0015, 0.0195, 250)])
def test_schedule_buffers_are_the_originals_bit_for_bit(args):
    """One schedule for the model and the samplers: the model's float32 buffers equal the original's
    (float64 numpy, then float32) bit for bit, under the original's names and in its order."""
    buffers = schedule.schedule_buffers(*args)
    assert tuple(buffers) == SCHEDULE_BUFFERS
    for (name, ours), theirs in zip(buffers.items(), original_register_schedule(*args)):
        assert ours.dtype == torch.float64 and torch.equal(ours.float(), theirs), name
    torch.testing.assert_close(buffers["alphas_cumprod"], schedule.make_alphas_cumprod(*args), rtol=0, atol=0)


def test_the_model_keeps_the_schedule_as_float32_buffers():
    from helpers import tiny_config
    from ldm.config import instantiate

    model = instantiate(tiny_config()["model"])
    for name, theirs in zip(SCHEDULE_BUFFERS, original_register_schedule(0.00085, 0.012, 1000)):
        buffer = getattr(model, name)
        assert buffer.dtype == torch.float32 and torch.equal(buffer, theirs), name


def test_ddim_timesteps_as_the_original_and_valid_for_every_count():
    assert schedule.ddim_timesteps(50).tolist() == list(range(1, 1000, 20))  # 1, 21, ..., 981
    assert schedule.ddim_timesteps(3).tolist() == [1, 334, 667]  # the original crashes here (index 1000)
    assert schedule.ddim_timesteps(1).tolist() == [1]
    assert schedule.ddim_timesteps(999).tolist() == list(range(1, 1000))
    assert schedule.ddim_timesteps(1000).tolist() == list(range(1000))
    for steps in range(1, 1001):
        ts = schedule.ddim_timesteps(steps)
        assert len(ts) == steps and ts.min() >= 0 and ts.max() <= 999
        assert (ts.diff() == 1000 // steps).all()
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            schedule.ddim_timesteps(bad)


def test_sigma_t_conversions_are_inverse_and_agree_at_training_steps():
    sigmas = schedule.sigmas_from_alphas_cumprod(AC)
    t = torch.tensor([0.0, 0.25, 1.5, 52.5789, 500.0, 946.4211, 999.0], dtype=torch.float64)
    whole = torch.arange(0.0, 1000.0, 37.0, dtype=torch.float64)
    for space in ("log", "linear", "vp"):
        torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(t, sigmas, space), sigmas, space), t)
        torch.testing.assert_close(schedule.t_to_sigma(whole, sigmas, space), sigmas[whole.long()])
    # k-diffusion's DiscreteSchedule: log-sigma is linear in t between training steps.
    mid = schedule.t_to_sigma(torch.tensor(10.5, dtype=torch.float64), sigmas)
    assert mid.item() == pytest.approx(math.sqrt(sigmas[10].item() * sigmas[11].item()), rel=1e-12)
    # The original DPM-Solver's discrete schedule: log sqrt(a_t) is linear in t, so a_t is geometric.
    ac = schedule.as_float64(AC)
    a_mid = 1 / (1 + schedule.t_to_sigma(torch.tensor(10.5, dtype=torch.float64), sigmas, "vp") ** 2)
    assert a_mid.item() == pytest.approx(math.sqrt(ac[10].item() * ac[11].item()), rel=1e-12)
    # Out of range: clamped to the ends.
    assert schedule.sigma_to_t(1e-6, sigmas).item() == 0.0 and schedule.sigma_to_t(1e6, sigmas).item() == 999.0


def test_karras_and_linspace_sigmas():
    sigmas = schedule.sigmas_from_alphas_cumprod(AC)
    k = schedule.karras_sigmas(10, sigmas[0], sigmas[-1])
    assert len(k) == 11 and k[-1] == 0 and (k.diff() < 0).all()
    assert k[0].item() == pytest.approx(sigmas[-1].item()) and k[-2].item() == pytest.approx(sigmas[0].item())
    inv_rho = k[:-1] ** (1 / 7)
    torch.testing.assert_close(inv_rho.diff(), inv_rho.diff()[:1].expand(9))  # evenly spaced in sigma^(1/7)
    lin = schedule.linspace_sigmas(sigmas, 20)
    assert len(lin) == 21 and lin[-1] == 0 and (lin.diff() < 0).all()
    assert lin[0] == sigmas[-1] and lin[-2] == sigmas[0]


def test_time_uniform_sigmas_are_the_original_dpm_solver_times():
    sigmas = schedule.sigmas_from_alphas_cumprod(AC)
    levels = schedule.time_uniform_sigmas(sigmas, 9)
    assert len(levels) == 10 and levels[-1] == sigmas[0] and levels[0] == pytest.approx(sigmas[-1].item(), rel=1e-12)
    torch.testing.assert_close(levels, sigmas[list(range(999, -1, -111))], rtol=1e-12, atol=0)


def test_lms_coefficients_integrate_polynomials_exactly():
    sigmas = [14.0, 9.0, 5.0, 2.5, 1.0]
    # Order 1 is Euler: the step length. Any order integrates a constant derivative exactly.
    assert lms_coefficient(sigmas, 0, 0, 1) == pytest.approx(-5.0)
    for order in (1, 2, 3, 4):
        total = sum(lms_coefficient(sigmas, 3, j, order) for j in range(order))
        assert total == pytest.approx(sigmas[4] - sigmas[3], rel=1e-12)
    # Order 4 integrates a cubic in sigma exactly.
    f = lambda s: s**3 - 2 * s  # noqa: E731
    approx = sum(lms_coefficient(sigmas, 3, j, 4) * f(sigmas[3 - j]) for j in range(4))
    exact = (sigmas[4] ** 4 / 4 - sigmas[4] ** 2) - (sigmas[3] ** 4 / 4 - sigmas[3] ** 2)
    assert approx == pytest.approx(exact, rel=1e-10)


# --- every sampler ----------------------------------------------------------------------------------------


def test_registry_names_and_lookup():
    assert set(SAMPLERS) == {"ddim", "plms", "dpm_solver", "lms", "euler", "euler_a", "heun", "dpmpp_2m",
                             "lms_karras", "euler_karras", "euler_a_karras", "heun_karras", "dpmpp_2m_karras"}
    for name, entry in SAMPLERS.items():
        assert entry.name == name and get_sampler(name) is entry
        assert entry.description and "\n" not in entry.description
    assert {n for n, s in SAMPLERS.items() if s.stochastic} == {"euler_a", "euler_a_karras"}
    with pytest.raises(ValueError, match="valid samplers: ddim, plms, dpm_solver"):
        get_sampler("k_euler")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 12])
def test_every_sampler_in_float32(name, steps):
    """Runs in float32, one callback per step, the model evaluations the registry announces, a clean result."""
    model, eps_fn, x_T = setup(batch=2, scale=5.0)
    calls = []
    out = sample(name, eps_fn, x_T, AC, steps, generator=generator(), callback=lambda *a: calls.append(a))
    assert out.dtype == torch.float32 and out.shape == x_T.shape and torch.isfinite(out).all()
    assert len(model.batch_sizes) == model_evaluations(name, steps)
    assert set(model.batch_sizes) == {4}  # guided: one pass of (uncond, cond) per evaluation
    assert [c[0] for c in calls] == list(range(steps))
    assert all(c[1].shape == x_T.shape and c[2].shape == x_T.shape for c in calls)
    assert torch.equal(calls[-1][1], out)
    if steps > 2:
        # x_t starts noisy (std ~ 1) while x_0 converges: the last prediction is the result (up to the
        # final noise level of DDIM-like samplers, alphas_cumprod[0]).
        first_x0, last_x0 = calls[0][2], calls[-1][2]
        assert calls[0][1].std() > 0.5
        assert (last_x0 - out).abs().max() < 0.1 * (first_x0 - out).abs().max()


def model_evaluations(name: str, steps: int) -> int:
    """Guided model evaluations of a run: Heun evaluates twice per step except into sigma 0, PLMS once
    more in its warm-up, every other sampler once per step."""
    if name.startswith("heun"):
        return 2 * steps - 1
    return steps + (name == "plms")


@pytest.mark.parametrize("name,steps,evaluations", [("heun", 10, 19), ("heun_karras", 3, 5), ("plms", 50, 51),
                                                    ("ddim", 50, 50), ("dpm_solver", 50, 50), ("euler", 7, 7)])
def test_model_evaluations_per_run(name, steps, evaluations):
    model, eps_fn, x_T = setup()
    sample(name, eps_fn, x_T, AC, steps, generator=generator())
    assert len(model.batch_sizes) == evaluations == model_evaluations(name, steps)


@pytest.mark.parametrize("name", ["ddim", "plms"])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 50, 999, 1000])
def test_ddim_and_plms_any_step_count(name, steps):
    model, eps_fn, x_T = setup()
    out = sample(name, eps_fn, x_T, AC, steps)
    assert torch.isfinite(out).all()
    assert len(model.batch_sizes) == steps + (name == "plms")
    if steps >= 3:  # (1 and 2 steps start from t = 1 and t = 501: the original's spacing, kept as is)
        # Gaussian data of std 0.5: a finished sample has roughly that spread, not the start noise's 1.
        assert 0.2 < out.std().item() < 0.8


@pytest.mark.parametrize("name", ["ddim", "plms"])
def test_step_counts_converge(name):
    """The same ODE with more steps: the distance to the 1000-step result shrinks as the step count grows."""
    _, eps_fn, x_T = setup(dtype=torch.float64, scale=3.0)
    ref = sample(name, eps_fn, x_T, AC, 1000)
    errors = [(sample(name, eps_fn, x_T, AC, steps) - ref).abs().max().item() for steps in (10, 50, 250, 999)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3, errors


def test_dpm_solver_single_step_is_ddim_like():
    # The original asserts steps >= order; one step here is a first-order (DDIM) step from t=999 to t=0.
    model, eps_fn, x_T = setup(dtype=torch.float64)
    out = sample("dpm_solver", eps_fn, x_T, AC, 1)
    eps = eps_fn(x_T, torch.full((1,), 999.0, dtype=torch.float64))
    ac = schedule.as_float64(AC)
    x0 = (x_T - (1 - ac[999]).sqrt() * eps) / ac[999].sqrt()
    torch.testing.assert_close(out, ac[0].sqrt() * x0 + (1 - ac[0]).sqrt() * eps)


# --- noise and reproducibility ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,eta", [("ddim", 0.8), ("euler_a", None), ("euler_a_karras", None)])
def test_same_seed_same_result_bit_for_bit(name, eta):
    _, eps_fn, x_T = setup(batch=2, scale=7.5)
    torch.manual_seed(1)
    a = sample(name, eps_fn, x_T, AC, 8, generator=generator(42), eta=eta)
    torch.manual_seed(2)  # the global RNG plays no part
    torch.rand(5)
    b = sample(name, eps_fn, x_T, AC, 8, generator=generator(42), eta=eta)
    assert torch.equal(a, b)
    c = sample(name, eps_fn, x_T, AC, 8, generator=generator(43), eta=eta)
    assert not torch.allclose(a, c)


def test_stochastic_samplers_need_a_generator():
    _, eps_fn, x_T = setup()
    for name, eta in [("euler_a", None), ("ddim", 0.5)]:
        with pytest.raises(ValueError, match="torch.Generator"):
            sample(name, eps_fn, x_T, AC, 4, eta=eta)


def test_eta_is_refused_where_it_means_nothing():
    _, eps_fn, x_T = setup()
    for name in ("plms", "dpm_solver", "lms", "euler", "heun", "dpmpp_2m", "heun_karras"):
        sample(name, eps_fn, x_T, AC, 2, eta=0.0)  # the original's default --ddim_eta 0 is fine
        with pytest.raises(ValueError, match=f"sampler '{name}' is deterministic: --ddim_eta applies to ddim"):
            sample(name, eps_fn, x_T, AC, 2, eta=0.5)
        with pytest.raises(TypeError):  # the function itself takes no eta: nothing is silently ignored
            get_sampler(name).fn(eps_fn, x_T, AC, 2, eta=0.5)


def test_check_eta_is_the_one_eta_rule():
    assert {n for n, s in SAMPLERS.items() if s.takes_eta} == {"ddim", "euler_a", "euler_a_karras"}
    for name in SAMPLERS:
        check_eta(name, None)
        check_eta(name, 0.0)
        with pytest.raises(ValueError, match="--ddim_eta must not be negative, got -0.5"):
            check_eta(name, -0.5)
    check_eta("ddim", 0.7)
    check_eta("euler_a_karras", 0.3)
    with pytest.raises(ValueError, match="sampler 'plms' is deterministic"):
        check_eta("plms", 1.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        check_eta("k_euler", None)


def test_ancestral_eta_zero_is_euler_and_draws_nothing():
    _, eps_fn, x_T = setup()
    g = generator(3)
    state = g.get_state()
    torch.testing.assert_close(sample("euler_a", eps_fn, x_T, AC, 6, generator=g, eta=0.0),
                               sample("euler", eps_fn, x_T, AC, 6), rtol=0, atol=0)
    assert torch.equal(g.get_state(), state)


def test_noise_is_drawn_in_float32_on_the_generators_device():
    x64 = torch.zeros(2, 4, 8, 8, dtype=torch.float64)
    x16 = torch.zeros(2, 4, 8, 8, dtype=torch.bfloat16)
    reference = torch.randn(2, 4, 8, 8, generator=generator(9), dtype=torch.float32)
    assert torch.equal(randn_like(x64, generator(9)), reference.double())
    assert torch.equal(randn_like(x16, generator(9)), reference.bfloat16())
    state = torch.get_rng_state()
    randn_like(x64, generator(9))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,eta", [("ddim", 0.8), ("euler_a", None)])
def test_same_seed_same_noise_on_another_device(name, eta):
    _, eps_fn, x_T = setup(batch=2, scale=7.5)
    cpu = sample(name, eps_fn, x_T, AC, 8, generator=generator(42), eta=eta)
    cuda_eps_fn = lambda x, t: eps_fn(x.cpu(), t.cpu()).cuda()  # noqa: E731 (the model stays on the CPU)
    cuda = sample(name, cuda_eps_fn, x_T.cuda(), AC.cuda(), 8, generator=generator(42), eta=eta)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=1e-5)


def test_euler_ancestral_keeps_the_marginal_noise_level():
    """By distribution: with a denoiser predicting 0, x ~ N(0, sigma^2) must stay N(0, sigma_next^2) after
    each ancestral step (deterministic part to sigma_down, fresh noise of std sigma_up); into sigma 0 it is 0."""
    zero = lambda x, sigma: torch.zeros_like(x)  # noqa: E731
    x = 10.0 * torch.randn(40000, 1, 1, 1, generator=generator(10), dtype=torch.float64)
    levels = []
    out = euler_ancestral(zero, x, [10.0, 4.0, 1.5, 0.5], generator=generator(11),
                          callback=lambda i, x, d: levels.append(x.std().item()))
    assert levels == pytest.approx([4.0, 1.5, 0.5], rel=0.02)
    assert abs(out.mean().item()) < 0.01
    assert euler_ancestral(zero, x, [10.0, 4.0, 0.0], generator=generator(11)).abs().max() == 0


# --- guidance -----------------------------------------------------------------------------------------------


def test_guidance_scale_one_is_the_conditional_prediction_in_one_pass():
    model = CountingModel()
    g = generator(5)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.full((3,), 500.0)
    cond = torch.randn(3, 3, 8, generator=g)
    eps_fn = cfg_denoiser(model, cond, torch.zeros(1, 3, 8), 1.0)
    assert torch.equal(eps_fn(x, t), model(x, t, cond))
    model.batch_sizes.clear()
    sample("ddim", eps_fn, x, AC, 7)
    assert model.batch_sizes == [3] * 7


def test_guidance_combines_one_batched_pass():
    model = CountingModel()
    g = generator(6)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.full((2,), 300.0, dtype=torch.float64)
    cond = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    uncond = torch.randn(1, 3, 8, generator=g, dtype=torch.float64)
    out = cfg_denoiser(model, cond, uncond, 7.5)(x, t)
    assert model.batch_sizes == [4]
    eps_c, eps_u = model(x, t, cond), model(x, t, uncond.expand(2, -1, -1))
    torch.testing.assert_close(out, eps_u + 7.5 * (eps_c - eps_u))


def test_guidance_can_pass_each_latent_once_for_both_contexts():
    """fans_out: the model gets the B latents and the 2B contexts (it denoises each latent under both)."""
    model = CountingModel()
    seen = []

    def fanning(x, t, context):  # what UNetModel does with k*B contexts
        seen.append((x.shape[0], t.shape[0], context.shape[0]))
        k = context.shape[0] // x.shape[0]
        return model(x.repeat(k, 1, 1, 1), t.repeat(k), context)

    g = generator(6)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.full((2,), 300.0, dtype=torch.float64)
    cond, uncond = (torch.randn(2, 3, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out = cfg_denoiser(fanning, cond, uncond, 7.5, fans_out=True)(x, t)
    assert seen == [(2, 2, 4)]
    torch.testing.assert_close(out, cfg_denoiser(model, cond, uncond, 7.5)(x, t))


def test_negative_prompt_changes_only_the_unconditional_branch():
    seen = []

    def model(x, t, context):
        seen.append(context.clone())
        return CountingModel()(x, t, context) + context.sum(dim=(1, 2))[:, None, None, None]

    g = generator(7)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.full((2,), 700.0)
    cond = torch.randn(2, 3, 8, generator=g)
    empty, negative = torch.zeros(2, 3, 8), torch.randn(2, 3, 8, generator=g)
    a = cfg_denoiser(model, cond, empty, 6.0)(x, t)
    b = cfg_denoiser(model, cond, negative, 6.0)(x, t)
    assert torch.equal(seen[0][:2], empty) and torch.equal(seen[1][:2], negative)
    assert torch.equal(seen[0][2:], cond) and torch.equal(seen[1][2:], cond)
    eps_c = model(x, t, cond)
    eps_empty, eps_negative = model(x, t, empty), model(x, t, negative)
    torch.testing.assert_close(a, eps_empty + 6.0 * (eps_c - eps_empty))
    torch.testing.assert_close(b, eps_negative + 6.0 * (eps_c - eps_negative))
    # The difference is exactly the change of the unconditional prediction, weighted by (1 - scale).
    torch.testing.assert_close(b - a, (1 - 6.0) * (eps_negative - eps_empty))


def test_guidance_needs_an_unconditional_embedding_above_scale_one():
    with pytest.raises(ValueError, match="unconditional"):
        cfg_denoiser(CountingModel(), torch.zeros(1, 3, 8), None, 7.5)


# --- model parameterisation ---------------------------------------------------------------------------------


def forward_process(alpha_bar, seed=12):
    """x_0, eps, x_t = sqrt(a) x_0 + sqrt(1 - a) eps and v = sqrt(a) eps - sqrt(1 - a) x_0, float64."""
    g = generator(seed)
    x0, eps = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    a, b = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    return x0, eps, a * x0 + b * eps, a * eps - b * x0


@pytest.mark.parametrize("t", [0, 1, 250, 981, 999])
def test_eps_and_x0_invert_the_forward_process(t):
    alpha_bar = schedule.make_alphas_cumprod()[t].item()
    x0, eps, x_t, v = forward_process(alpha_bar)
    for parameterization, output in (("eps", eps), ("v", v)):
        got_eps, got_x0 = eps_and_x0(output, x_t, alpha_bar, parameterization)
        torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-12)
        # x_0 from eps divides by sqrt(a_t) (0.068 at t = 999): rounding grows by as much.
        torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-12 / math.sqrt(alpha_bar))


@pytest.mark.parametrize("sigma", [0.03, 1.0, 14.6])
def test_denoiser_scalings_recover_x0_in_the_variance_exploding_scale(sigma):
    alpha_bar = 1 / (sigma**2 + 1)
    x0, eps, x_t, v = forward_process(alpha_bar)
    x = x_t / math.sqrt(alpha_bar)  # = x_0 + sigma * eps
    torch.testing.assert_close(x, x0 + sigma * eps, rtol=0, atol=1e-12)
    for parameterization, output in (("eps", eps), ("v", v)):
        c_skip, c_out = denoiser_scalings(sigma, parameterization)
        torch.testing.assert_close(c_skip * x + c_out * output, x0, rtol=0, atol=1e-12)
        seen = []
        denoise = discrete_denoiser(lambda x_in, t: seen.append(x_in) or output, lambda s: 0.0, parameterization)
        torch.testing.assert_close(denoise(x, sigma), x0, rtol=0, atol=1e-12)
        torch.testing.assert_close(seen[0], x_t, rtol=0, atol=1e-12)  # the model sees the variance-preserving x_t


def test_unknown_parameterization_is_refused():
    assert PARAMETERIZATIONS == ("eps", "v")
    _, eps_fn, x_T = setup()
    for name in SAMPLERS:
        with pytest.raises(ValueError, match="parameterization must be one of eps, v, got 'x0'"):
            sample(name, eps_fn, x_T, AC, 2, generator=generator(), parameterization="x0")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a_v_model_samples_as_the_eps_model_it_implies(name):
    """The same denoising field given as v or as eps: every sampler gives the same latents (up to rounding)
    whichever the model predicts. Exact v <-> eps at any (fractional) time: the field is built from a_t(t)."""
    sigmas = schedule.sigmas_from_alphas_cumprod(AC)
    space = {"ddim": "linear", "plms": "linear", "dpm_solver": "vp"}.get(name, "log" if "karras" in name else "linear")

    def alpha_bar(t):  # a_t at the sampler's own (possibly fractional) times, as it interpolates them
        return (1 / (1 + schedule.t_to_sigma(t.double(), sigmas, space) ** 2))[:, None, None, None]

    def eps_model(x, t):
        a = alpha_bar(t)
        return (1 - a).sqrt() * (x - a.sqrt() * 0.3) / (0.25 * a + 1 - a) + 0.05 * torch.tanh(x)

    def v_model(x, t):
        a = alpha_bar(t)
        eps = eps_model(x, t)
        return a.sqrt() * eps - (1 - a).sqrt() * (x - (1 - a).sqrt() * eps) / a.sqrt()

    x_T = torch.randn(2, 4, 8, 8, generator=generator(4), dtype=torch.float64)
    ours_eps = sample(name, eps_model, x_T, AC, 6, generator=generator(5))
    ours_v = sample(name, v_model, x_T, AC, 6, generator=generator(5), parameterization="v")
    torch.testing.assert_close(ours_v, ours_eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("declared", [None, "eps", "v"])
def test_the_pipeline_samples_in_the_models_parameterization(monkeypatch, declared):
    """Txt2Img hands the model's `parameterization` (eps when it declares none) to the sampler."""
    from dataclasses import replace

    from helpers import randomize_, tiny_config
    from ldm.checkpoint import build_model
    from ldm.pipeline import Txt2Img, latent_factor

    model = randomize_(build_model(tiny_config(), "cpu"), seed=3).eval()
    if declared is not None:
        model.parameterization = declared
    seen = []
    ddim = SAMPLERS["ddim"]

    def recording_ddim(*args, parameterization, **kwargs):
        seen.append(parameterization)
        return ddim.fn(*args, parameterization=parameterization, **kwargs)

    monkeypatch.setitem(SAMPLERS, "ddim", replace(ddim, fn=recording_ddim))
    f = latent_factor(model)
    size = f * model.model.diffusion_model.downsample_factor
    Txt2Img(model, "cpu", "full")("a fox", sampler="ddim", steps=1, scale=1.0, H=size, W=size, f=f,
                                  n_samples=1, n_iter=1)
    assert seen == [declared or "eps"]
