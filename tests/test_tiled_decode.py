"""The autoencoder's tiled decode (bands of rows, whole-map GroupNorm statistics) against the plain decode.

Tiling must not show: the two images agree to float rounding, far inside 1/255 on every pixel.
"""

import copy

import pytest
import torch

from helpers import V1_CONFIG, randomize_, rel_err, tiny_config
from ldm.config import instantiate, model_config
from ldm.models.autoencoder import AutoencoderKL


def _vae(ddconfig_changes=None, seed=0):
    params = copy.deepcopy(tiny_config()["model"]["params"]["first_stage_config"]["params"])
    params["ddconfig"].update(ddconfig_changes or {})
    params.pop("monitor"), params["ddconfig"].pop("dropout")
    return randomize_(AutoencoderKL(**{k: v for k, v in params.items() if k != "lossconfig"}), seed).eval()


def _to_pixels(x):
    return ((x + 1) / 2).clamp(0, 1)


def _check(vae, z, tile, tol=1e-5):
    with torch.no_grad():
        whole = vae.decode(z)
        tiled = vae.decode_tiled(z, tile=tile)
    assert tiled.shape == whole.shape
    assert rel_err(tiled, whole) < tol
    assert (_to_pixels(tiled) - _to_pixels(whole)).abs().max() < 1 / 255
    return whole


@pytest.mark.parametrize("tile", [1, 3, 4, 16])
def test_tiled_matches_whole_any_band_height(tile):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 13, 10, generator=g)  # a height that no band size divides, batch of 2
    whole = _check(_vae(), z, tile)
    assert whole.shape == (2, 3, 104, 80)
    assert whole.std() > 0.1  # a real image, not a constant


def test_tiled_with_attention_inside_the_levels():
    # attention at the decoder's 16-pixel level (random latent 8x8 -> levels 8, 16, 32, 64): run whole
    vae = _vae({"attn_resolutions": [16]})
    assert any(len(up.attn) for up in vae.decoder.up)
    _check(vae, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)), tile=2)


def test_tiled_leaves_the_model_unchanged():
    vae = _vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with torch.no_grad():
        vae.decode_tiled(torch.randn(1, 4, 8, 8), tile=2)
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())


@pytest.mark.slow
def test_tiled_full_v1_vae_512x512():
    """The real v1 autoencoder, the latent of a 512x512 image, bands of 16 latent rows."""
    torch.manual_seed(0)
    vae = randomize_(instantiate(model_config(V1_CONFIG)["params"]["first_stage_config"]), 0).eval()
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3))
    whole = _check(vae, z, tile=16, tol=1e-4)
    assert whole.shape == (1, 3, 512, 512)


def test_decode_first_stage_tiles_large_latents(monkeypatch):
    from ldm.checkpoint import build_model
    from ldm.models import diffusion

    model = randomize_(build_model(tiny_config(), "cpu"), 0).eval()
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(4))
    calls = []
    tiled = model.first_stage_model.decode_tiled
    monkeypatch.setattr(model.first_stage_model, "decode_tiled", lambda z: calls.append(z.shape) or tiled(z))
    with torch.no_grad():
        whole = model.decode_first_stage(z)
        assert not calls  # 144 latent pixels: below the threshold
        monkeypatch.setattr(diffusion, "TILED_DECODE_ABOVE", 100)
        banded = model.decode_first_stage(z)
    assert calls == [(1, 4, 12, 12)]
    assert rel_err(banded, whole) < 1e-5
