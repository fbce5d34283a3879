"""Shared test helpers: tiny configs of the real classes, random weights, comparisons."""

import copy
import math

import pytest
import torch
from safetensors.torch import save_file

V1_CONFIG = "configs/stable-diffusion/v1-inference.yaml"

TINY = {
    "model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "channels": 4,
            "conditioning_key": "crossattn", "scale_factor": 0.18215, "monitor": "val/loss", "use_ema": False,
            "unet_config": {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {
                    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                    "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 2],
                    "num_heads": 2, "use_spatial_transformer": True, "transformer_depth": 1,
                    "context_dim": 64, "use_checkpoint": True, "legacy": False,
                },
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {
                    "embed_dim": 4, "monitor": "val/rec_loss",
                    "ddconfig": {
                        "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
                        "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
                        "dropout": 0.0,
                    },
                    "lossconfig": {"target": "torch.nn.Identity"},
                },
            },
            "cond_stage_config": {
                "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                "params": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "intermediate_size": 128},
            },
        },
    }
}


def tiny_config():
    return copy.deepcopy(TINY)


@torch.no_grad()
def randomize_(module, seed=0):
    """Give every parameter random values of a sane scale (not the default init, which
    zero-initialises output layers and so hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        elif name.endswith("weight"):  # norm scales
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module


def fast_first(*values, fast=1):
    """Parametrize values of which the first `fast` run in the fast tier and the rest only in the slow one
    (CI runs all): one case of each kind while working, every case before landing. A tuple is the values of
    several names."""
    return [v if i < fast else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.slow)
            for i, v in enumerate(values)]


def rel_err(a, b):
    """max |a - b| / max |b|"""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def resident_pages(t):
    """(resident, all) whole pages under tensor t's data, from /proc/self/pagemap (Linux)."""
    import mmap

    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end <= start:
        return 0, 0
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start // page * 8)
        entries = torch.frombuffer(bytearray(f.read(8 * ((end - start) // page))), dtype=torch.int64)
    return int((entries < 0).sum()), len(entries)


def save_checkpoint(model, path):
    """Save a model's state dict in the original layout (.safetensors or .ckpt)."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, str(path))
    return path


def write_tiny_model(folder, seed=1):
    """The tiny config as YAML and a random-weight .safetensors checkpoint of it, in `folder`."""
    from omegaconf import OmegaConf

    from ldm.checkpoint import build_model

    cfg = tiny_config()
    config = folder / "tiny.yaml"
    OmegaConf.save(OmegaConf.create(cfg), config)
    ckpt = save_checkpoint(randomize_(build_model(cfg, "cpu"), seed=seed), folder / "tiny.safetensors")
    return config, ckpt


def squeeze_1x1(shape):
    """A shape with 1x1 convolution kernels dropped: diffusers keeps the VAE's 1x1-conv attention as linear layers."""
    shape = tuple(shape)
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def diffusers_layout(sd, config):
    """Our UNet and VAE keys mapped through diffusers' single-file converters, and diffusers' own models
    of the same config on the meta device: ({part: ({key: shape} converted, {key: shape} theirs)},
    the diffusers UNet config), shapes through `squeeze_1x1`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm)

    checkpoint = {k: torch.empty(v.shape, device="meta") for k, v in sd.items()}
    unet_cfg = create_unet_diffusers_config_from_ldm(config, checkpoint)
    vae_cfg = create_vae_diffusers_config_from_ldm(config, checkpoint)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg)
    out = {}
    for name, converted, model in (("unet", convert_ldm_unet_checkpoint(checkpoint, unet_cfg), unet),
                                   ("vae", convert_ldm_vae_checkpoint(checkpoint, vae_cfg), vae)):
        out[name] = ({k: squeeze_1x1(v.shape) for k, v in converted.items()},
                     {k: squeeze_1x1(v.shape) for k, v in model.state_dict().items()})
    return out, unet_cfg
