"""Parity of our model with diffusers' and transformers' implementations, on random weights.

Our model's state dict, in the original checkpoint layout, goes through diffusers' own
converters for original checkpoints; both sides then compute the same thing.
"""

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel

from helpers import V1_CONFIG, randomize_, rel_err, tiny_config
from ldm.backends import deoptimize, optimize
from ldm.checkpoint import build_model
from ldm.config import model_config

TOL = 1e-4


def _reference_models(config, sd):
    """diffusers UNet + VAE and transformers CLIP text model holding the same weights."""
    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(config, sd)
    unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, unet_cfg))

    vae_cfg = sfu.create_vae_diffusers_config_from_ldm(config, sd, scaling_factor=0.18215)
    vae = DiffusersVAE(**vae_cfg)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, vae_cfg))

    p = config["model"]["params"]["cond_stage_config"].get("params") or {}
    text_cfg = CLIPTextConfig(
        vocab_size=p.get("vocab_size", 49408), hidden_size=p.get("hidden_size", 768),
        num_hidden_layers=p.get("num_hidden_layers", 12), num_attention_heads=p.get("num_attention_heads", 12),
        intermediate_size=p.get("intermediate_size", 3072), max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )
    clip = CLIPTextModel(text_cfg)
    clip_sd = sfu.convert_ldm_clip_checkpoint(sd)
    expected = clip.state_dict().keys()
    if not any(k.startswith("text_model.") for k in expected):  # transformers >= 5 drops the wrapper name
        clip_sd = {k.removeprefix("text_model."): v for k, v in clip_sd.items()}
    leftover = set(clip_sd) - set(expected)
    assert leftover <= {"embeddings.position_ids", "text_model.embeddings.position_ids"}
    clip.load_state_dict({k: v for k, v in clip_sd.items() if k not in leftover}, strict=True)
    return unet.eval(), vae.eval(), clip.eval()


def _check_parity(config, latent=16, batch=2, seed=0):
    torch.manual_seed(seed)
    ours = build_model(config, "cpu")
    randomize_(ours, seed)
    ours.eval()
    sd = ours.state_dict()
    unet, vae, clip = _reference_models(config, sd)
    g = torch.Generator().manual_seed(seed + 1)
    ctx_dim = ours.model.diffusion_model.context_dim

    with torch.no_grad():
        x = torch.randn(batch, 4, latent, latent, generator=g)
        t = torch.tensor([981.0, 37.5][:batch])
        ctx = torch.randn(batch, 77, ctx_dim, generator=g)
        eps_ours = ours.apply_model(x, t, ctx)
        eps_ref = unet(x, t, encoder_hidden_states=ctx).sample
        assert rel_err(eps_ours, eps_ref) < TOL

        # the optimized model under guidance: each latent under an unconditional and a conditional
        # context, the latents given once
        ctx2 = torch.cat([torch.randn(batch, 77, ctx_dim, generator=g), ctx])
        eps_ref = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=ctx2).sample
        assert rel_err(ours.apply_model(torch.cat([x, x]), torch.cat([t, t]), ctx2), eps_ref) < TOL
        optimize(ours)
        eps_fan = ours.apply_model(x, t, ctx2)
        assert eps_fan.shape == (2 * batch, 4, latent, latent)
        assert rel_err(eps_fan, eps_ref) < TOL

        z = torch.randn(1, 4, latent, latent, generator=g)
        img = torch.rand(1, 3, 8 * latent, 8 * latent, generator=g) * 2 - 1
        ids = torch.randint(0, 49406, (batch, 77), generator=g)
        ids[:, 0] = 49406
        ids[:, 10:] = 49407
        img_ref, post_ref = vae.decode(z).sample, vae.encode(img).latent_dist
        h_ref = clip(input_ids=ids).last_hidden_state
        for _ in ("optimized", "reference"):
            img_ours = ours.first_stage_model.decode(z)
            assert img_ours.shape == (1, 3, 8 * latent, 8 * latent)
            assert rel_err(img_ours, img_ref) < TOL
            post_ours = ours.encode_first_stage(img)
            assert rel_err(post_ours.mean, post_ref.mean) < TOL
            assert rel_err(post_ours.logvar, post_ref.logvar) < TOL
            h_ours = ours.cond_stage_model.encode_ids(ids)
            assert h_ours.shape == (batch, 77, clip.config.hidden_size)
            assert rel_err(h_ours, h_ref) < TOL
            deoptimize(ours)
    return ours


def test_parity_reduced_width():
    _check_parity(tiny_config())


@pytest.mark.slow
def test_parity_full_v1_architecture():
    config = model_config(V1_CONFIG)
    ours = _check_parity({"model": config}, latent=16, batch=1)
    assert sum(p.numel() for p in ours.parameters()) == 1_066_235_307
