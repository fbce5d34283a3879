"""Model configs: the original YAML schema, resolved to our classes through a short alias table.

A config is the original `v1-inference.yaml` (or a fine-tune's YAML in the same schema):
`model.target` names a class by its original import path and `model.params` holds its
constructor arguments, nested configs included. Training-only sections are dropped by name;
an unknown target or parameter is a clear error, and nothing is ever imported by name.
"""

import inspect
from pathlib import Path

from omegaconf import OmegaConf

from .models.autoencoder import AutoencoderKL
from .models.clip import FrozenCLIPEmbedder
from .models.diffusion import LatentDiffusion
from .models.open_clip import FrozenOpenCLIPEmbedder
from .models.unet import UNetModel


class ConfigError(ValueError):
    """A config that cannot describe a model this tool runs."""


# Original target string -> our class.
TARGETS = {
    "ldm.models.diffusion.ddpm.LatentDiffusion": LatentDiffusion,
    "ldm.modules.diffusionmodules.openaimodel.UNetModel": UNetModel,
    "ldm.models.autoencoder.AutoencoderKL": AutoencoderKL,
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": FrozenCLIPEmbedder,
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": FrozenOpenCLIPEmbedder,
}

# Sections of a config that only training reads.
TRAINING_SECTIONS = ("lightning", "data", "lossconfig", "scheduler_config", "personalization_config")


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
    cls = TARGETS.get(target)
    if cls is None:
        raise ConfigError(f"unsupported target {target!r}; supported: {', '.join(sorted(TARGETS))}")
    params = {k: v for k, v in (node.get("params") or {}).items() if k not in TRAINING_SECTIONS}
    accepted = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = [k for k in params if k not in accepted]
    if unknown and not takes_any:
        raise ConfigError(f"{target}: unknown parameter(s) {', '.join(unknown)}")
    try:
        return cls(**params)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{target}: {e}") from None
