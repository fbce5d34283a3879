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
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

from .config import instantiate, model_config
from .models.diffusion import SCHEDULE_BUFFERS

log = logging.getLogger(__name__)

UNET = "model.diffusion_model."
CLIP = "cond_stage_model.transformer."
COND = "cond_stage_model."
POSITION_IDS = CLIP + "text_model.embeddings.position_ids"
POSITION_IDS_SUFFIX = "text_model.embeddings.position_ids"  # of every CLIP text encoder (SDXL's embedders.0 too)
EMA = "model_ema."

# Keys of training state that some checkpoints carry and inference does not use.
IGNORED_KEYS = ("model_ema.decay", "model_ema.num_updates", "lvlb_weights", "logvar", "cond_ids",
                "denoiser.sigmas")  # SDXL's: derived from the schedule


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


def _first_line(e, limit=160) -> str:
    """The informative first line of an exception's message (torch's advice paragraphs dropped)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = (lines[0] if lines else type(e).__name__).split(" This is an internal")[0].split(" Please ")[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _read_pickle(path):
    """torch.load with weights_only: tensors and plain containers only, pickled code never runs.

    Whatever goes wrong in torch's zip or pickle readers (damaged, truncated or foreign bytes fail
    in many ways: RuntimeError, UnpicklingError, EOFError, IndexError...) becomes one CheckpointError line.
    """
    use_mmap = zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be memory-mapped
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS + _allowed_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL (\S+)", str(e))  # torch names the class or function it would not import
        if refused:
            detail = f"GLOBAL {refused.group(1)}"
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled objects beyond tensors ({detail}); only weights are "
                "read, never code. Convert it to .safetensors from a trusted environment if you trust its source."
            ) from None
        raise CheckpointError(f"cannot read checkpoint {path}: damaged, or not a PyTorch checkpoint "
                              f"(pickle: {_first_line(e)})") from None
    except Exception as e:  # RuntimeError from the zip reader, EOFError, OSError, IndexError, KeyError...
        raise CheckpointError(f"cannot read checkpoint {path}: damaged, truncated, or not a PyTorch checkpoint "
                              f"({type(e).__name__}: {_first_line(e)})") from None


def _safetensors_dtypes():
    """safetensors dtype names -> torch dtypes (the float8 and unsigned kinds where this torch has them)."""
    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    for name, attr in (("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"),
                       ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
        if hasattr(torch, attr):
            table[name] = getattr(torch, attr)
    return table


_ST_DTYPES = _safetensors_dtypes()
_ST_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit on the JSON header
_ST_MAX_DIMS = 64
_INT64_MAX = 2**63 - 1


def _entry(name) -> str:
    """A tensor name as it appears in a message: quoted, escaped (one line), shortened."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


def _no_duplicates(pairs):
    """object_pairs_hook for json: a repeated name is an error, not a silent overwrite."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise CheckpointError(f"{_entry(key)} appears twice")
        out[key] = value
    return out


def _json_kind(x) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(x), "object")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(info, data_len):
    """(dtype, shape, start, end) of one header entry, or CheckpointError saying what is wrong."""
    if not isinstance(info, dict):
        raise CheckpointError(f"is a JSON {_json_kind(info)}, not an object of dtype, shape and data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise CheckpointError(f"lacks {', '.join(missing)}")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in _ST_DTYPES:
        raise CheckpointError(f"unknown dtype {str(dtype_name)[:20]!r} (known: {', '.join(_ST_DTYPES)})")
    dtype = _ST_DTYPES[dtype_name]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"shape {str(shape)[:60]} is not a list of non-negative integers")
    if len(shape) > _ST_MAX_DIMS:
        raise CheckpointError(f"shape has {len(shape)} dimensions (at most {_ST_MAX_DIMS})")
    extent = 1  # the product of max(d, 1): the largest stride of the tensor must fit in int64
    for d in shape:
        extent *= max(d, 1)
        if extent > _INT64_MAX:
            raise CheckpointError(f"shape {str(shape)[:60]} overflows 64-bit sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"data_offsets {str(offsets)[:60]} is not a pair of integers")
    start, end = offsets
    if not 0 <= start <= end <= data_len:
        raise CheckpointError(f"data_offsets [{start}, {end}] lie outside the data section (0 to {data_len} bytes)")
    numel = 1
    for d in shape:
        numel *= d
    if numel * dtype.itemsize != end - start:
        raise CheckpointError(f"shape {shape} of {dtype_name} needs {numel * dtype.itemsize} bytes "
                              f"but data_offsets [{start}, {end}] span {end - start}")
    return dtype, shape, start, end


def _safetensors_header(path, f, size):
    """The validated header of an open .safetensors file: (data section start, {name: (dtype, shape, start, end)}).

    Everything is checked before any tensor memory is touched; the first violation raises one line.
    """
    bad = f"malformed safetensors file {path}"
    if size < 8:
        raise CheckpointError(f"{bad}: {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        raise CheckpointError(f"{bad}: header length {n} exceeds the file ({size} bytes): truncated or not safetensors")
    if n > _ST_MAX_HEADER:
        raise CheckpointError(f"{bad}: header length {n} exceeds the {_ST_MAX_HEADER}-byte limit")
    raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{bad}: the header is cut short")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{bad}: header entry {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{bad}: the header is not valid JSON ({_first_line(e, 120)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: the header is a JSON {_json_kind(header)}, not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{bad}: __metadata__ is not a map of strings to strings")
    data_len = size - 8 - n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            entries[name] = _check_entry(info, data_len)
        except CheckpointError as e:
            raise CheckpointError(f"{bad}: tensor {_entry(name)} {e}") from None
    spans = sorted((start, end, name) for name, (_, _, start, end) in entries.items() if end > start)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(f"{bad}: tensor {_entry(b)} overlaps {_entry(a)} in the data section")
    return 8 + n, entries


def _read_safetensors(path):
    """Memory-map a .safetensors file and view its tensors in place (no copy, copy-on-write pages).

    The format is an 8-byte little-endian header length, a JSON header of
    `{name: {dtype, shape, data_offsets}}`, then the raw data; we view it directly because
    `safetensors.torch.load_file` copies every tensor into fresh memory. The header is validated
    in full first (`_safetensors_header`), so a hostile file ends in one CheckpointError line.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            base, entries = _safetensors_header(path, f, size)
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > base else None
    except OSError as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e.strerror or e}") from None
    tensors = {}
    for name, (dtype, shape, start, end) in entries.items():
        try:
            if end == start:
                tensors[name] = torch.empty(shape, dtype=dtype)
            else:
                count = (end - start) // dtype.itemsize
                tensors[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + start).view(shape)
        except (RuntimeError, ValueError) as e:  # not expected after the checks above; still one line
            raise CheckpointError(f"malformed safetensors file {path}: tensor {_entry(name)}: "
                                  f"{_first_line(e)}") from None
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
                "1024 instead of 768): load it with configs/stable-diffusion/v2-inference.yaml (v2-inference-v.yaml for "
                "768-v models), or give no --config to have the model detected")
    if any(k.startswith("conditioner.embedders.") for k in unexpected):
        return ("this looks like a Stable Diffusion XL checkpoint: load it with configs/sdxl/sd_xl_base.yaml "
                "(sd_xl_refiner.yaml for the refiner), or give no --config to have the model detected")
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
    # A float weight stored as integers or booleans is no weight (position_ids are remade, any dtype goes).
    kinds = [(k, weights[k].dtype) for k in sorted(set(expected) & set(weights))
             if not k.endswith(POSITION_IDS_SUFFIX) and expected[k].is_floating_point() and not weights[k].is_floating_point()]
    if not (missing or unexpected or wrong or kinds):
        return

    def some(items):
        items = [i if str(i).isprintable() else repr(i) for i in items]  # a hostile name stays on one line
        return ", ".join(str(i) for i in items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {some(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} wrong shape(s): {some([f'{k} is {list(a)} in the file, {list(b)} in the model' for k, a, b in wrong])}")
    if kinds:
        stored = [f"{k} is {str(d).replace('torch.', '')}" for k, d in kinds]
        parts.append(f"{len(kinds)} non-float weight(s): {some(stored)}")
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


def _converted_on_disk(weights, dtype, device):
    """{key: converted tensor} of the CPU weights that load narrowed to `dtype` (bfloat16 from a float32 file),
    in a scratch file on disk (`ldm.backends.memory.converted_on_disk`); {} where there is nothing to narrow
    or no such file can be had (they convert into memory then)."""
    if torch.device(device).type != "cpu":
        return {}
    keys = [k for k, v in weights.items() if v.device.type == "cpu" and v.is_floating_point()
            and dtype.itemsize < v.element_size()]
    from .backends.memory import converted_on_disk

    converted = converted_on_disk([weights[k] for k in keys], dtype) if keys else None
    return dict(zip(keys, converted)) if converted is not None else {}


def load_model(config, ckpt, device="cpu", dtype=torch.float32, use_ema=False, file_backed=True):
    """Build the model of `config` and fill it from the checkpoint file `ckpt`, ready to sample.

    Weights already in `dtype` on the CPU are used in place from the memory-mapped file. With
    `file_backed`, weights narrowed to `dtype` on the CPU (bfloat16 from a float32 file) are written to a
    scratch file on disk and used from its mapping, so that their pages, like the checkpoint's, can leave
    the resident set once packed copies replace them (ldm.backends); without it (or where no such file can
    be had: a temporary directory in memory, a full disk) they are converted into memory.
    """
    device = torch.device(device)
    model = build_model(config, "meta")
    raw = read_state_dict(ckpt)
    weights, extras = normalize_state_dict(raw, use_ema=use_ema)
    model_sd = model.state_dict()
    for key in [k for k in model_sd if k.endswith(POSITION_IDS_SUFFIX)]:  # OpenAI CLIP's; OpenCLIP has none
        weights.setdefault(key, torch.arange(model_sd[key].shape[-1])[None])
    unused = [f"{name}.{k}" for name, m in model.named_modules() if hasattr(m, "unused_keys")
              for k in m.unused_keys() if f"{name}.{k}" not in weights]
    if unused:  # e.g. a 2.x file converted back from diffusers: no last text block, projection or temperature
        log.info("the checkpoint lacks %d text-encoder weights that are never used; filled with zeros", len(unused))
        weights.update({k: torch.zeros(model_sd[k].shape, dtype=model_sd[k].dtype) for k in unused})
    check_keys(model_sd, weights)
    for name, value in extras.items():  # the config's schedule is used, but a file's must still fit it
        if name in SCHEDULE_BUFFERS and (value.shape != getattr(model, name).shape or not value.is_floating_point()):
            raise CheckpointError(f"checkpoint does not match the config: schedule buffer {name} is "
                                  f"{list(value.shape)} {str(value.dtype).replace('torch.', '')} in the file, "
                                  f"{list(getattr(model, name).shape)} float in the model")

    # position_ids: some files hold them as floats (or drifted); the canonical values are exact.
    for key in [k for k in weights if k.endswith(POSITION_IDS_SUFFIX)]:
        weights[key] = torch.arange(weights[key].shape[-1], dtype=torch.long)[None]
    from .backends.memory import private_file_mappings, release_file_pages

    mappings = None
    on_disk = _converted_on_disk(weights, dtype, device) if file_backed else {}
    for key, value in weights.items():
        if value.is_floating_point() and value.dtype != dtype:
            source, value = value, on_disk[key] if key in on_disk else value.to(dtype)
            if source.device.type == "cpu":  # a float16 file loaded in float32: its pages are not read again
                mappings = private_file_mappings() if mappings is None else mappings
                release_file_pages(source, mappings)
        weights[key] = value.to(device)
    model.reset_schedule(device)
    weights.update({name: getattr(model, name) for name in SCHEDULE_BUFFERS})
    model.load_state_dict(weights, strict=True, assign=True)

    betas = extras.get("betas")
    if betas is not None and (betas.shape != model.betas.shape or not betas.is_floating_point()
                              or not torch.allclose(betas.float().cpu(), model.betas.cpu(), rtol=1e-4)):
        log.warning("the checkpoint's noise schedule differs from the config's; using the config's")
    if "scale_factor" in extras:
        scale = extras["scale_factor"]
        if scale.numel() != 1 or not scale.is_floating_point() or not torch.isfinite(scale).all() or scale.item() == 0:
            raise CheckpointError(f"{ckpt}: scale_factor is not one finite non-zero number "
                                  f"(shape {list(scale.shape)}, {scale.dtype})")
        model.scale_factor = float(scale)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- a standalone VAE

VAE = "first_stage_model."
_VAE_TRAINING = ("loss.", "model_ema.")  # a training checkpoint's discriminator and EMA state


def vae_weights(sd):
    """A VAE file's weights in the autoencoder's own key layout (`encoder.*`, `decoder.*`, `quant_conv.*`,
    `post_quant_conv.*`): a bare VAE file as it is, a whole-model file's `first_stage_model.*` keys unprefixed."""
    if any(k.startswith(VAE) for k in sd):
        sd = {k[len(VAE):]: v for k, v in sd.items() if k.startswith(VAE)}
    return {k: v for k, v in sd.items() if not k.startswith(_VAE_TRAINING)}


def load_vae(model, path):
    """Replace the weights of `model.first_stage_model` with those of the VAE file `path` (any family:
    SD v1's ft-MSE VAE, SDXL's fp16-fix VAE in the original layout...), in the model's dtype and device."""
    vae = model.first_stage_model
    expected = vae.state_dict()
    weights = vae_weights(read_state_dict(path))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if weights[k].shape != expected[k].shape
                   or not weights[k].is_floating_point())
    if missing or unexpected or wrong:
        if any(".up_blocks." in k or k.startswith(("up_blocks.", "mid_block.")) or ".mid_block." in k for k in weights):
            cause = "it is in diffusers' layout; use a VAE file in the original single-file layout"
        else:
            cause = "it is not an autoencoder of this model's size"
        first = (missing or unexpected or wrong)[0]
        first = first if str(first).isprintable() else repr(first)
        raise CheckpointError(f"--vae {path}: {len(missing)} missing, {len(unexpected)} unexpected and {len(wrong)} "
                              f"mismatched key(s) (first: {first}): {cause}")
    p = next(vae.parameters())
    vae.load_state_dict({k: v.to(device=p.device, dtype=p.dtype) for k, v in weights.items()}, strict=True, assign=True)
    log.info("VAE weights from %s", path)
    return model
