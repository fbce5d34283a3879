"""Where files are: the source checkout's fallbacks for relative paths, and the bundled demo model.

Imports nothing heavy (the command line reads it before torch loads).
"""

from __future__ import annotations

import os
from pathlib import Path

from .defaults import DEFAULT_CKPT

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = "configs/demo/shapes.yaml"
DEMO_CKPT = "models/demo/shapes.safetensors"
MODELS_DIR = "models"  # searched (recursively) for a checkpoint by its hash
CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors")


def cache_dir() -> Path:
    """This user's cache folder for txt2img: $XDG_CACHE_HOME/txt2img (default ~/.cache/txt2img)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "txt2img"


def repo_path(path) -> Path:
    """`path` as given when it exists (relative to the working directory); else, when relative,
    the same path in the source checkout this package runs from, so defaults work from any cwd."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    in_repo = REPO_ROOT / path
    return in_repo if in_repo.exists() else path


def model_dirs() -> list[Path]:
    """The `models/` folders to search for checkpoints: the working directory's and the source
    checkout's (once when they are the same folder)."""
    dirs = []
    for d in (Path(MODELS_DIR), REPO_ROOT / MODELS_DIR):
        if d.is_dir() and all(d.resolve() != seen.resolve() for seen in dirs):
            dirs.append(d)
    return dirs


def is_demo_checkpoint(path) -> bool:
    return Path(path).resolve() == repo_path(DEMO_CKPT).resolve()


def missing_checkpoint_message(path) -> str:
    return (
        f"checkpoint not found: {path}. Stable Diffusion v1 weights (e.g. sd-v1-4.ckpt from "
        "huggingface.co/CompVis/stable-diffusion-v-1-4-original or v1-5-pruned-emaonly.safetensors from "
        f"huggingface.co/runwayml/stable-diffusion-v1-5) go to {DEFAULT_CKPT}, or pass --ckpt PATH; "
        "--demo runs the bundled demo model"
    )
