"""Checkpoint reading: `.ckpt` and `.safetensors` files in the original key layout.

All checkpoint knowledge lives here: reading a file without running pickled code, the key
variants found in the wild (a top-level `state_dict` wrapper or not, CLIP keys with or without
`text_model.`, `position_ids` present or absent), EMA weights, the schedule buffers, and the
error a mismatched file gets. `load_model` builds a model on the meta device (no random
initialisation), memory-maps the file and assigns its tensors in place.
"""

import contextlib
import json
import logging
import mmap
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from .config import instantiate, model_config
from .models.diffusion import SCHEDULE_BUFFERS

log = logging.getLogger(__name__)

UNET = "model.diffusion_model."
CLIP = "cond_stage_model.transformer."
POSITION_IDS = CLIP + "text_model.embeddings.position_ids"
EMA = "model_ema."

# Keys of training state that some checkpoints carry and inference does not use.
IGNORED_KEYS = ("model_ema.decay", "model_ema.num_updates", "lvlb_weights", "logvar", "cond_ids")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or does not match the model config."""


# ----------------------------------------------------------------------------- reading files


class _LightningCallback:
    """Stands in for classes that Lightning pickles into checkpoints (the ModelCheckpoint callback
    is a key of the top-level `callbacks` dict of sd-v1-x.ckpt). Never instantiated with code."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


_ALLOWED_GLOBALS = [
    (_LightningCallback, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_LightningCallback, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
]


def _allowed_numpy_globals():
    """numpy scalars and dtypes, which some fine-tuning scripts store as step counters."""
    import numpy as np

    allowed = [(np.dtype, "numpy.dtype")]
    core = getattr(np, "_core", None) or np.core
    allowed.append((core.multiarray.scalar, "numpy.core.multiarray.scalar"))
    allowed.append((core.multiarray.scalar, "numpy._core.multiarray.scalar"))
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType"):
        cls = getattr(getattr(np, "dtypes", None), name, None)
        if cls is not None:
            allowed.append((cls, f"numpy.dtypes.{name}"))
    return allowed


def _read_pickle(path):
    """torch.load with weights_only: tensors and plain containers only, pickled code never runs."""
    use_mmap = zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be memory-mapped
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS + _allowed_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        detail = str(e).split("Unsupported global: ")[-1].split(" was not")[0].strip().splitlines()[0]
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects beyond tensors ({detail}); only weights are read, "
            "never code. Convert it to .safetensors from a trusted environment if you trust its source."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    except Exception as e:  # the unpickler fails on damaged or foreign bytes in many ways (IndexError, KeyError...)
        raise CheckpointError(f"cannot read checkpoint {path}: damaged, or not a PyTorch checkpoint "
                              f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(path):
    """Memory-map a .safetensors file and view its tensors in place (no copy, copy-on-write pages).

    The format is an 8-byte little-endian header length, a JSON header of
    `{name: {dtype, shape, data_offsets}}`, then the raw data; we view it directly because
    `safetensors.torch.load_file` copies every tensor into fresh memory.
    """
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            shape = info["shape"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"malformed safetensors header in {path} at {name!r}") from None
        if base + end > len(buf):
            raise CheckpointError(f"truncated safetensors file {path}: {name!r} lies past its end")
        count = (end - start) // dtype.itemsize
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + start).view(shape)
    return tensors


def read_state_dict(path):
    """The flat {key: tensor} dict of a checkpoint file, with any `state_dict` wrapper removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        obj = _read_safetensors(path)
    else:
        obj = _read_pickle(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds no state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors


# ----------------------------------------------------------------------------- key layout


def ema_key(key):
    """The full-EMA checkpoint name of a UNet parameter: `model_ema.` + its name without dots."""
    return EMA + key[len("model."):].replace(".", "")


def normalize_state_dict(sd, use_ema=False):
    """Bring a raw state dict to our model's key layout; returns (weights, extras).

    `extras` holds what is not a module weight: the schedule buffers found, and `scale_factor`.
    """
    has_ema = any(k.startswith(EMA) and k not in IGNORED_KEYS for k in sd)
    if use_ema and not has_ema:
        raise CheckpointError("--use_ema: this checkpoint carries no EMA weights (no model_ema.* keys)")
    weights, extras = {}, {}
    for key, value in sd.items():
        if key.startswith(EMA) or key in IGNORED_KEYS:
            continue
        if key in SCHEDULE_BUFFERS or key == "scale_factor":
            extras[key] = value
            continue
        if key.startswith(CLIP) and not key.startswith(CLIP + "text_model."):
            key = CLIP + "text_model." + key[len(CLIP):]  # transformers < 4.x layout
        if use_ema and key.startswith(UNET):
            src = ema_key(key)
            if src not in sd:
                raise CheckpointError(f"--use_ema: EMA weight {src} for {key} is missing")
            value = sd[src]
        weights[key] = value
    return weights, extras


def _guess_cause(missing, unexpected, wrong_shapes):
    keys = list(missing) + list(unexpected)
    shapes = dict((k, (a, b)) for k, a, b in wrong_shapes)
    if any(".attn2.to_k." in k and a[-1] == 1024 for k, (a, b) in shapes.items()) or any(
        k.startswith("cond_stage_model.model.") for k in unexpected
    ):
        return ("this looks like a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder, cross-attention context "
                "1024 instead of 768); this tool runs SD v1 models only")
    first = shapes.get(UNET + "input_blocks.0.0.weight")
    if first and first[0][1] == 9:
        return "this looks like an inpainting checkpoint (9 input channels), which txt2img does not run"
    if unexpected and all(k.startswith(("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "time_embedding."))
                         for k in unexpected):
        return "this looks like a diffusers-format UNet; use a checkpoint in the original single-file layout"
    if missing and all(not k.startswith(UNET) for k in missing) and not any(k.startswith(UNET) for k in keys):
        return "only part of a model is in this file (a VAE or text-encoder file?)"
    if wrong_shapes:
        return "the checkpoint and the config describe models of different sizes: check --config"
    return "the checkpoint was made for a different model config: check --config"


def check_keys(model_sd, weights):
    """Raise a CheckpointError listing missing, unexpected and mis-shaped keys, with a likely cause."""
    expected = {k: v for k, v in model_sd.items() if k not in SCHEDULE_BUFFERS}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [(k, tuple(weights[k].shape), tuple(expected[k].shape))
             for k in sorted(set(expected) & set(weights)) if weights[k].shape != expected[k].shape]
    if not (missing or unexpected or wrong):
        return

    def some(items):
        return ", ".join(str(i) for i in items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {some(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} wrong shape(s): {some([f'{k} is {list(a)} in the file, {list(b)} in the model' for k, a, b in wrong])}")
    raise CheckpointError("checkpoint does not match the config: " + "; ".join(parts) + ". Likely cause: "
                          + _guess_cause(missing, unexpected, wrong))


# ----------------------------------------------------------------------------- loading


def build_model(config, device="meta"):
    """The model a config describes, built without initialising weights when device is meta."""
    with torch.device(device), (_no_init() if torch.device(device).type == "meta" else contextlib.nullcontext()):
        return instantiate(model_config(config))


@contextlib.contextmanager
def _no_init():
    """torch.nn.init's fills as no-ops: on the meta device there is nothing to fill, and a fill there
    runs a Python decomposition that imports torch._dynamo (1.5 to 3 s of start-up)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def load_model(config, ckpt, device="cpu", dtype=torch.float32, use_ema=False):
    """Build the model of `config` and fill it from the checkpoint file `ckpt`, ready to sample.

    Weights already in `dtype` on the CPU are used in place from the memory-mapped file.
    """
    device = torch.device(device)
    model = build_model(config, "meta")
    raw = read_state_dict(ckpt)
    weights, extras = normalize_state_dict(raw, use_ema=use_ema)
    weights.setdefault(POSITION_IDS, torch.arange(model.cond_stage_model.max_length)[None])
    check_keys(model.state_dict(), weights)

    # position_ids: some files hold them as floats (or drifted); the canonical values are exact.
    weights[POSITION_IDS] = torch.arange(weights[POSITION_IDS].shape[-1], dtype=torch.long)[None]
    for key, value in weights.items():
        if value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        weights[key] = value.to(device)
    model.reset_schedule(device)
    weights.update({name: getattr(model, name) for name in SCHEDULE_BUFFERS})
    model.load_state_dict(weights, strict=True, assign=True)

    if "betas" in extras and not torch.allclose(extras["betas"].float().cpu(), model.betas.cpu(), rtol=1e-4):
        log.warning("the checkpoint's noise schedule differs from the config's; using the config's")
    if "scale_factor" in extras:
        model.scale_factor = float(extras["scale_factor"])
    return model.eval().requires_grad_(False)
