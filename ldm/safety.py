"""The safety checker of the original txt2img: diffusers' StableDiffusionSafetyChecker.

It is loaded from a folder given by the user (a `save_pretrained` folder with `config.json`, the
weights and `preprocessor_config.json`), or from the Hugging Face cache of
CompVis/stable-diffusion-safety-checker. On first use, when it is not cached, it is downloaded once
into that cache (with a progress bar), as the original txt2img did; offline (`HF_HUB_OFFLINE=1`)
or without network, `SafetyCheckerError` says how to provide it. It is never skipped silently.

A flagged image is replaced, not written as generated: by a black image (the default) or a
heavily blurred one.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

log = logging.getLogger(__name__)

HUB_ID = "CompVis/stable-diffusion-safety-checker"
REPLACEMENTS = ("black", "blur")


class SafetyCheckerError(RuntimeError):
    """The safety checker could not be loaded."""


def how_to_provide() -> str:
    return (f"download {HUB_ID} once (e.g. `hf download {HUB_ID}` into the Hugging Face cache, "
            "or `save_pretrained` into a folder and pass --safety_checker DIR), or pass --no_safety_checker "
            "to run without it")


def _image_processor_class():
    """CLIP's image preprocessing; the PIL implementation where transformers has one (the default
    one wants torchvision, which this package does not depend on)."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


@contextlib.contextmanager
def _quiet_hf():
    """Silence transformers' and diffusers' own warnings and progress bars: flagged images are
    reported by the caller, and loading a few megabytes needs no bar."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (transformers_logging, diffusers_logging)]
    for m, _, _ in saved:
        m.set_verbosity_error()
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, verbosity, bar in saved:
            m.set_verbosity(verbosity)
            if bar:
                m.enable_progress_bar()


class SafetyChecker:
    """CLIP image features against the checker's concept embeddings; flags images per concept threshold."""

    def __init__(self, model, processor, device="cpu"):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device

    @classmethod
    def load(cls, path=None, device="cpu", download=True) -> SafetyChecker:
        """From the folder `path`, or from the Hugging Face cache when `path` is None, downloading it
        there first if it is missing, `download` is true and the hub is not in offline mode."""
        if path is not None:
            folder = Path(path)
            if not folder.is_dir():
                raise SafetyCheckerError(f"safety checker folder not found: {path}; {how_to_provide()}")
            missing = [n for n in ("config.json", "preprocessor_config.json") if not (folder / n).is_file()]
            if not any((folder / n).is_file() for n in WEIGHT_FILES):
                missing.append("model.safetensors")
            if missing:
                raise SafetyCheckerError(
                    f"safety checker folder {path} lacks {', '.join(missing)}; {how_to_provide()}")
            return cls(*_load_local(str(path), f"folder {path}"), device)
        try:
            model, processor = _load_local(HUB_ID, "")
        except SafetyCheckerError:
            if not download or _hub_offline():
                raise SafetyCheckerError(f"cannot load the safety checker: it is not in the local Hugging Face cache "
                                         f"({HUB_ID}); {how_to_provide()}") from None
            model, processor = _load_local(str(download_to_cache()), "the downloaded files")
        return cls(model, processor, device)

    def flags(self, images: list[Image.Image]) -> list[bool]:
        """Whether each image is flagged."""
        import torch

        clip_input = self.processor(images=images, return_tensors="pt").pixel_values
        param = next(self.model.parameters())
        clip_input = clip_input.to(device=param.device, dtype=param.dtype)
        arrays = np.stack([np.asarray(img, dtype=np.float32) / 255.0 for img in images])
        with torch.no_grad(), _quiet_hf():
            _, flagged = self.model(clip_input=clip_input, images=arrays)  # it blacks out its copy; ours stay
        return [bool(f) for f in flagged]


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _load_local(source: str, where: str):
    """(model, processor) from a folder or the local cache only; SafetyCheckerError naming `where`."""
    try:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        with _quiet_hf():
            processor = _image_processor_class().from_pretrained(source, local_files_only=True)
            model = StableDiffusionSafetyChecker.from_pretrained(source, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError... for missing or broken files
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SafetyCheckerError(f"cannot load the safety checker: {where}: {detail[:160]}; {how_to_provide()}") from None
    log.info("safety checker loaded from %s", source)
    return model, processor


def _hub_offline() -> bool:
    """huggingface_hub's offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, read when it was imported)."""
    import huggingface_hub

    check = getattr(huggingface_hub, "is_offline_mode", None)
    return bool(check()) if check else bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def download_to_cache() -> Path:
    """Download the safety checker into the Hugging Face cache (once; progress bars on stderr) and
    return its snapshot folder. SafetyCheckerError when the hub cannot be reached."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    try:
        # One plain request first: hf_hub_download retries an unreachable hub for half a minute.
        get_hf_file_metadata(hf_hub_url(HUB_ID, "config.json"), timeout=10)
    except Exception as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SafetyCheckerError(f"cannot load the safety checker: it is not in the local Hugging Face cache ({HUB_ID}) "
                                 f"and the hub could not be reached ({type(e).__name__}: {detail[:160]}); "
                                 f"{how_to_provide()}") from None
    try:
        for name in ("config.json", "preprocessor_config.json"):
            config = hf_hub_download(HUB_ID, name)
        # The hub answered: say so once before the large file (its progress bar follows).
        log.warning("the safety checker %s is not in the Hugging Face cache: downloading it once "
                    "(about 1.2 GB; --no_safety_checker runs without it)", HUB_ID)
        for name in WEIGHT_FILES:  # safetensors where the repository has it, else the pickled weights
            try:
                hf_hub_download(HUB_ID, name)
                break
            except EntryNotFoundError as e:
                if isinstance(e, LocalEntryNotFoundError) or name == WEIGHT_FILES[-1]:
                    raise
    except Exception as e:  # no network (LocalEntryNotFoundError, httpx errors), a refused or broken download
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SafetyCheckerError(f"cannot load the safety checker: it is not in the local Hugging Face cache ({HUB_ID}) "
                                 f"and downloading it failed ({type(e).__name__}: {detail[:160]}); "
                                 f"{how_to_provide()}") from None
    return Path(config).parent


def replacement(img: Image.Image, mode: str = "black") -> Image.Image:
    """What is written instead of a flagged image: all black, or blurred beyond recognition."""
    if mode == "black":
        return Image.new("RGB", img.size)
    if mode == "blur":
        radius = max(img.size) / 8
        return img.filter(ImageFilter.GaussianBlur(radius)).filter(ImageFilter.BoxBlur(radius))
    raise ValueError(f"unknown replacement {mode!r}; choose from {', '.join(REPLACEMENTS)}")
