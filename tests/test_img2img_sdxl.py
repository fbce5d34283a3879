"""img2img and the hires fix on SDXL (tiny random base model as tests/test_sdxl.py builds it): the
guided denoiser carries the vector y, and the size conditioning is the size of the pass that runs."""

import numpy as np
import pytest
from PIL import Image

from ldm import cli
from ldm import conditioning as xl
from ldm.images import read_parameters
from test_sdxl import tiny_files  # noqa: F401  (the fixture, for pytest)


@pytest.fixture
def seen_sizes(monkeypatch):
    """(H, W) of every size conditioning the run builds."""
    sizes, real = [], xl.size_conditioning

    def spy(model, H, W, *args, **kwargs):
        sizes.append((H, W))
        return real(model, H, W, *args, **kwargs)

    monkeypatch.setattr(xl, "size_conditioning", spy)
    return sizes


def _common(files, tmp_path):
    config, ckpt = files["base"]
    return ["--config", str(config), "--ckpt", str(ckpt), "--no_safety_checker", "--no_watermark", "--n_samples", "1",
            "--n_iter", "1", "--ddim_steps", "4", "--prompt", "a lighthouse", "--outdir", str(tmp_path / "out"),
            "--skip_grid"]


def test_sdxl_img2img(tiny_files, tmp_path, capsys, monkeypatch, seen_sizes):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    init = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(init).save(tmp_path / "init.png")
    code = cli.img2img_main([*_common(tiny_files, tmp_path), "--init-img", str(tmp_path / "init.png"),
                             "--strength", "0.5"])
    assert code == 0, capsys.readouterr().err
    (png,) = (tmp_path / "out" / "samples").glob("*.png")
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (64, 96, 3) and image.std() > 0 and not np.array_equal(image, init)
    assert "Denoising strength: 0.5" in read_parameters(png)
    assert seen_sizes and set(seen_sizes) == {(64, 96)}


def test_sdxl_hires_fix(tiny_files, tmp_path, capsys, monkeypatch, seen_sizes):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code = cli.main([*_common(tiny_files, tmp_path), "--H", "64", "--W", "64", "--hr_scale", "2"])
    assert code == 0, capsys.readouterr().err
    (png,) = (tmp_path / "out" / "samples").glob("*.png")
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (128, 128, 3) and image.std() > 0
    text = read_parameters(png)
    assert "Hires upscale: 2" in text and "Size: 64x64" in text
    # the first pass conditioned on its own size, the second on the doubled one
    assert (64, 64) in seen_sizes and (128, 128) in seen_sizes
    assert seen_sizes.index((128, 128)) > seen_sizes.index((64, 64))
