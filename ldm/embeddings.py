"""Textual-inversion embeddings as the web UIs take them: a file stem written as a word of the prompt.

    lib = EmbeddingLibrary("models/embeddings", width=768, vocab_size=49408)
    tok = lib.tokenizer(model.cond_stage_model.tokenizer)   # encode("a photo of mychar") -> ids
    hidden = model.cond_stage_model.encode_ids(framed_ids, vectors=lib.vectors)

Files: the web UI's `.pt` (`{"string_to_param": {"*": tensor [n, dim]}, ...}`, read with the checkpoint
module's weights-only reader: pickled code never runs), `.safetensors` with `emb_params` [n, dim], SDXL's
`clip_l` / `clip_g` pair (the tower of the matching width is taken; on SDXL each text encoder its own,
sharing the placeholder ids: `others`), and diffusers' `{token: tensor}`.

Each vector of an embedding becomes one token: the tokenizer wrapper puts placeholder ids
(vocab_size + k) where the word was, so the 75-token chunks count an n-vector embedding as n tokens,
and the text encoder's embedding lookup takes vector k for id vocab_size + k. The token table itself is
never changed. An embedding whose width does not match the text encoder is left as plain text (with a
warning), as the web UI skips it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from .lora import file_hash

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")


class EmbeddingError(ValueError):
    """An embedding file that cannot be read (one line)."""


def read_embedding(path) -> dict[str, torch.Tensor]:
    """{tower: vectors [n, dim]} of an embedding file: {"": ...} for one tower, {"clip_l", "clip_g"} for SDXL."""
    from .checkpoint import CheckpointError, _read_pickle, _read_safetensors

    path = Path(path)
    try:
        obj = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path)
    except CheckpointError as e:
        raise EmbeddingError(str(e).replace("checkpoint", "embedding", 1)) from None
    if not isinstance(obj, dict):
        raise EmbeddingError(f"embedding {path} holds no dict of tensors")
    if "clip_l" in obj or "clip_g" in obj:
        towers = {k: obj[k] for k in ("clip_l", "clip_g") if isinstance(obj.get(k), torch.Tensor)}
    elif isinstance(obj.get("string_to_param"), dict) and obj["string_to_param"]:
        params = obj["string_to_param"]
        towers = {"": params.get("*", next(iter(params.values())))}
    elif isinstance(obj.get("emb_params"), torch.Tensor):
        towers = {"": obj["emb_params"]}
    else:
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise EmbeddingError(f"embedding {path}: no string_to_param, emb_params or clip_l/clip_g, and not "
                                 "a single {token: tensor}")
        towers = {"": tensors[0]}
    out = {}
    for k, v in towers.items():
        if not isinstance(v, torch.Tensor) or v.dim() not in (1, 2) or not v.is_floating_point() or not v.numel():
            raise EmbeddingError(f"embedding {path}: vectors of shape {list(getattr(v, 'shape', []))} are not [n, dim]")
        v = v.detach().float().reshape(-1, v.shape[-1])
        if not bool(torch.isfinite(v).all()):
            raise EmbeddingError(f"embedding {path} holds non-finite values")
        out[k] = v
    return out


class EmbeddingLibrary:
    """The embeddings under a folder, by file stem, loaded when first written in a prompt.

    `tower` picks the vectors of SDXL-style files ("clip_l" for a 768-wide encoder, "clip_g" for 1280).
    `others` {tower: width}: further text encoders sharing the placeholder ids (SDXL's bigG beside
    CLIP-L); an embedding is used only when it has vectors for each, as many as for `tower`."""

    def __init__(self, directory, width: int, vocab_size: int, tower: str | None = None, others=None):
        self.directory = Path(directory)
        self.width, self.vocab_size = width, vocab_size
        self.tower = tower or {768: "clip_l", 1280: "clip_g"}.get(width, "")
        self.others = dict(others or {})
        self._other_vectors: dict[str, list[torch.Tensor]] = {t: [] for t in self.others}
        self.paths: dict[str, Path] = {}  # name -> file beyond the folder's stems (--from_png by hash)
        self._files = None
        self._pattern = None
        self._loaded: dict[str, tuple[int, int] | None] = {}  # name -> (first id, count); None: unusable
        self._vectors: list[torch.Tensor] = []
        self._hashes: dict[str, str] = {}

    def files(self) -> dict[str, Path]:
        if self._files is None:
            found = {}
            if self.directory.is_dir():
                for p in sorted(self.directory.rglob("*")):
                    if p.suffix in EMBEDDING_SUFFIXES and p.is_file():
                        found.setdefault(p.stem, p)
            self._files = found
        return {**self._files, **self.paths}

    def add_alias(self, name: str, path):
        self.paths[name] = Path(path)
        self._pattern = None

    def pattern(self):
        if self._pattern is None:
            names = sorted(self.files(), key=len, reverse=True)
            body = "|".join(re.escape(n) for n in names)
            self._pattern = re.compile(rf"(?<![\w-])({body})(?![\w-])", re.IGNORECASE) if names else False
        return self._pattern

    def names_in(self, text: str) -> list[str]:
        """The embeddings written in `text` that this model can use, each once, in order of appearance."""
        out = []
        pattern = self.pattern()
        for m in pattern.finditer(text) if pattern else ():
            name = self._canonical(m.group(1))
            if name not in out and self.load(name) is not None:
                out.append(name)
        return out

    def _canonical(self, written: str) -> str:
        files = self.files()
        return written if written in files else next(n for n in files if n.lower() == written.lower())

    def load(self, name: str) -> tuple[int, int] | None:
        """(first placeholder id, number of vectors) of an embedding, loading it on first use; None when
        its width does not fit this text encoder."""
        if name not in self._loaded:
            path = self.files()[name]
            towers = read_embedding(path)
            vectors = towers.get("") if "" in towers else towers.get(self.tower)
            others = {t: towers.get(t) for t in self.others}
            if any(v is None or vectors is None or v.shape != (len(vectors), self.others[t])
                   for t, v in others.items()):
                log.warning("embedding %s lacks vectors for each text encoder (%s of widths %s): left as text",
                            path, "/".join((self.tower, *self.others)),
                            "/".join(map(str, (self.width, *self.others.values()))))
                self._loaded[name] = None
            elif vectors is None or vectors.shape[1] != self.width:
                widths = sorted({v.shape[1] for v in towers.values()})
                log.warning("embedding %s has vectors of width %s; this text encoder's is %d: left as text",
                            path, "/".join(map(str, widths)), self.width)
                self._loaded[name] = None
            else:
                first = self.vocab_size + sum(len(v) for v in self._vectors)
                self._vectors.append(vectors)
                for t, v in others.items():
                    self._other_vectors[t].append(v)
                self._loaded[name] = (first, len(vectors))
                log.info("embedding %s: %d vector(s)", path, len(vectors))
        return self._loaded[name]

    @property
    def vectors(self) -> torch.Tensor | None:
        """Every loaded embedding's vectors, [n, width]: row k is placeholder id vocab_size + k."""
        return torch.cat(self._vectors) if self._vectors else None

    def vectors_of(self, tower: str) -> torch.Tensor | None:
        """The vectors of one of the `others` towers, rows in the same order as `vectors`."""
        rows = self._other_vectors[tower]
        return torch.cat(rows) if rows else None

    def short_hash(self, name: str) -> str:
        if name not in self._hashes:
            self._hashes[name] = file_hash(self.files()[name])
        return self._hashes[name]

    def find_by_hash(self, name: str, short_hash: str) -> Path | None:
        files = self.files()
        ordered = ([files[name]] if name in files else []) + [p for n, p in files.items() if n != name]
        for p in ordered:
            if file_hash(p) == short_hash.strip().lower()[:12]:
                return p
        return None

    def tokenizer(self, base):
        return EmbeddingTokenizer(base, self)


class EmbeddingTokenizer:
    """A tokenizer whose `encode` puts an embedding's placeholder ids where its name is written."""

    def __init__(self, base, library: EmbeddingLibrary):
        self.base, self.library = base, library

    def __getattr__(self, name):  # bos/eos/pad ids, decode, ... of the wrapped tokenizer
        return getattr(self.base, name)

    def spans(self, ids: list[int]) -> list[tuple[int, int]]:
        """(start, end) of each embedding's run of placeholder ids in `ids` (kept whole in one chunk)."""
        firsts = {first: n for first, n in (v for v in self.library._loaded.values() if v)}
        out, i = [], 0
        while i < len(ids):
            n = firsts.get(ids[i])
            if n and ids[i:i + n] == list(range(ids[i], ids[i] + n)):
                out.append((i, i + n))
                i += n
            else:
                i += 1
        return out

    def encode(self, text: str) -> list[int]:
        pattern = self.library.pattern()
        if not pattern:
            return self.base.encode(text)
        ids, at = [], 0
        for m in pattern.finditer(text):
            found = self.library.load(self.library._canonical(m.group(1)))
            if found is None:
                continue
            ids += self.base.encode(text[at:m.start()]) if text[at:m.start()].strip() else []
            ids += list(range(found[0], found[0] + found[1]))
            at = m.end()
        tail = text[at:]
        return ids + (self.base.encode(tail) if tail.strip() else [])
