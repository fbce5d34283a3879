"""The hires fix of txt2img (--hr_scale): a first pass, an upscale, an img2img pass at the larger size."""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_tiny_model
from ldm import cli
from ldm.img2img import hires_size, upscale_latent
from ldm.pipeline import Options, Txt2Img
from ldm.planning import WorkItem


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    config, ckpt = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    return Txt2Img.from_files(str(config), str(ckpt), device="cpu", precision="full", hash_model=False)


def _shapes_seen(pipe):
    seen = []
    unet = pipe.unet

    def recording(x, t, c):
        seen.append(tuple(x.shape[-2:]))
        return unet(x, t, c)

    pipe.unet = recording
    return seen, unet


@pytest.mark.parametrize("upscaler", ["latent", pytest.param("lanczos", marks=pytest.mark.slow)])
def test_second_pass_runs_at_scale_times_the_size(pipe, upscaler):
    seen, unet = _shapes_seen(pipe)
    try:
        results = pipe("a circle", steps=6, H=64, W=128, seed=3, n_samples=1, n_iter=1, hr_scale=2, hr_steps=10,
                       hr_strength=0.45, hr_upscaler=upscaler)
    finally:
        pipe.unet = unet
    assert seen == [(8, 16)] * 6 + [(16, 32)] * 4  # int(0.45 * 10) = 4 steps of the second pass
    assert results[0].image.size == (256, 128)
    s = results[0].settings
    assert (s["Size"], s["Hires upscale"], s["Hires steps"], s["Denoising strength"]) == ("128x64", "2", 10, "0.45")
    assert s["Hires upscaler"] == {"latent": "Latent", "lanczos": "Lanczos"}[upscaler]
    opts = Options(steps=6, H=64, W=128, hr_scale=2, hr_steps=10, hr_strength=0.45)
    assert pipe.steps_per_run(opts) == 10


@pytest.mark.slow
def test_strength_zero_is_the_upscaled_first_pass(pipe):
    opts = Options(steps=5, H=64, W=64)
    item = WorkItem(0, "a square", "", seed=9)
    with torch.no_grad():
        z = pipe.sample([item], opts)
        expected = pipe.decode(upscale_latent(z, (16, 16)))[0]
    results = pipe("a square", steps=5, H=64, W=64, seed=9, n_samples=1, n_iter=1, hr_scale=2, hr_strength=0.0)
    assert results[0].image.size == (128, 128)
    assert np.array_equal(np.asarray(results[0].image), np.asarray(expected))
    # and not the same as a real second pass
    other = pipe("a square", steps=5, H=64, W=64, seed=9, n_samples=1, n_iter=1, hr_scale=2, hr_strength=0.5)
    assert not np.array_equal(np.asarray(other[0].image), np.asarray(expected))


def test_hires_size_rounds_to_the_models_multiple():
    assert hires_size(Options(H=64, W=128, hr_scale=1.5), 64) == (64, 192)
    assert hires_size(Options(H=512, W=512, hr_scale=2), 64) == (1024, 1024)


def test_cli_hires_scale_below_one(tmp_path, capsys):
    out = tmp_path / "out"
    for flag, value in (("--hr_scale", "0.5"), ("--hr_strength", "1.2"), ("--hr_steps", "0")):
        assert cli.main(["--demo", "--outdir", str(out), "--hr_scale", "2", flag, value]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"txt2img: error: {flag} must"), err
        assert not out.exists()


def test_cli_hires_demo(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["--demo", "--outdir", str(out), "--hr_scale", "2", "--ddim_steps", "5", "--n_samples", "1",
                   "--n_iter", "1", "--no_watermark", "--skip_grid", "--hr_upscaler", "lanczos"])
    assert rc == 0, capsys.readouterr().err
    (png,) = (out / "samples").glob("*.png")
    assert Image.open(png).size == (128, 128)
    from ldm.images import read_parameters
    from ldm.metadata import options_from_parameters

    meta = options_from_parameters(read_parameters(png))
    assert (meta["hr_scale"], meta["hr_steps"], meta["hr_strength"], meta["hr_upscaler"]) == (2.0, 5, 0.5, "lanczos")
    again = tmp_path / "again"
    assert cli.main(["--from_png", str(png), "--outdir", str(again), "--no_watermark", "--skip_grid"]) == 0
    (regen,) = (again / "samples").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(regen)), np.asarray(Image.open(png)))
