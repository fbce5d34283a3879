"""Kernels of our own, in C, for what neither oneDNN nor ATen computes near the CPU's speed.

`attention(q, k, v, isa=...)`: float32 attention over many keys with narrow heads (the v1 UNet's
4096-token layers at 512x512: 2 x 8 heads of 40 channels), in AVX-512 or in AVX2 with FMA
(`attention.c` says how). oneDNN's fused kernel on blocks of queries ran those at about a third of
the FMA peak here, PyTorch's flash kernel under AVX2 at about half; this kernel at 53 to 59 % natively
and 60 % under AVX2 (bench/README.md, "Attention of our own").

The C source ships with the package and is compiled on first use by the system's C compiler (`cc`,
or $CC) into this user's cache (`ldm.paths.cache_dir()/native`, the file named by a hash of the
source, the flags and the compiler's version: a changed source or compiler builds anew), then
loaded with ctypes, once per process; where the cache cannot be written or its file cannot be loaded, it
is built in a temporary folder instead. Where that fails too (no compiler, a CPU without AVX2)
`library()` is None, said once in the log, and callers keep their other kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ...paths import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention.c")
FLAGS = ("-O2", "-fPIC", "-shared", "-pthread")  # each function names its ISA itself (target attributes)
ENTRIES = {"avx512": ("attention_f32", {"avx512f", "fma"}), "avx2": ("attention_f32_avx2", {"avx2", "fma"})}
KEY_TILE = 32  # keys of one packed tile: the number of keys must be a multiple
MAX_HEAD = 64  # channels of a head, at most
MAX_THREADS = 256  # the kernel's own limit
COMPILE_TIMEOUT_S = 120

_lock = threading.Lock()
_loaded = []  # [the library, or None when it cannot be had]: built and loaded once per process


def compiler() -> list[str] | None:
    """The C compiler's command: $CC (split like a shell would; None when it cannot be) or the first of cc,
    gcc, clang on PATH."""
    cc = os.environ.get("CC")
    if cc:
        try:
            return shlex.split(cc) or None
        except ValueError:  # unbalanced quotes
            return None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _version(cmd) -> str:
    try:
        return subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build(directory: Path, cmd: list[str], source: Path = SOURCE) -> Path:
    """The shared library compiled from `source` into `directory` (reused when already there); raises
    OSError or subprocess.SubprocessError when the compiler fails."""
    text = source.read_bytes()
    digest = hashlib.sha256(text + " ".join(FLAGS).encode() + _version(cmd).encode()).hexdigest()[:16]
    target = directory / f"{source.stem}-{digest}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)  # then renamed: a concurrent build never loads half a file
    os.close(fd)
    try:
        done = subprocess.run([*cmd, *FLAGS, "-o", tmp, str(source)], capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise subprocess.SubprocessError((done.stderr.strip().splitlines() or ["failed"])[-1][:300])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(path: Path):
    lib = ctypes.CDLL(str(path))  # ctypes.CDLL lets go of the GIL during calls
    i64, ptr, strides = ctypes.c_int64, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    for name, _ in ENTRIES.values():
        fn = getattr(lib, name)
        fn.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, strides, strides, strides, ctypes.c_float,
                       ctypes.c_int]
        fn.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU's feature flags as Linux's /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def supports(isa: str) -> bool:
    """True when this CPU runs the kernel for `isa` ("avx512": AVX-512F and FMA; "avx2": AVX2 and FMA)."""
    return ENTRIES[isa][1] <= cpu_flags()


def _first_line(e) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def library():
    """The loaded kernels (both ISAs' entries), or None where they cannot be had here (the reason logged once)."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            lib, why = None, None
            cmd = compiler()
            if not supports("avx2"):
                why = "the CPU lacks AVX2 with FMA"
            elif cmd is None:
                why = "no C compiler (cc, gcc, clang or $CC) on PATH"
            else:
                path = None
                try:
                    path = build(cache_dir() / "native", cmd)
                    lib = _load(path)
                except subprocess.SubprocessError as e:  # the compiler failed: it would fail again
                    why = f"building {SOURCE.name} failed: {_first_line(e)}"
                except (OSError, AttributeError):
                    if path is not None:  # a damaged file in the cache: gone, for the next process to build again
                        with contextlib.suppress(OSError):
                            path.unlink()
                    # an unwritable cache, or a damaged file in it: build afresh in a folder of this process's own
                    with tempfile.TemporaryDirectory(prefix="txt2img-native-") as tmp:
                        try:
                            lib = _load(build(Path(tmp), cmd))  # loaded stays loaded once the file is gone
                        except (OSError, subprocess.SubprocessError, AttributeError) as e:
                            why = f"building {SOURCE.name} failed: {_first_line(e)}"
            if why:
                log.info("our attention kernel is unavailable (%s); oneDNN's takes its place", why)
            _loaded.append(lib)
    return _loaded[0]


def applies(q, k, v) -> bool:
    """True when `attention` takes these inputs: float32 CPU tensors [B, h, N, d] (k, v [B, h, M, d]),
    d <= 64, M a multiple of 32, the last dimension of q and v contiguous."""
    return (q.device.type == k.device.type == v.device.type == "cpu"
            and q.dtype == k.dtype == v.dtype == torch.float32 and q.dim() == k.dim() == v.dim() == 4
            and q.shape[0] == k.shape[0] == v.shape[0] and q.shape[1] == k.shape[1] == v.shape[1]
            and q.shape[3] == k.shape[3] == v.shape[3] and k.shape[2] == v.shape[2]
            and 0 < q.shape[3] <= MAX_HEAD and k.shape[2] % KEY_TILE == 0 and q.shape[2] > 0
            and q.stride(3) == 1 and v.stride(3) == 1)


def attention(q, k, v, out=None, isa="avx512"):
    """softmax(q k^T / sqrt(d)) v, [B, h, N, d], by the kernel for `isa` ("avx512" or "avx2"), written
    into `out` when given (any strides with a contiguous last dimension; the caller's heads-last buffer,
    say); None when the kernel is not to be had, this CPU lacks `isa` or the kernel does not take these
    inputs (`applies`), or when it could not start its threads."""
    lib = library()
    if lib is None or not supports(isa) or not applies(q, k, v):
        return None
    B, H, N, D = q.shape
    M = k.shape[2]
    kp = k.reshape(B, H, M // KEY_TILE, KEY_TILE, D).transpose(-1, -2).contiguous()  # tiles of 32 keys, channel-major
    if out is None:
        out = q.new_empty(B, N, H, D).transpose(1, 2)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(3) != 1:
        raise ValueError("attention: out must be a float32 [B, h, N, d] tensor with a contiguous last dimension")
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, v, out)]
    entry = getattr(lib, ENTRIES[isa][0])
    failed = entry(q.data_ptr(), kp.data_ptr(), v.data_ptr(), out.data_ptr(), B, H, N, M, D, *strides, D ** -0.5,
                   max(1, min(MAX_THREADS, torch.get_num_threads())))
    if failed:  # a thread or a buffer could not be had: part of `out` is missing
        log.warning("our attention kernel could not start its threads or allocate its buffers; using oneDNN's")
        return None
    return out
