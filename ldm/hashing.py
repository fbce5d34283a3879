"""The web UI's "Model hash" of a checkpoint, cached, and the search for a checkpoint by its hash.

Hashing a 4 GB checkpoint takes seconds, so every hash is kept in
$XDG_CACHE_HOME/txt2img/model-hashes.json (default ~/.cache), keyed "path:size:mtime_ns": a file
is hashed once per version, and the cache doubles as the list of every checkpoint hashed before,
which `find_checkpoint` searches first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from .paths import CHECKPOINT_SUFFIXES, DEMO_CKPT, cache_dir, model_dirs, repo_path

log = logging.getLogger(__name__)

HASH_LENGTH = 10


def cache_file() -> Path:
    return cache_dir() / "model-hashes.json"


def _read_cache() -> dict:
    try:
        cache = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(cache: dict):
    """Best effort: a cache we cannot write is only slower next time."""
    target = cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0))
        os.replace(tmp, target)
    except OSError:
        pass


def _key(path: Path) -> str:
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def cached_hash(path) -> str | None:
    """The cached hash of this version of the file, without reading the file; None if not cached."""
    path = Path(path).resolve()
    value = _read_cache().get(_key(path))
    return value if isinstance(value, str) else None


def checkpoint_hash(path) -> str:
    """First 10 hex digits of the file's sha256, the web UI's "Model hash" (cached)."""
    path = Path(path).resolve()
    key = _key(path)
    cache = _read_cache()
    if isinstance(cache.get(key), str):
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    value = digest.hexdigest()[:HASH_LENGTH]
    cache = _read_cache()  # another process may have added entries meanwhile
    cache[key] = value
    _write_cache(cache)
    return value


def cached_file_hash(path, kind: str, compute) -> str:
    """`compute(path)` (a LoRA's or an embedding's short hash), kept in the same cache under the key
    "kind|path:size:mtime_ns" (never taken for a checkpoint by `hashed_before`)."""
    path = Path(path).resolve()
    key = f"{kind}|{_key(path)}"
    value = _read_cache().get(key)
    if isinstance(value, str):
        return value
    value = compute(path)
    cache = _read_cache()
    cache[key] = value
    _write_cache(cache)
    return value


def hashed_before() -> list[Path]:
    """The checkpoints the cache knows (its keys are "path:size:mtime_ns"), those still present."""
    paths = []
    for key in _read_cache():
        path = Path(key.rsplit(":", 2)[0])
        if path.is_file() and path not in paths:
            paths.append(path)
    return paths


def candidates(default_ckpt=None) -> list[Path]:
    """Where a checkpoint is looked for by hash, in order: the bundled demo model, the files under
    `models/` (recursively, .ckpt and .safetensors), every checkpoint hashed before, then the default."""
    found = [repo_path(DEMO_CKPT)]
    for d in model_dirs():
        found += sorted(p for p in d.rglob("*") if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    found += hashed_before()
    if default_ckpt is not None:
        found.append(repo_path(default_ckpt))
    unique, seen = [], set()
    for p in found:
        if p.is_file() and p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def find_checkpoint(model_hash: str, default_ckpt=None) -> Path | None:
    """The first checkpoint of `candidates` whose hash is `model_hash` (case-insensitive), or None.

    Files the cache already knows cost nothing; the cached ones are checked before any file is read,
    and a file is hashed only when its size could hold a model (the web UIs do the same search)."""
    want = model_hash.strip().lower()
    paths = candidates(default_ckpt)
    for p in paths:
        if (cached_hash(p) or "").lower() == want:
            return p
    for p in paths:
        if cached_hash(p) is None:
            log.info("hashing %s to find the model %s", p, model_hash)
            if checkpoint_hash(p).lower() == want:
                return p
    return None


def searched_places(default_ckpt=None) -> str:
    """Where `find_checkpoint` looked, in words (for the error message)."""
    dirs = [str(d) for d in model_dirs()] or [str(Path("models"))]
    return (f"the demo model, {' and '.join(d + '/' for d in dirs)} (recursively), "
            f"{len(hashed_before())} checkpoint(s) hashed before ({cache_file()})"
            + (f" and {default_ckpt}" if default_ckpt else ""))
