"""A prompt's add-ons for the pipeline: `<lora:...>` tags, embedding words and clip skip.

`PromptExtras` is what `ldm.pipeline.Txt2Img` holds (as `pipe.extras`): it takes the LoRA tags out of
the text, names the LoRA set a work item needs (prompt + negative prompt + --lora files), merges that
set before the item is encoded and sampled (`activate`), hands the tokenizer that knows the embeddings
and the text encoder call with their vectors and the clip skip, and writes and restores the web UIs'
`Lora hashes`, `TI hashes` and `Clip skip` settings.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from torch import nn

from .embeddings import EmbeddingLibrary
from .lora import LoraError, LoraLibrary, LoraMerger, LoraUse, parse_tags, strip_tags

log = logging.getLogger(__name__)

DEFAULT_LORA_DIR = Path("models/Lora")
DEFAULT_EMBEDDINGS_DIR = Path("models/embeddings")


def _token_embedding(cond) -> nn.Embedding | None:
    for name, m in cond.named_modules():
        if name.endswith("token_embedding") and isinstance(m, nn.Embedding):
            return m
    return None


def clip_skip_error(model, n) -> str | None:
    """Why `--clip_skip n` does not fit this model (None when it does)."""
    from .models.clip import FrozenCLIPEmbedder
    from .models.open_clip import FrozenOpenCLIPEmbedder

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"--clip_skip must be a positive integer, got {n}"
    if model is None:
        return None
    if hasattr(model, "conditioner"):  # SDXL
        if n > 2:
            return (f"--clip_skip {n}: SDXL fixes its text layers (CLIP-L hidden layer, bigG penultimate); "
                    "only 1 and 2 (both those layers) are accepted")
        return None
    cond = getattr(model, "cond_stage_model", None)
    if isinstance(cond, FrozenCLIPEmbedder):
        layers = len(cond.transformer.text_model.encoder.layers)
        if n > layers:
            return f"--clip_skip {n}: this text encoder has {layers} layers"
    elif isinstance(cond, FrozenOpenCLIPEmbedder):
        if n > 2:
            return (f"--clip_skip {n}: SD 2.x fixes its text layer (the config's layer: {cond.layer}); "
                    "only 1 and 2 (both that layer) are accepted")
    elif n != 1:
        return f"--clip_skip {n}: not supported for this model's text encoder ({type(cond).__name__})"
    return None


class PromptExtras:
    def __init__(self, model, lora_dir=None, embeddings_dir=None, loras=()):
        """`loras`: [(file, multiplier)] applied to every image (the command line's --lora)."""
        self.model = model
        self.loras = LoraLibrary(model, lora_dir or DEFAULT_LORA_DIR)
        self.cli_loras = tuple(LoraUse(self.loras.add_file(f), m, m) for f, m in loras)
        self.merger = LoraMerger(model)
        cond = getattr(model, "cond_stage_model", None)
        table = _token_embedding(cond) if cond is not None else None
        self.embeddings = None
        self.xl_towers = None
        if hasattr(model, "conditioner"):
            self._sdxl_embeddings(model.conditioner, embeddings_dir)
        elif table is not None and hasattr(cond, "encode_ids"):
            self.embeddings = EmbeddingLibrary(embeddings_dir or DEFAULT_EMBEDDINGS_DIR, table.embedding_dim,
                                               table.num_embeddings)

    def _sdxl_embeddings(self, conditioner, embeddings_dir):
        """SDXL's `clip_l` / `clip_g` files: one set of placeholder ids, each text encoder its own vectors
        (CLIP-L 768 wide takes clip_l, bigG 1280 clip_g; the refiner's bigG alone takes clip_g)."""
        encoders = conditioner.text_encoders
        tables = [_token_embedding(e) for e in encoders]
        if any(t is None for t in tables) or len({t.num_embeddings for t in tables}) != 1:
            return
        from .models.open_clip import FrozenOpenCLIPEmbedder

        self.xl_towers = ["clip_g" if isinstance(e, FrozenOpenCLIPEmbedder) else "clip_l" for e in encoders]
        widths = {tower: t.embedding_dim for tower, t in zip(self.xl_towers, tables)}
        first, *others = self.xl_towers
        self.embeddings = EmbeddingLibrary(embeddings_dir or DEFAULT_EMBEDDINGS_DIR, widths[first],
                                           tables[0].num_embeddings, tower=first,
                                           others={t: widths[t] for t in others})

    def xl_vectors(self):
        """SDXL: each text encoder's textual-inversion vectors (None where no embedding is loaded)."""
        if self.embeddings is None or self.embeddings.vectors is None:
            return None
        first, *others = self.xl_towers
        return [self.embeddings.vectors] + [self.embeddings.vectors_of(t) for t in others]

    # --- LoRA sets

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _tags(text: str) -> tuple[LoraUse, ...]:
        return tuple(parse_tags(text)[1])

    def uses(self, item) -> tuple[LoraUse, ...]:
        """The LoRAs of a work item: its prompt's tags, its negative prompt's, then --lora's; a name given
        twice keeps its first multipliers."""
        out, seen = [], set()
        for use in self._tags(item.prompt) + self._tags(item.negative_prompt) + self.cli_loras:
            if use.name not in seen:
                seen.add(use.name)
                out.append(use)
        return tuple(out)

    def check(self, items):
        """Find, read and check every LoRA these items name, and read the embeddings their prompts use
        (LoraError / EmbeddingError on the first that fails)."""
        for uses in {self.uses(item) for item in items}:
            for use in uses:
                self.loras.get(use.name)
        if self.embeddings is not None:
            for text in {t for item in items for t in (item.prompt, item.negative_prompt)}:
                self.embeddings.names_in(self.clean(text))

    def activate(self, item):
        """Merge the item's LoRA set into the model (nothing to do when it is already there)."""
        uses = self.uses(item)
        if uses or self.merger.active:
            self.merger.apply([(self.loras.get(u.name), u.te, u.unet) for u in uses])

    @property
    def state(self):
        """What the text encoder's output depends on beyond the text: the merged LoRA set."""
        return self.merger.active

    # --- text

    @staticmethod
    def clean(text: str) -> str:
        return strip_tags(text)

    def tokenizer(self, base):
        return self.embeddings.tokenizer(base) if self.embeddings is not None else base

    def encoder(self, cond, clip_skip: int = 1):
        """ids (n, 77) -> hidden states, with the embeddings' vectors and the clip skip."""
        kwargs = {}
        vectors = self.embeddings.vectors if self.embeddings is not None else None
        if vectors is not None:
            kwargs["vectors"] = vectors
        from .models.clip import FrozenCLIPEmbedder

        if clip_skip != 1 and isinstance(cond, FrozenCLIPEmbedder):
            kwargs["clip_skip"] = clip_skip
        return functools.partial(cond.encode_ids, **kwargs) if kwargs else cond.encode_ids

    # --- metadata

    def settings(self, item, clip_skip: int = 1) -> dict:
        """`Clip skip`, `Lora hashes` and `TI hashes` of an item's settings line, where they apply."""
        from .models.clip import FrozenCLIPEmbedder

        out = {}
        if clip_skip != 1 and isinstance(getattr(self.model, "cond_stage_model", None), FrozenCLIPEmbedder):
            out["Clip skip"] = clip_skip
        uses = self.uses(item)
        if uses:
            out["Lora hashes"] = ", ".join(f"{u.name}: {self.loras.get(u.name).short_hash}" for u in uses)
        if self.embeddings is not None:
            names = []
            for text in (item.prompt, item.negative_prompt):
                names += [n for n in self.embeddings.names_in(self.clean(text)) if n not in names]
            if names:
                out["TI hashes"] = ", ".join(f"{n}: {self.embeddings.short_hash(n)}" for n in names)
        return out

    def restore(self, lora_hashes: dict, ti_hashes: dict):
        """Point the names of a `--from_png` image's `Lora hashes` / `TI hashes` at the files with those
        hashes under the folders; LoraError naming the first one missing."""
        for name, h in lora_hashes.items():
            path = self.loras.find_by_hash(name, h)
            if path is None:
                raise LoraError(f"the image used the LoRA {name!r} (hash {h}): no file with that hash under "
                                f"{self.loras.directory} (pass --lora_dir)")
            self.loras.paths[name] = path
        for name, h in ti_hashes.items():
            path = self.embeddings.find_by_hash(name, h) if self.embeddings is not None else None
            if path is None:
                directory = self.embeddings.directory if self.embeddings is not None else DEFAULT_EMBEDDINGS_DIR
                raise LoraError(f"the image used the embedding {name!r} (hash {h}): no file with that hash under "
                                f"{directory} (pass --embeddings_dir)")
            self.embeddings.add_alias(name, path)

