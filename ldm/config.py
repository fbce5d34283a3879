"""Model configs: the original YAML schema, resolved to our classes through a short alias table.

A config is the original `v1-inference.yaml` (or a fine-tune's YAML in the same schema):
`model.target` names a class by its original import path and `model.params` holds its
constructor arguments, nested configs included. Every parameter the original accepts but this
tool does not use is listed once, in `IGNORED`, with the value it must have (or `ANY`); our
constructors take only what they use. An unknown target or parameter is a clear error, and
nothing is ever imported by name: `TARGETS` maps each original target to one of our classes,
resolved on first use (so the model modules can import this one without a cycle).
"""

import importlib
import inspect
from pathlib import Path

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A config that cannot describe a model this tool runs."""


_UNET = ("ldm.models.unet", "UNetModel")

# Original target string -> (our module, our class), imported when first instantiated.
TARGETS = {
    "ldm.models.diffusion.ddpm.LatentDiffusion": ("ldm.models.diffusion", "LatentDiffusion"),
    "ldm.models.diffusion.ddpm.LatentInpaintDiffusion": ("ldm.models.diffusion", "LatentInpaintDiffusion"),
    "ldm.modules.diffusionmodules.openaimodel.UNetModel": _UNET,
    "sgm.modules.diffusionmodules.openaimodel.UNetModel": _UNET,  # SDXL's network_config
    "ldm.models.autoencoder.AutoencoderKL": ("ldm.models.autoencoder", "AutoencoderKL"),
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": ("ldm.models.clip", "FrozenCLIPEmbedder"),
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": ("ldm.models.open_clip", "FrozenOpenCLIPEmbedder"),
    # SDXL (generative-models' sgm package): configs/sdxl/*.yaml
    "sgm.models.diffusion.DiffusionEngine": ("ldm.models.sdxl", "DiffusionEngine"),
    "sgm.modules.GeneralConditioner": ("ldm.models.sdxl", "GeneralConditioner"),
    "sgm.modules.encoders.modules.GeneralConditioner": ("ldm.models.sdxl", "GeneralConditioner"),
    "sgm.modules.encoders.modules.FrozenCLIPEmbedder": ("ldm.models.sdxl", "FrozenCLIPEmbedder"),
    "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2": ("ldm.models.sdxl", "FrozenOpenCLIPEmbedder2"),
    "sgm.modules.encoders.modules.ConcatTimestepEmbedderND": ("ldm.models.sdxl", "ConcatTimestepEmbedderND"),
    "sgm.models.autoencoder.AutoencoderKL": ("ldm.models.autoencoder", "AutoencoderKL"),
    "sgm.models.autoencoder.AutoencoderKLInferenceWrapper": ("ldm.models.autoencoder", "AutoencoderKL"),
    "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser": ("ldm.models.sdxl", "DiscreteDenoiser"),
    "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling": ("ldm.models.sdxl", "EpsScaling"),
    "sgm.modules.diffusionmodules.denoiser_scaling.VScaling": ("ldm.models.sdxl", "VScaling"),
    "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization": ("ldm.models.sdxl", "LegacyDDPMDiscretization"),
}

ANY = object()  # an ignored parameter that may take any value


def _off(value):
    """False, None or a list of False: a switch (or per-level switches) left off."""
    return not value or (isinstance(value, (list, tuple)) and not any(value))


# Parameters of the original classes that inference does not use, per target: the value each must
# have for this tool to compute what the original computes (a value, a predicate, or ANY).
_UNET_IGNORED = {
    # training and memory switches
    "use_checkpoint": ANY, "use_fp16": ANY, "dropout": ANY, "image_size": ANY, "use_fairscale_checkpoint": ANY,
    "offload_to_cpu": ANY, "spatial_transformer_attn_type": ANY,  # which attention kernel; the math is the same
    # no effect on a spatial transformer's head split (heads x head size = channels either way)
    "legacy": ANY, "num_heads_upsample": ANY, "use_new_attention_order": ANY,
    # architecture options of the original that no supported model uses
    "use_spatial_transformer": True, "conv_resample": True, "dims": 2, "use_scale_shift_norm": False,
    "resblock_updown": False, "n_embed": None, "disable_self_attentions": _off, "disable_middle_self_attn": False,
    "disable_middle_transformer": False, "num_attention_blocks": None,
}
IGNORED = {
    "ldm.models.diffusion.ddpm.LatentDiffusion": {
        "base_learning_rate": ANY, "monitor": ANY, "num_timesteps_cond": ANY, "log_every_t": ANY,
        "first_stage_key": ANY, "cond_stage_key": ANY, "cond_stage_trainable": ANY, "use_ema": ANY,
        "scheduler_config": ANY, "loss_type": ANY, "ckpt_path": ANY, "ignore_keys": ANY, "load_only_unet": ANY,
        "use_positional_encodings": ANY, "learn_logvar": ANY, "logvar_init": ANY, "original_elbo_weight": ANY,
        "l_simple_weight": ANY, "make_it_fit": ANY, "reset_ema": ANY, "reset_num_ema_updates": ANY,
        "ucg_training": ANY, "use_fp16": ANY, "cond_stage_forward": ANY, "concat_mode": ANY, "image_size": ANY,
        "clip_denoised": ANY, "v_posterior": ANY, "given_betas": ANY, "cosine_s": ANY, "conditioning_key_drop": ANY,
        "scale_by_std": ANY, "load_ema": ANY, "unet_trainable": ANY, "embedding_reg_weight": ANY,
        "personalization_config": ANY, "lightning": ANY, "data": ANY,
        "beta_schedule": "linear", "conditioning_key": "crossattn",
    },
    "ldm.modules.diffusionmodules.openaimodel.UNetModel": _UNET_IGNORED,
    "ldm.models.diffusion.ddpm.LatentInpaintDiffusion": {},  # filled below: LatentDiffusion's, plus its own
    "sgm.modules.diffusionmodules.openaimodel.UNetModel": _UNET_IGNORED,
    "ldm.models.autoencoder.AutoencoderKL": {
        "lossconfig": ANY, "ckpt_path": ANY, "ignore_keys": ANY, "image_key": ANY, "colorize_nlabels": ANY,
        "monitor": ANY, "ema_decay": ANY, "learn_logvar": ANY,
    },
    "ldm.models.autoencoder.AutoencoderKL/ddconfig": {  # the nested Encoder / Decoder parameters
        "dropout": ANY, "resamp_with_conv": True, "use_linear_attn": False, "attn_type": ("vanilla", "vanilla-xformers"),
        "give_pre_end": False, "tanh_out": False,
    },
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": {"device": ANY, "freeze": ANY, "layer": "last"},
}
# SDXL: the engine's training half (loss, sampler, optimizer) and run-time switches.
IGNORED["sgm.models.diffusion.DiffusionEngine"] = {
    "disable_first_stage_autocast": ANY, "sampler_config": ANY, "optimizer_config": ANY, "scheduler_config": ANY,
    "loss_fn_config": ANY, "network_wrapper": ANY, "ckpt_path": ANY, "use_ema": ANY, "ema_decay_rate": ANY,
    "input_key": ANY, "log_keys": ANY, "no_cond_log": ANY, "compile_model": ANY, "en_and_decode_n_samples_a_time": ANY,
}
for _vae in ("sgm.models.autoencoder.AutoencoderKL", "sgm.models.autoencoder.AutoencoderKLInferenceWrapper"):
    IGNORED[_vae] = IGNORED["ldm.models.autoencoder.AutoencoderKL"]
    IGNORED[_vae + "/ddconfig"] = IGNORED["ldm.models.autoencoder.AutoencoderKL/ddconfig"]


IGNORED["ldm.models.diffusion.ddpm.LatentInpaintDiffusion"] = {
    **{k: v for k, v in IGNORED["ldm.models.diffusion.ddpm.LatentDiffusion"].items() if k != "conditioning_key"},
    "finetune_keys": ANY, "masked_image_key": ANY,
}


def _accepts(expected, value):
    if expected is ANY:
        return True
    if callable(expected):
        return expected(value)
    if isinstance(expected, tuple):
        return value in expected
    return value == expected


def drop_ignored(where, params):
    """params without the parameters IGNORED[where] lists; ConfigError for one with a value we do not support."""
    table = IGNORED.get(where, {})
    kept = {}
    for name, value in params.items():
        if name not in table:
            kept[name] = value
        elif not _accepts(table[name], value):
            raise ConfigError(f"{where.split('/')[0]}: {name}={value!r} is not supported")
    return kept


def resolve(target):
    """Our class for an original target string (ConfigError for an unsupported one)."""
    entry = TARGETS.get(target)
    if entry is None:
        raise ConfigError(f"unsupported target {target!r}; supported: {', '.join(sorted(TARGETS))}")
    module, name = entry
    return getattr(importlib.import_module(module), name)


def load_config(path):
    """Read a YAML config file into a plain dict (interpolations resolved)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        conf = OmegaConf.load(path)
        data = OmegaConf.to_container(conf, resolve=True)
    except Exception as e:  # omegaconf and yaml raise many kinds
        raise ConfigError(f"cannot read config {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError(f"config {path} has no 'model' section with a 'target'")
    return data


def model_config(config):
    """The `model` section of a config given as a path, a dict or an OmegaConf object."""
    if isinstance(config, (str, Path)):
        config = load_config(config)
    elif not isinstance(config, dict):
        config = OmegaConf.to_container(config, resolve=True)
    return config["model"] if "model" in config else config


def instantiate(node):
    """Build the object a `{target, params}` node describes."""
    if not isinstance(node, dict) or "target" not in node:
        raise ConfigError(f"expected a config node with a 'target', got {node!r}"[:200])
    target = node["target"]
    cls = resolve(target)
    params = drop_ignored(target, node.get("params") or {})
    if isinstance(params.get("ddconfig"), dict):
        params["ddconfig"] = drop_ignored(f"{target}/ddconfig", params["ddconfig"])
    accepted = inspect.signature(cls.__init__).parameters
    unknown = [k for k in params if k not in accepted]
    if unknown:
        raise ConfigError(f"{target}: unknown parameter(s) {', '.join(unknown)}")
    try:
        return cls(**params)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{target}: {e}") from None
