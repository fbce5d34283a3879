"""LoRA files as the web UIs take them, merged into the model's weights.

    lib = LoraLibrary("models/Lora")
    net = lib.get("detail")                      # a file stem under the folder, parsed and checked once
    merger = LoraMerger(model)
    merger.apply([(net, 1.0, 0.8)])              # (lora, text-encoder multiplier, UNet multiplier)
    merger.apply([])                             # the base weights again, bit for bit

Formats read (`.safetensors`, or `.pt`/`.ckpt` through the checkpoint module's weights-only reader):

- kohya / web UI: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`, `lora_te_<module>...`,
  where <module> is the diffusers (or original-layout) module path with '.' written '_'. Scale alpha / rank,
  rank = rows of lora_down (no alpha: scale 1). LoCon convolutions: down is a kxk convolution, up 1x1.
- diffusers / PEFT: `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight` (also `.lora.down/up.weight`,
  `.lora_linear_layer.down/up.weight`, attention processors' `to_q_lora.down.weight`), `text_encoder.<...>`.
  Scale 1 unless an `.alpha` is stored.
- keys already in the original layout: `lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q...`.

Every LoRA module name is looked up in one table built from OUR module tree (`lora_targets`): for each
Linear / Conv2d weight, its kohya name under the diffusers naming of the UNet (derived from the block
structure, the rule diffusers' `convert_ldm_unet_checkpoint` follows), its kohya name under the original
naming, and for the text encoders the Hugging Face `transformers` names (for SD 2.x's OpenCLIP tower the
q/k/v projections are row slices of `in_proj_weight`). SDXL's `lora_te1_` / `lora_te2_` are the "xl" row
of `TEXT_ENCODERS` (sgm's `conditioner.embedders.0/1`; tests/test_sdxl_embeddings.py runs one end to end).

Merging: W = W0 + sum(mult * scale * up @ down) in float32, cast once to the weight's dtype; the parameter
gets a new tensor and W0 is kept untouched (not subtracted back), so removing every LoRA restores the exact
base weights. The backend's derived weights of the touched modules are rebuilt (`ldm.backends.refresh`).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
HASH_LENGTH = 12  # the web UI writes the first 12 hex digits ("Lora hashes")
UNET_PREFIX = "lora_unet_"


class LoraError(ValueError):
    """A LoRA that cannot be found, read or applied to this model (one line)."""


# ----------------------------------------------------------------------------- prompt tags

_TAG = re.compile(r"<lora:([^>:]*)((?::[^>:]*)*)>", re.IGNORECASE)


@dataclass(frozen=True)
class LoraUse:
    """A LoRA named in a prompt (or on the command line) and its two multipliers."""

    name: str
    te: float = 1.0
    unet: float = 1.0


def _multiplier(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LoraError(f"{tag}: the multiplier {text.strip()!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise LoraError(f"{tag}: the multiplier must be finite, got {text.strip()}")
    return value


def parse_tags(text: str) -> tuple[str, list[LoraUse]]:
    """(the text without its `<lora:NAME[:MULT[:UNET_MULT]]>` tags, the LoRAs they name, in order).

    `<lora:NAME:M>` applies M to the text encoder and the UNet; `<lora:NAME:TE:UNET>` each its own.
    """
    uses = []

    def take(m):
        name, rest = m.group(1).strip(), m.group(2)
        mults = [_multiplier(x, m.group(0)) for x in rest.split(":")[1:]] if rest else []
        if not name:
            raise LoraError(f"{m.group(0)}: no LoRA name")
        if len(mults) > 2:
            raise LoraError(f"{m.group(0)}: at most two multipliers (text encoder, UNet)")
        te = mults[0] if mults else 1.0
        uses.append(LoraUse(name, te, mults[1] if len(mults) > 1 else te))
        return ""

    return _TAG.sub(take, text), uses


def strip_tags(text: str) -> str:
    return _TAG.sub("", text)


def parse_cli_lora(spec: str) -> tuple[str, float]:
    """`FILE[:MULT]` of --lora -> (file, multiplier); a trailing `:x` is a multiplier only when x is a
    number-like word (a Windows drive letter `C:` stays part of the path)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and re.fullmatch(r"\s*[-+.\d][^/\\]*", tail):
        return head, _multiplier(tail, f"--lora {spec}")
    return spec, 1.0


# ----------------------------------------------------------------------------- hashes


def lora_hash(path) -> str:
    """The web UI's LoRA short hash: sha256 of a .safetensors file's data after its header (the
    "addnet" hash kohya's scripts and the web UIs use), of the whole file otherwise; 12 hex digits.
    Kept in the model-hash cache (`ldm.hashing`), so a folder is read once to be searched by hash."""
    from .hashing import cached_file_hash

    return cached_file_hash(path, "lora", _lora_hash)


def _lora_hash(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if str(path).endswith(".safetensors"):
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n)
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:HASH_LENGTH]


def file_hash(path) -> str:
    """sha256 of the whole file, 12 hex digits (the web UI's embedding hash, "TI hashes"); cached as lora_hash."""
    from .hashing import cached_file_hash

    return cached_file_hash(path, "sha256-12", _file_hash)


def _file_hash(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:HASH_LENGTH]


# ----------------------------------------------------------------------------- module names


@dataclass(frozen=True)
class Target:
    """Where a LoRA module lands: a parameter of the model (its state-dict key), optionally a row range
    of it (OpenCLIP's stacked q/k/v), and which multiplier applies ("te" or "unet")."""

    key: str
    part: str
    rows: tuple[int, int] | None = None


_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def unet_block_names(unet) -> dict[str, str]:
    """Original block prefix -> diffusers prefix for every block of a UNetModel
    (`input_blocks.4.1` -> `down_blocks.1.attentions.0`, `output_blocks.2.1` -> `up_blocks.0.upsamplers.0`, ...)."""
    from .models.unet import Downsample, ResBlock, SpatialTransformer, Upsample

    names = {}

    def name_parts(prefix, block, target, index):
        for j, layer in enumerate(block):
            if isinstance(layer, ResBlock):
                names[f"{prefix}.{j}"] = f"{target}.resnets.{index}"
            elif isinstance(layer, SpatialTransformer):
                names[f"{prefix}.{j}"] = f"{target}.attentions.{index}"
            elif isinstance(layer, Downsample):
                names[f"{prefix}.{j}"] = f"{target}.downsamplers.0"
            elif isinstance(layer, Upsample):
                names[f"{prefix}.{j}"] = f"{target}.upsamplers.0"

    level, index = 0, 0
    for i, block in enumerate(unet.input_blocks):
        if i == 0:
            continue
        name_parts(f"input_blocks.{i}", block, f"down_blocks.{level}", index)
        if any(isinstance(layer, Downsample) for layer in block):
            level, index = level + 1, 0
        else:
            index += 1
    levels = level + 1
    per_level = len(unet.output_blocks) // levels  # num_res_blocks + 1
    for i, block in enumerate(unet.output_blocks):
        name_parts(f"output_blocks.{i}", block, f"up_blocks.{i // per_level}", i % per_level)
    mid = unet.middle_block
    names["middle_block.0"], names["middle_block.1"] = "mid_block.resnets.0", "mid_block.attentions.0"
    if len(mid) > 2:
        names["middle_block.2"] = "mid_block.resnets.1"
    return names


def diffusers_unet_name(name: str, blocks: dict[str, str]) -> str | None:
    """The diffusers path of a UNet module given by its original path (None when it has none)."""
    for old, new in _TOP.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    parts = name.split(".")
    n = 2 if parts[0] == "middle_block" else 3  # middle_block.J, input_blocks.I.J, output_blocks.I.J
    prefix, rest = ".".join(parts[:n]), ".".join(parts[n:])
    target = blocks.get(prefix)
    if target is None:
        return None
    if ".resnets." in target:
        for old, new in _RESNET.items():
            if rest == old or rest.startswith(old + "."):
                return f"{target}.{new}{rest[len(old):]}"
        return None
    if target.endswith("downsamplers.0") and rest.startswith("op"):
        return f"{target}.conv{rest[2:]}"
    return f"{target}.{rest}" if rest else target


def _kohya(path: str) -> str:
    return path.replace(".", "_")


# (kohya prefix, diffusers prefix, where the encoder sits in the model, its kind) per text encoder.
TEXT_ENCODERS = {
    "v1": [("lora_te_", "text_encoder.", "cond_stage_model.transformer.", "hf")],
    "v2": [("lora_te_", "text_encoder.", "cond_stage_model.model.", "open_clip")],
    "xl": [("lora_te1_", "text_encoder.", "conditioner.embedders.0.transformer.", "hf"),
           ("lora_te2_", "text_encoder_2.", "conditioner.embedders.1.model.", "open_clip")],
}
UNET_KEY = "model.diffusion_model."


def model_family(model) -> str:
    """"v1" (CLIP ViT-L text encoder), "v2" (OpenCLIP), or "xl" (sgm's conditioner with both)."""
    from .models.clip import FrozenCLIPEmbedder
    from .models.open_clip import FrozenOpenCLIPEmbedder

    cond = getattr(model, "cond_stage_model", None)
    if isinstance(cond, FrozenCLIPEmbedder):
        return "v1"
    if isinstance(cond, FrozenOpenCLIPEmbedder):
        return "v2"
    modules = dict(model.named_modules())
    if all(root.rstrip(".") in modules for _, _, root, _ in TEXT_ENCODERS["xl"]):
        return "xl"
    raise LoraError(f"LoRA: models with a {type(cond).__name__} text encoder are not supported")


def _open_clip_names(params: dict, root: str, width_of) -> dict[str, Target]:
    """transformers CLIP names (kohya's, for SD 2.x) -> targets in an OpenCLIP text tower."""
    table = {}
    i = 0
    while f"{root}transformer.resblocks.{i}.attn.in_proj_weight" in params:
        block = f"{root}transformer.resblocks.{i}."
        hf = f"text_model.encoder.layers.{i}."
        w = width_of(block + "attn.in_proj_weight") // 3
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            table[hf + "self_attn." + proj] = Target(block + "attn.in_proj_weight", "te", (j * w, (j + 1) * w))
        table[hf + "self_attn.out_proj"] = Target(block + "attn.out_proj.weight", "te")
        table[hf + "mlp.fc1"] = Target(block + "mlp.c_fc.weight", "te")
        table[hf + "mlp.fc2"] = Target(block + "mlp.c_proj.weight", "te")
        i += 1
    return table


def lora_targets(model) -> tuple[dict[str, Target], dict[str, str]]:
    """({kohya module name: Target} for every LoRA-able weight of the model, {diffusers prefix: kohya prefix}).

    UNet modules are listed under their diffusers names and their original names; text encoder modules
    under their transformers names (and, for OpenCLIP, the original names too)."""
    family = model_family(model)
    params = dict(model.named_parameters())
    table: dict[str, Target] = {}
    unet = model.model.diffusion_model
    blocks = unet_block_names(unet)
    for name, m in unet.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            key = UNET_KEY + name + ".weight"
            table[UNET_PREFIX + _kohya(name)] = Target(key, "unet")
            diffusers = diffusers_unet_name(name, blocks)
            if diffusers is not None:
                table[UNET_PREFIX + _kohya(diffusers)] = Target(key, "unet")
    prefixes = {"unet.": UNET_PREFIX}
    for kohya, diffusers, root, kind in TEXT_ENCODERS[family]:
        prefixes[diffusers] = kohya
        for name, m in model.named_modules():
            if name.startswith(root) and isinstance(m, nn.Linear):
                rel = name[len(root):]
                table[kohya + _kohya(rel)] = Target(name + ".weight", "te")
                if rel.startswith("text_model."):  # transformers >= 5 names CLIPTextModel's modules without it
                    table[kohya + _kohya(rel[len("text_model."):])] = Target(name + ".weight", "te")
        if kind == "open_clip":
            for hf, target in _open_clip_names(params, root, lambda k: params[k].shape[0]).items():
                table[kohya + _kohya(hf)] = target
                table[kohya + _kohya(hf[len("text_model."):])] = target
    return table, prefixes


# ----------------------------------------------------------------------------- reading files

# Suffixes of a module's tensors -> their role, most specific first.
_ROLES = [
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
]
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_UNSUPPORTED = {"hada_w1_a": "LyCORIS LoHa", "lokr_w1": "LyCORIS LoKr", "lora_mid": "LyCORIS LoCon with Tucker "
                "decomposition (lora_mid)", "dora_scale": "DoRA", "diff": "a full weight difference", "w_norm": "GLoRA"}


def _split_key(key: str) -> tuple[str, str] | None:
    """(module name, role) of one tensor key of a LoRA file, or None when the key is no LoRA tensor."""
    m = _PROCESSOR.match(key)
    if m:
        module = m.group(1) + "." + (m.group(2) if m.group(2) != "to_out" else "to_out.0")
        return module, m.group(3)
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _normalize(module: str, prefixes: dict[str, str]) -> str:
    """A module name of any supported layout as a kohya name (lora_unet_..., lora_te_...)."""
    if module.startswith("lora_"):
        return module
    if module.startswith(UNET_KEY):
        return UNET_PREFIX + _kohya(module[len(UNET_KEY):])
    for diffusers, kohya in sorted(prefixes.items(), key=lambda kv: -len(kv[0])):
        if module.startswith(diffusers):
            return kohya + _kohya(module[len(diffusers):])
    for rows in TEXT_ENCODERS.values():  # the original layout's text encoder paths
        for kohya, _, root, _ in rows:
            if module.startswith(root):
                return kohya + _kohya(module[len(root):])
    return module


def read_lora_file(path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file; .pt/.ckpt through the weights-only reader (no pickled code runs)."""
    from .checkpoint import CheckpointError, read_state_dict

    try:
        return read_state_dict(path)
    except CheckpointError as e:
        raise LoraError(str(e).replace("checkpoint", "LoRA file", 1)) from None


@dataclass
class LoraModule:
    name: str  # kohya form (lora_unet_..., lora_te_...)
    target: Target
    down: torch.Tensor
    up: torch.Tensor
    scale: float  # alpha / rank

    def add_to(self, w: torch.Tensor, mult: float):
        """w += mult * scale * up @ down, in place, for a contiguous float32 w (the weight, or its rows);
        a LoCon up is a 1x1 convolution, so (out, r) @ (r, in * k * k) is the kxk delta."""
        up = self.up.to(device=w.device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=w.device, dtype=torch.float32).flatten(1)
        w.view(w.shape[0], -1).addmm_(up, down, alpha=mult * self.scale)


class Lora:
    """A parsed LoRA file, checked against one model: its modules with their targets."""

    def __init__(self, name: str, path: Path, modules: list[LoraModule]):
        self.name, self.path, self.modules = name, Path(path), modules
        self._hash = None

    @property
    def short_hash(self) -> str:
        if self._hash is None:
            self._hash = lora_hash(self.path)
        return self._hash

    @classmethod
    def from_state_dict(cls, name: str, path, sd: dict, model, table=None) -> Lora:
        """Parse `sd` and check every module against `model`; LoraError names the first bad key."""
        table, prefixes = table or lora_targets(model)
        params = dict(model.named_parameters())
        groups: dict[str, dict] = {}
        for key in sorted(sd):
            split = _split_key(key)
            if split is None:
                kind = next((v for k, v in _UNSUPPORTED.items() if f".{k}" in key), None)
                if kind:
                    raise LoraError(f"LoRA {name!r}: {key} is {kind}, which is not supported")
                raise LoraError(f"LoRA {name!r}: {key} is not a LoRA tensor (expected lora_down/lora_up/alpha "
                                "or lora_A/lora_B keys)")
            module, role = split
            groups.setdefault(module, {})[role] = (key, sd[key])
        modules = []
        for module, parts in groups.items():
            first_key = next(iter(parts.values()))[0]
            if "down" not in parts or "up" not in parts:
                missing = "down" if "down" not in parts else "up"
                raise LoraError(f"LoRA {name!r}: {first_key} has no matching {missing} weight")
            kohya = _normalize(module, prefixes)
            target = table.get(kohya)
            if target is None:
                raise LoraError(f"LoRA {name!r}: {first_key} matches no layer of this "
                                f"{model_family(model)} model{_family_hint(kohya)}")
            down_key, down = parts["down"]
            up_key, up = parts["up"]
            weight = params[target.key]
            rows = weight.shape[0] if target.rows is None else target.rows[1] - target.rows[0]
            rank = down.shape[0]
            in_size = weight[0].numel()  # in * k * k
            if up.dim() < 2 or down.dim() < 2 or up.shape[0] != rows or up.shape[1] != rank or \
                    up[0].numel() != rank or down[0].numel() != in_size:
                raise LoraError(f"LoRA {name!r}: {down_key} {list(down.shape)} / {list(up.shape)} does not fit the "
                                f"layer's weight {list(weight.shape)}{_family_hint(kohya)}")
            alpha = float(parts["alpha"][1]) if "alpha" in parts else float(rank)
            modules.append(LoraModule(kohya, target, down, up, alpha / rank))
        if not modules:
            raise LoraError(f"LoRA {name!r} ({path}) holds no LoRA weights")
        return cls(name, path, modules)


def _family_hint(kohya: str) -> str:
    if kohya.startswith(("lora_te1_", "lora_te2_")):
        return " (a LoRA made for SDXL?)"
    if kohya.startswith("lora_te_"):
        return " (a LoRA made for SD 1.x / 2.x?)"
    return " (a LoRA made for another model family?)"


# ----------------------------------------------------------------------------- the folder


class LoraLibrary:
    """The LoRA files under a folder, by file stem, parsed for one model on first use and kept."""

    def __init__(self, model, directory="models/Lora", extra_files=()):
        self.model = model
        self.directory = Path(directory)
        self.paths: dict[str, Path] = {}  # name -> file, beyond the folder's stems (--lora FILE, --from_png)
        for f in extra_files:
            self.add_file(f)
        self._loaded: dict[str, Lora] = {}
        self._table = None

    def add_file(self, path) -> str:
        path = Path(path)
        if not path.is_file():
            raise LoraError(f"LoRA file not found: {path}")
        self.paths[path.stem] = path
        return path.stem

    def available(self) -> dict[str, Path]:
        found = {}
        if self.directory.is_dir():
            for p in sorted(self.directory.rglob("*")):
                if p.suffix in LORA_SUFFIXES and p.is_file():
                    found.setdefault(p.stem, p)
        found.update(self.paths)
        return found

    def path_of(self, name: str) -> Path:
        if name in self.paths:
            return self.paths[name]
        files = self.available()
        if name in files:
            return files[name]
        close = difflib.get_close_matches(name, list(files), n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else (
            f"; found: {', '.join(list(files)[:5])}" if files else " (no LoRA files there)")
        raise LoraError(f"unknown LoRA {name!r}: no such file under {self.directory}{hint}")

    def get(self, name: str) -> Lora:
        if name not in self._loaded:
            path = self.path_of(name)
            if self._table is None:
                self._table = lora_targets(self.model)
            t0 = time.perf_counter()
            self._loaded[name] = Lora.from_state_dict(name, path, read_lora_file(path), self.model, self._table)
            log.info("read LoRA %s (%d modules) in %.2f s", path, len(self._loaded[name].modules),
                     time.perf_counter() - t0)
        return self._loaded[name]

    def find_by_hash(self, name: str, short_hash: str) -> Path | None:
        """The file for `name: hash` of a `Lora hashes` entry: the file of that stem when its hash
        matches, else any file under the folder with that hash."""
        want = short_hash.strip().lower()
        files = self.available()
        ordered = ([files[name]] if name in files else []) + [p for n, p in files.items() if n != name]
        for p in ordered:
            if lora_hash(p) == want[:HASH_LENGTH]:
                return p
        return None


# ----------------------------------------------------------------------------- merging


class LoraMerger:
    """Merges sets of LoRAs into a model's weights and takes them out again."""

    def __init__(self, model):
        self.model = model
        self.base: dict[str, torch.Tensor] = {}  # state-dict key -> the base weight tensor (never modified)
        self.active: tuple = ()

    @torch.no_grad()
    def apply(self, uses: list[tuple[Lora, float, float]]) -> bool:
        """Make the model's weights base + these LoRAs (each with its text-encoder and UNet multiplier);
        returns False when that set was already applied."""
        signature = tuple((lora.name, id(lora), te, unet) for lora, te, unet in uses)
        if signature == self.active:
            return False
        t0 = time.perf_counter()
        params = dict(self.model.named_parameters())
        deltas: dict[str, list] = {}
        for lora, te, unet in uses:
            for m in lora.modules:
                mult = te if m.target.part == "te" else unet
                if mult:
                    deltas.setdefault(m.target.key, []).append((m, mult))
        touched = set(self.base) | set(deltas)
        for key in touched:
            p = params[key]
            # On the CPU the parameter gets a new tensor and keeps the base one untouched (a memory-mapped
            # checkpoint's pages stay clean); elsewhere the weight is written in place, its address kept
            # (CUDA graphs replay kernels bound to it), from a copy of the base.
            in_place = p.device.type != "cpu"
            if key not in self.base and key in deltas:
                self.base[key] = p.data.clone() if in_place else p.data
            base = self.base[key]
            if key in deltas:
                merged = base.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                for m, mult in deltas[key]:
                    rows = merged if m.target.rows is None else merged[m.target.rows[0]:m.target.rows[1]]
                    m.add_to(rows, mult)
                new = merged.to(base.dtype)
                if base.dim() == 4 and not base.is_contiguous() and base.is_contiguous(memory_format=torch.channels_last):
                    new = new.contiguous(memory_format=torch.channels_last)  # the layout the backend gave it
            else:
                new = self.base.pop(key)
            if in_place:
                p.data.copy_(new)
            else:
                p.data = new
        self.active = signature
        self._refresh(touched)
        log.info("LoRA set %s applied to %d weights in %.2f s",
                 ", ".join(f"{lora.name}:{te:g}:{unet:g}" for lora, te, unet in uses) or "(none)", len(touched),
                 time.perf_counter() - t0)
        return True

    def _refresh(self, keys):
        """Rebuild what the backend derived from the changed weights: `refresh` over the layers that own
        them and the attention modules and upsamplers above them (the text's keys and values, the phase
        kernels), nothing else (a container's other convolutions would be packed again for nothing)."""
        from .backends import is_optimized, refresh
        from .models.unet import CrossAttention, Upsample

        if not keys or not is_optimized(self.model):
            return
        modules = dict(self.model.named_modules())
        owners = {}
        for key in keys:
            path = key.rsplit(".", 1)[0]
            owners[path] = modules[path]
            parts = path.split(".")
            for n in range(len(parts) - 1, max(len(parts) - 3, 0), -1):  # to_k, to_out.0 -> attn2; conv -> upsampler
                name = ".".join(parts[:n])
                if isinstance(modules.get(name), (CrossAttention, Upsample)):
                    owners[name] = modules[name]
        refresh(nn.ModuleList(owners.values()))
