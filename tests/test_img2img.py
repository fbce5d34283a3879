"""img2img: samplers started part-way, parity with the original img2img.py's DDIM semantics (through
diffusers' img2img pipeline), the `img2img` command line, and the demo model turning a red circle blue."""

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import fast_first, rel_err, write_tiny_model
from ldm import cli
from ldm.img2img import Img2Img, fit_size, item_noise
from ldm.planning import WorkItem
from ldm.samplers import SAMPLERS, img2img_plan, sample, schedule, start_alpha

ROOT = Path(__file__).resolve().parent.parent
AC = schedule.make_alphas_cumprod()


def _toy_model(x, t):
    """A smooth eps model of x and t: enough to tell steps and times apart."""
    return 0.3 * torch.tanh(x) * torch.cos(t.to(x)[:, None, None, None] / 200) + 0.1 * x


def _original_ddim_alphas(steps):
    """The original DDIMSampler.make_schedule's ddim_alphas (uniform: range(0, 1000, 1000 // steps) + 1)."""
    ts = np.asarray(list(range(0, 1000, 1000 // steps))) + 1
    return AC[torch.as_tensor(ts)], ts


@pytest.mark.parametrize("steps,strength", [(50, 0.75), (10, 0.3), (25, 0.5), (20, 0.05)])
def test_ddim_noise_level_is_the_originals(steps, strength):
    """t_enc = int(strength * steps) steps run; the latent is noised to ddim_alphas[t_enc] (stochastic_encode)."""
    first_step, a = img2img_plan("ddim", AC, steps, strength)
    t_enc = int(strength * steps)
    ddim_alphas, _ = _original_ddim_alphas(steps)
    assert first_step == steps - t_enc
    assert a == pytest.approx(ddim_alphas[t_enc].item(), rel=1e-12)


def test_strength_edges():
    # strength 1: every step, noised one stride above the top time (981 + 20), capped at 999
    assert img2img_plan("ddim", AC, 50, 1.0) == (0, pytest.approx(AC[999].item()))
    # strength 0: no step at all
    assert img2img_plan("ddim", AC, 50, 0.0)[0] == 50
    with pytest.raises(ValueError, match="strength"):
        img2img_plan("ddim", AC, 50, 1.5)
    # the k-diffusion samplers: the level they start at, sigma_max at strength 1
    sigmas = schedule.linspace_sigmas(schedule.sigmas_from_alphas_cumprod(AC), 10)
    assert start_alpha("euler", AC, 10, 3) == pytest.approx(1 / (sigmas[3].item() ** 2 + 1), rel=1e-12)


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "euler_karras", "dpm_solver", "lms", "plms", "dpmpp_2m"])
def test_partial_run_times_and_step_count(name):
    """A run from first_step k evaluates the model at the times of the full run's steps k, k+1, ..., and calls
    back once per step run."""
    steps, k = 10, 4
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))

    def recorder(times):
        def model(x, t):
            times.append(round(t[0].item(), 6))
            return _toy_model(x, t)
        return model

    full_times, part_times, calls = [], [], []
    sample(name, recorder(full_times), x, AC, steps)
    sample(name, recorder(part_times), x, AC, steps, callback=lambda i, *_: calls.append(i), first_step=k)
    assert calls == list(range(steps - k))
    if name == "heun":  # two evaluations a step, one on the last (into sigma 0)
        assert len(full_times) == 2 * steps - 1 and part_times == full_times[2 * k:]
    elif name == "plms":  # the first step run warms up with a second evaluation at the next time
        assert len(full_times) == steps + 1
        assert part_times[1] == part_times[2] and part_times[:1] + part_times[2:] == full_times[k + 1:]
    else:
        assert len(full_times) == steps and part_times == full_times[k:]


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "euler_karras", "heun_karras"])
def test_partial_run_continues_the_full_run(name):
    """For a one-step method, stopping after step k - 1 and restarting there with first_step=k is the
    same computation as the full run (the callback's latent is in the variance-preserving scale)."""
    steps, k = 8, 3
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = {}
    full = sample(name, _toy_model, x, AC, steps, callback=lambda i, x_t, _: seen.setdefault(i, x_t))
    part = sample(name, _toy_model, seen[k - 1], AC, steps, first_step=k)
    assert rel_err(part, full) < 1e-10


def test_every_sampler_runs_part_way():
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    for name in SAMPLERS:
        calls = []
        out = sample(name, _toy_model, x, AC, 6, generator=torch.Generator().manual_seed(0),
                     callback=lambda i, *_: calls.append(i), first_step=2)
        assert calls == [0, 1, 2, 3], name
        assert torch.isfinite(out).all() and not torch.equal(out, x)
        assert torch.equal(sample(name, _toy_model, x, AC, 6, generator=torch.Generator(), first_step=6), x)


def test_fit_size_as_the_original():
    img = Image.new("RGB", (130, 70), (10, 20, 30))
    out, note = fit_size(img, 32)
    assert out.size == (128, 64) and "130x70" in note and "128x64" in note
    assert fit_size(Image.new("RGB", (64, 96)), 32) == (fit_size(Image.new("RGB", (64, 96)), 32)[0], None)
    with pytest.raises(ValueError, match="at least 32"):
        fit_size(Image.new("RGB", (20, 64)), 32)


# ----------------------------------------------------------------------------- parity with diffusers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    config, ckpt = write_tiny_model(folder)
    return config, ckpt


@pytest.mark.parametrize("steps,strength,eta", fast_first((20, 0.5, 0.0), (10, 0.75, 0.0)))
def test_ddim_img2img_parity_with_diffusers(tiny, steps, strength, eta):
    """The original img2img.py's DDIM semantics against diffusers' StableDiffusionImg2ImgPipeline, fed the same
    encoded latent and noise. Both run int(strength * steps) steps (diffusers' get_timesteps: init_timestep =
    min(int(steps * strength), steps), the last of them); they differ in the noise level only: diffusers
    noises to the first time it runs (add_noise at timesteps[t_start]), the original one DDIM stride above it
    (stochastic_encode at index t_enc, then decode over ddim_timesteps[:t_enc]). A DDIMScheduler whose
    add_noise adds that stride takes the original's level; everything else is diffusers' own."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from test_model_parity import _reference_models

    from ldm.img2img import to_tensor
    from ldm.pipeline import Options

    config, ckpt = tiny
    pipe = Img2Img.from_files(str(config), str(ckpt), device="cpu", precision="full", hash_model=False)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 130, 3), dtype=np.uint8))
    note = pipe.set_init_image(init)
    assert pipe.init_image.size == (128, 64) and note  # 64: the tiny UNet's three downsamplings x f = 8

    opts = Options("ddim", steps, 5.0, eta, 64, 128, strength=strength)
    item = WorkItem(0, "a red circle", "blurry", seed=1234)
    ours_t, calls = [], []
    unet = pipe.unet

    def counting(x, t, c):
        ours_t.append(t[0].item())
        return unet(x, t, c)

    pipe.unet = counting
    with torch.no_grad():
        z_ours = pipe.sample([item], opts, callback=lambda i, *_: calls.append(i))
        cond, uncond = pipe.conditioning(item.prompt, item.negative_prompt)
        noise, z0 = item_noise(pipe.model, pipe.posterior(), item.seed, opts.latent_shape())

        # the encoded latent is the scaled posterior sample of diffusers' VAE with the same draw
        sd = load_file(str(ckpt))
        _, vae, _ = _reference_models(OmegaConf.to_container(OmegaConf.load(config)), sd)
        dist = vae.encode(to_tensor(pipe.init_image)).latent_dist
        g = torch.Generator().manual_seed(item.seed)
        torch.randn(opts.latent_shape(), generator=g)  # the noise comes first
        ref_z0 = 0.18215 * (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g))
        assert rel_err(z0, ref_z0[0]) < 1e-4

        dpipe = _diffusers_pipe_from(sd, config)
        theirs_t = []
        forward = dpipe.unet.forward

        def counting_forward(x, t, *a, **kw):
            theirs_t.append(float(t))
            return forward(x, t, *a, **kw)

        dpipe.unet.forward = counting_forward
        z_ref = dpipe(image=z0[None], strength=strength, num_inference_steps=steps, guidance_scale=5.0, eta=eta,
                      prompt_embeds=cond, negative_prompt_embeds=uncond, output_type="latent",
                      generator=torch.Generator().manual_seed(item.seed)).images
    t_enc = int(strength * steps)
    assert len(calls) == t_enc == len(theirs_t)  # the step count the original runs
    stride = 1000 // steps
    assert ours_t == theirs_t == [float(stride * (t_enc - 1 - i) + 1) for i in range(t_enc)]
    assert rel_err(z_ours, z_ref) < 1e-4


def _diffusers_pipe_from(sd, config):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from omegaconf import OmegaConf

    from test_model_parity import _reference_models

    class OriginalOffsetDDIM(DDIMScheduler):
        """diffusers noises to the first time it runs; the original one DDIM stride above it."""

        def add_noise(self, original_samples, noise, timesteps):
            stride = self.config.num_train_timesteps // self.num_inference_steps
            return super().add_noise(original_samples, noise, (timesteps + stride).clamp(max=999))

    unet, vae, _ = _reference_models(OmegaConf.to_container(OmegaConf.load(config)), sd)
    scheduler = OriginalOffsetDDIM(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                   steps_offset=1, timestep_spacing="leading")
    return StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)


@pytest.mark.slow
def test_each_image_reproducible_from_its_seed(tiny):
    config, ckpt = tiny
    pipe = Img2Img.from_files(str(config), str(ckpt), device="cpu", precision="full", hash_model=False)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    run = pipe(init, "a square", strength=0.6, steps=5, seed=10, n_samples=2, n_iter=1, sampler="euler_a")
    alone = pipe(init, "a square", strength=0.6, steps=5, seed=11, n_samples=1, n_iter=1, sampler="euler_a")
    assert np.array_equal(np.asarray(run[1].image), np.asarray(alone[0].image))
    assert not np.array_equal(np.asarray(run[0].image), np.asarray(run[1].image))
    assert run[1].settings["Denoising strength"] == "0.6" and run[1].settings["Seed"] == 11


# ----------------------------------------------------------------------------- the command line


def _png(path, size=(64, 64), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        ["--init-img", str(tmp_path / "missing.png")],
        ["--init-img", str(tmp_path)],
        ["--init-img", str(_png(tmp_path / "a.png")), "--strength", "1.5"],
        ["--init-img", str(_png(tmp_path / "b.png")), "--strength", "-0.1"],
        [],
    ]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cases.append(["--init-img", str(tmp_path / "broken.png")])
    for extra in cases:
        rc = cli.img2img_main(["--demo", "--outdir", str(out), *extra])
        err = capsys.readouterr().err
        assert rc == 1, extra
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("img2img: error: "), err
        assert not out.exists()


def test_cli_has_every_original_flag(capsys):
    assert cli.img2img_main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for flag in ("--prompt", "--init-img", "--outdir", "--skip_grid", "--skip_save", "--ddim_steps", "--plms",
                 "--fixed_code", "--ddim_eta", "--n_iter", "--C", "--f", "--n_samples", "--n_rows", "--scale",
                 "--strength", "--from-file", "--config", "--ckpt", "--seed", "--precision", "--sampler",
                 "--negative_prompt", "--from_png"):
        assert flag in help_text, flag
    assert not re.search(r"^ +--(H|W|hr_scale)\b", help_text, re.M)  # the size is the init image's


def test_cli_writes_images_with_metadata(tmp_path, capsys):
    init = _png(tmp_path / "init.png", size=(70, 66))
    out = tmp_path / "out"
    rc = cli.img2img_main(["--demo", "--init-img", str(init), "--outdir", str(out), "--ddim_steps", "4",
                           "--n_samples", "1", "--n_iter", "2", "--strength", "0.5", "--seed", "3",
                           "--prompt", "a blue circle", "--no_watermark"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "70x66 resized to 64x64" in err
    samples = sorted((out / "samples").glob("*.png"))
    assert len(samples) == 2 and len(list(out.glob("grid-*.png"))) == 1
    from ldm.images import read_parameters

    text = read_parameters(samples[1])
    assert "Denoising strength: 0.5" in text and "Seed: 4" in text and "Size: 64x64" in text
    # --from_png regenerates it exactly (with the init image)
    again = tmp_path / "again"
    rc = cli.img2img_main(["--from_png", str(samples[1]), "--init-img", str(init), "--outdir", str(again),
                           "--no_watermark", "--skip_grid"])
    assert rc == 0, capsys.readouterr().err
    (regen,) = (again / "samples").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(regen)), np.asarray(Image.open(samples[1])))


def test_script_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts/img2img.py"), "--prompt", "x"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr == "img2img: error: img2img needs --init-img FILE: the image to rework\n"


# ----------------------------------------------------------------------------- the demo model


def test_demo_red_circle_turns_blue():
    """img2img of a red circle with the prompt "a blue circle" at strength 0.75 turns it blue (demo classifier)."""
    from ldm.demo import shapes

    pipe = Img2Img.from_files(str(ROOT / "configs/demo/shapes.yaml"), str(ROOT / "models/demo/shapes.safetensors"),
                              device="cpu", precision="full", hash_model=False)
    red = Image.fromarray(shapes.render(shapes.Scene("circle", "red", "white", 32, 32, 36)))
    assert shapes.classify(np.asarray(red))[:2] == ("circle", "red")
    results = pipe(red, "a blue circle", strength=0.75, steps=20, scale=7.5, seed=0, n_samples=4, n_iter=1)
    found = [shapes.classify(np.asarray(r.image)) for r in results]
    assert all(colour == "blue" for _, colour, _ in found), found
    assert sum(shape == "circle" for shape, _, _ in found) >= 3, found
    # at strength 0 nothing is denoised: the picture is the autoencoder's round trip, still red
    kept = pipe(red, "a blue circle", strength=0.0, steps=20, scale=7.5, seed=0, n_samples=1, n_iter=1)
    assert shapes.classify(np.asarray(kept[0].image))[:2] == ("circle", "red")
    assert math.isclose(float(kept[0].settings["Denoising strength"]), 0.0)


# ----------------------------------------------------------------------------- masked img2img (inpainting)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_masked_img2img_keeps_the_unmasked_region(tiny, sampler):
    config, ckpt = tiny
    pipe = Img2Img.from_files(str(config), str(ckpt), device="cpu", precision="full", hash_model=False)
    init = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 128, 3), dtype=np.uint8))
    pipe.set_init_image(init)
    mask = Image.new("L", (64, 32), 0)  # half the size: resized to the init image's, with a notice
    mask.paste(255, (32, 0, 64, 32))  # repaint the right half
    note = pipe.set_mask(mask, blur=2)
    assert "64x32 resized to the init image's 128x64" in note
    from ldm.pipeline import Options

    opts = Options(sampler, 8, 5.0, None, 64, 128, strength=0.8)
    item = WorkItem(0, "a circle", "", seed=5)
    with torch.no_grad():
        z = pipe.sample([item], opts)
        _, z0 = item_noise(pipe.model, pipe.posterior(), item.seed, opts.latent_shape())
    keep = pipe._keep((8, 16))[0, 0]
    assert keep[:, :6].eq(1).all() and keep[:, -6:].eq(0).all()
    assert torch.equal(z[0][:, keep == 1], z0.float()[:, keep == 1])  # the known latent is the init's
    assert (z[0][:, :, -6:] - z0[:, :, -6:]).abs().mean() > 0.1  # the masked one is repainted

    (r,) = pipe(init, "a circle", strength=0.8, steps=8, sampler=sampler, seed=5, mask=mask, mask_blur=2)
    out, src, m = (np.asarray(x, dtype=np.int16) for x in (r.image, pipe.init_image, pipe.mask))
    assert np.array_equal(out[m == 0], src[m == 0])  # the unmasked pixels come back exactly
    assert np.abs(out[:, -20:] - src[:, -20:]).mean() > 5
    assert r.settings["Mask blur"] == 2


def test_cli_mask_errors(tmp_path, capsys):
    init = _png(tmp_path / "init.png")
    out = tmp_path / "out"
    for extra in (["--mask", str(tmp_path / "nope.png")], ["--mask", str(init), "--mask_blur", "-1"]):
        assert cli.img2img_main(["--demo", "--init-img", str(init), "--outdir", str(out), *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("img2img: error: --mask"), err
        assert not out.exists()


# ----------------------------------------------------------------------------- 9-channel inpainting models


@pytest.fixture(scope="module")
def tiny_inpaint(tmp_path_factory):
    from omegaconf import OmegaConf

    from helpers import randomize_, save_checkpoint, tiny_config
    from ldm.checkpoint import build_model

    folder = tmp_path_factory.mktemp("inpaint")
    cfg = tiny_config()
    cfg["model"]["target"] = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    cfg["model"]["params"]["conditioning_key"] = "hybrid"
    cfg["model"]["params"]["finetune_keys"] = None
    cfg["model"]["params"]["unet_config"]["params"]["in_channels"] = 9
    config = folder / "tiny-inpaint.yaml"
    OmegaConf.save(OmegaConf.create(cfg), config)
    ckpt = save_checkpoint(randomize_(build_model(cfg, "cpu"), seed=3), folder / "tiny-inpaint.safetensors")
    return cfg, config, ckpt


def test_inpainting_model_parity_with_diffusers(tiny_inpaint):
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline
    from safetensors.torch import load_file
    from test_model_parity import _reference_models

    from ldm.img2img import to_tensor
    from ldm.pipeline import Options

    cfg, config, ckpt = tiny_inpaint
    pipe = Img2Img.from_files(str(config), str(ckpt), device="cpu", precision="full", hash_model=False)
    assert pipe.inpainting
    init = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 128, 3), dtype=np.uint8))
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (40, 8, 100, 56))
    pipe.set_init_image(init)
    pipe.set_mask(mask, blur=0)
    opts = Options("ddim", 10, 5.0, None, 64, 128, strength=1.0)
    item = WorkItem(0, "a circle", "", seed=21)
    calls = []
    with torch.no_grad():
        z_ours = pipe.sample([item], opts, callback=lambda i, *_: calls.append(i))
        cond, uncond = pipe.conditioning(item.prompt, item.negative_prompt)
        concat = pipe.inpaint_concat((8, 16))
        unet, vae, _ = _reference_models(cfg, load_file(str(ckpt)))
        # the masked image's latent: the hole set to 0 before encoding, the posterior mean, scaled
        m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]
        ref = 0.18215 * vae.encode(to_tensor(init) * (m < 0.5)).latent_dist.mean
        assert rel_err(concat[:, 1:], ref) < 1e-4
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                  steps_offset=1, timestep_spacing="leading")
        dpipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                               scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False)
        z_ref = dpipe(image=init, mask_image=mask, masked_image_latents=concat[:, 1:], height=64, width=128,
                      strength=1.0, num_inference_steps=10, guidance_scale=5.0, prompt_embeds=cond,
                      negative_prompt_embeds=uncond, output_type="latent",
                      generator=torch.Generator().manual_seed(item.seed)).images
    assert calls == list(range(10))
    assert rel_err(z_ours, z_ref) < 1e-4


def test_inpainting_checkpoint_detected(tiny_inpaint, tmp_path):
    from ldm import detect

    _, _, ckpt = tiny_inpaint
    shapes = detect.checkpoint_shapes(ckpt)
    # the tiny model's context is 64; a v1-sized context width makes it an SD v1 inpainting layout
    shapes = {k: (s[0], 768) if ".attn2.to_k." in k else s for k, s in shapes.items()}
    assert detect.family(shapes) == "v1-inpainting"
    assert detect.CONFIGS["v1-inpainting"] == "configs/stable-diffusion/v1-inpainting-inference.yaml"
    from ldm.checkpoint import build_model

    model = build_model(ROOT / detect.CONFIGS["v1-inpainting"], "meta")
    assert model.model.diffusion_model.in_channels == 9 and type(model).__name__ == "LatentInpaintDiffusion"


@pytest.mark.slow
def test_torchrun_two_processes_give_the_same_images(tiny, tmp_path):
    from test_distributed import assert_same, env

    config, ckpt = tiny
    init = _png(tmp_path / "init.png", size=(64, 64))
    args = [str(ROOT / "scripts/img2img.py"), "--init-img", str(init), "--prompt", "a square", "--n_samples", "2",
            "--n_iter", "2", "--ddim_steps", "4", "--strength", "0.6", "--sampler", "euler_a", "--config",
            str(config), "--ckpt", str(ckpt), "--device", "cpu", "--no_safety_checker", "--no_watermark"]
    one = subprocess.run([sys.executable, *args, "--outdir", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env(), cwd=ROOT, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                          "--outdir", str(tmp_path / "two")], capture_output=True, text=True, env=env(), cwd=ROOT,
                         timeout=300)
    assert two.returncode == 0, two.stderr
    assert len(list((tmp_path / "two" / "samples").glob("*.png"))) == 4
    assert_same(tmp_path / "one", tmp_path / "two")


def test_cli_inpainting_model(tiny_inpaint, tmp_path, capsys):
    _, config, ckpt = tiny_inpaint
    common = ["--config", str(config), "--ckpt", str(ckpt), "--no_safety_checker", "--no_watermark", "--n_samples",
              "1", "--n_iter", "1", "--ddim_steps", "3"]
    assert cli.main([*common, "--H", "64", "--W", "64", "--outdir", str(tmp_path / "t2i")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("txt2img: error: ") and "is an inpainting checkpoint" in err[-1]
    assert not list((tmp_path / "t2i").rglob("*.png"))
    init = _png(tmp_path / "init.png", size=(64, 64), colour=(20, 200, 20))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out"
    assert cli.img2img_main([*common, "--init-img", str(init), "--mask", str(tmp_path / "mask.png"), "--strength", "1",
                             "--mask_blur", "0", "--outdir", str(out), "--skip_grid"]) == 0, capsys.readouterr().err
    (png,) = (out / "samples").glob("*.png")
    img = np.asarray(Image.open(png).convert("RGB"))
    outside = np.asarray(mask) == 0
    assert (img[outside] == (20, 200, 20)).all() and not (img[~outside] == (20, 200, 20)).all()


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_known_region_denoiser_predicts_the_init_latent(parameterization):
    from ldm.img2img import known_region_denoiser
    from ldm.samplers.parameterization import eps_and_x0

    g = torch.Generator().manual_seed(4)
    z0, x = torch.randn(2, 4, 4, 6, generator=g), torch.randn(2, 4, 4, 6, generator=g)
    keep = torch.zeros(1, 1, 4, 6)
    keep[..., :3] = 1
    fn = known_region_denoiser(_toy_model, z0, keep, AC, parameterization)
    for t in (981.0, 400.0, 21.0):
        tt = torch.full((2,), t)
        a = AC[int(t)].item()
        _, x0 = eps_and_x0(fn(x, tt), x, a, parameterization)
        _, x0_model = eps_and_x0(_toy_model(x, tt), x, a, parameterization)
        assert torch.allclose(x0[..., :3], z0[..., :3], atol=1e-4)
        assert torch.allclose(x0[..., 3:], x0_model[..., 3:], atol=1e-4)
