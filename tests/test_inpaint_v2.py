"""SD 2.x inpainting (512-inpainting-ema: a 9-channel UNet under an OpenCLIP ViT-H/14 context of
1024): Stability's config, detection of such files, the UNet against diffusers', `img2img --mask`."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import randomize_, rel_err, save_checkpoint
from ldm import cli, detect
from ldm.checkpoint import build_model
from test_sd2 import tiny_v2_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_v2_inpaint(tmp_path_factory):
    from omegaconf import OmegaConf

    folder = tmp_path_factory.mktemp("v2-inpaint")
    cfg = tiny_v2_config()
    cfg["model"]["target"] = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    cfg["model"]["params"].update(conditioning_key="hybrid", finetune_keys=None)
    cfg["model"]["params"]["unet_config"]["params"]["in_channels"] = 9
    config = folder / "tiny-v2-inpaint.yaml"
    OmegaConf.save(OmegaConf.create(cfg), config)
    ckpt = save_checkpoint(randomize_(build_model(cfg, "cpu"), seed=5), folder / "tiny-v2-inpaint.safetensors")
    return cfg, config, Path(ckpt)


def test_v2_inpainting_config_is_stabilitys():
    model = build_model(ROOT / detect.CONFIGS["v2-inpainting"], "meta")
    unet = model.model.diffusion_model
    assert type(model).__name__ == "LatentInpaintDiffusion"
    assert unet.in_channels == 9 and unet.context_dim == 1024
    assert type(model.cond_stage_model).__name__ == "FrozenOpenCLIPEmbedder"
    assert model.parameterization == "eps"


def test_v2_inpainting_checkpoint_detected(tiny_v2_inpaint):
    _, _, ckpt = tiny_v2_inpaint
    shapes = detect.checkpoint_shapes(ckpt)
    assert any(k.startswith(detect.V2_TEXT) for k in shapes)
    # the tiny model's context is 64; the 2.x width (1024) makes it the 512-inpainting-ema layout
    wide = {k: (s[0], 1024) if ".attn2.to_k." in k else s for k, s in shapes.items()}
    assert detect.family(wide) == "v2-inpainting"
    v1_wide = {k: (s[0], 768) if ".attn2.to_k." in k else s for k, s in shapes.items()}
    assert detect.family(v1_wide) == "v1-inpainting"
    assert detect.CONFIGS["v2-inpainting"] == "configs/stable-diffusion/v2-inpainting-inference.yaml"


def test_v2_inpainting_unet_matches_diffusers(tiny_v2_inpaint):
    """Our model's prediction (latent, mask, masked-image latent concatenated) against diffusers'
    UNet2DConditionModel converted from the same file."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    from safetensors.torch import load_file

    cfg, _, ckpt = tiny_v2_inpaint
    sd = load_file(str(ckpt))
    ours = build_model(cfg, "cpu")
    ours.load_state_dict(sd, strict=False)
    ours.eval()
    ucfg = create_unet_diffusers_config_from_ldm(cfg, sd)
    assert ucfg["in_channels"] == 9 and ucfg["use_linear_projection"] is True
    theirs = UNet2DConditionModel(**ucfg).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(sd, ucfg), strict=True)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 16, generator=g)
    concat = torch.cat([(torch.rand(2, 1, 8, 16, generator=g) > 0.5).float(), torch.randn(2, 4, 8, 16, generator=g)], 1)
    t = torch.tensor([981.0, 37.5])
    ctx = torch.randn(2, 77, ours.model.diffusion_model.context_dim, generator=g)
    with torch.no_grad():
        want = theirs(torch.cat([x, concat], 1), t, encoder_hidden_states=ctx).sample
        got = ours.apply_model(x, t, ctx, c_concat=concat)
    assert want.abs().mean() > 0
    assert rel_err(got, want) < 1e-4


def test_cli_v2_inpainting_model(tiny_v2_inpaint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _, config, ckpt = tiny_v2_inpaint
    Image.new("RGB", (64, 64), (20, 200, 20)).save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out"
    code = cli.img2img_main(["--config", str(config), "--ckpt", str(ckpt), "--no_safety_checker", "--no_watermark",
                             "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "3", "--init-img",
                             str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--strength", "1",
                             "--mask_blur", "0", "--outdir", str(out), "--skip_grid"])
    assert code == 0, capsys.readouterr().err
    (png,) = (out / "samples").glob("*.png")
    img = np.asarray(Image.open(png).convert("RGB"))
    outside = np.asarray(mask) == 0
    assert (img[outside] == (20, 200, 20)).all() and not (img[~outside] == (20, 200, 20)).all()
