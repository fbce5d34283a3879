"""Memory policy of the CPU backend: let go of the file pages under a weight once a packed copy replaces it
(`release_file_pages`), or under a whole module's weights while a phase of the run does not use it
(`release_module_pages`: the text encoder once the prompts are encoded, the UNet before the decode), and
hand the C heap's freed memory back to the system between phases (`trim_heap`), and keep blocks up to
32 MB in the heap from the start (`set_heap_defaults`)."""

import ctypes
import itertools
import mmap
import os
import sys
import tempfile

import torch

_MADV_DONTNEED = 4
_libc = None  # ctypes handle on the C library, opened at first use


def _c_library():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def resident_bytes():
    """This process's resident set size in bytes (from /proc/self/statm); 0 where unreadable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return 0


def trim_heap():
    """Hand the C heap's free memory back to the system (glibc's `malloc_trim(0)`); returns the bytes the
    resident set shrank by (0 off glibc, or where nothing was free).

    PyTorch's CPU tensors come from malloc. glibc serves those under its mmap threshold (which rises,
    up to 32 MB, each time a larger block is freed) from its heaps, and keeps the pages of blocks freed
    there resident for reuse: after a sampling step of SDXL at 1024x1024 the UNet's activations left
    about 1 GB of such pages behind (0.98 to 1.05 GB; bench/README.md). Released before the decode,
    whose activations are of other sizes and mostly do not fit the freed holes, they no longer add to
    the process's peak (0.9 GB lower). Costs a walk over the heaps' free lists (milliseconds).
    """
    if not sys.platform.startswith("linux"):
        return 0
    try:
        trim = _c_library().malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return 0
    before = resident_bytes()
    trim(ctypes.c_size_t(0))
    return max(0, before - resident_bytes())


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
HEAP_MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks above it are always their own mappings
HEAP_TRIM_THRESHOLD = 2 * HEAP_MMAP_THRESHOLD  # what glibc pairs with a threshold it raised itself
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")


def set_heap_defaults(environ=os.environ) -> bool:
    """Serve blocks up to 32 MB from glibc's heap from the start; True when set (glibc only, and only
    where the user set none of glibc's malloc variables: theirs win).

    glibc gives each block above its mmap threshold (128 KB at start) a mapping of its own, whose pages
    are faulted in and zeroed at first touch and unmapped when freed; each time such a block is freed
    the threshold rises to its size, up to 32 MB. So the first UNet step, whose activations of 1 to
    32 MB all start above it, maps and faults every one of them, and the steps after reuse heap blocks:
    the first guided 512x512 step took about 0.5 s more than with the threshold at 32 MB from the start
    (bench/README.md), the later steps and the peak RSS the same. The trim threshold follows as glibc
    sets it (twice the mmap threshold), so the heap is not shrunk and regrown at every free."""
    if not sys.platform.startswith("linux") or any(name in environ for name in _MALLOC_ENV):
        return False
    try:
        mallopt = _c_library().mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD))


_MEMORY_FILESYSTEMS = ("tmpfs", "ramfs", "hugetlbfs")


def _in_memory_filesystem(path):
    """True when `path` lies on a filesystem kept in memory (tmpfs...), or where that cannot be told."""
    best, kind = "", None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    mount = fields[1].replace("\\040", " ")
                    if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                        best, kind = mount, fields[2]
    except OSError:
        return True
    return kind is None or kind in _MEMORY_FILESYSTEMS


def converted_on_disk(sources, dtype, directory=None):
    """[tensor] of `sources` converted to `dtype`, viewed in a private mapping of a deleted temporary file on
    disk, each on pages of its own; None where that cannot be had (not Linux, the temporary directory in
    memory (tmpfs), no room on its disk): convert into memory then.

    For weights narrowed at load (`--precision bf16` from a float32 file): their pages are then pages of
    a file, as the mapped checkpoint's are, which `release_file_pages` can let go once a packed copy
    replaces them, instead of anonymous memory that must stay resident. Each tensor is converted in memory
    and written with `pwrite`, one at a time (the pages of a source viewed in a mapped file let go once
    written); the file goes with the process. Costs its size in disk space and writes, once per load.
    """
    if not sys.platform.startswith("linux") or not sources:
        return None
    directory = os.path.realpath(directory or tempfile.gettempdir())
    if _in_memory_filesystem(directory):
        return None
    page = mmap.PAGESIZE
    sizes = [-(-t.numel() * dtype.itemsize // page) * page for t in sources]
    total = sum(sizes)
    if not total:
        return None
    mappings = private_file_mappings()
    try:
        with tempfile.TemporaryFile(dir=directory) as f:  # unlinked: nothing left behind
            offset = 0
            for t, size in zip(sources, sizes):
                data = memoryview(t.to(dtype).contiguous().view(torch.uint8).numpy())
                done = 0
                while done < len(data):
                    done += os.pwrite(f.fileno(), data[done:], offset + done)
                offset += size
                release_file_pages(t, mappings)  # a mapped source is not read again
            os.ftruncate(f.fileno(), total)  # the last tensor's page whole
            buf = mmap.mmap(f.fileno(), total, access=mmap.ACCESS_COPY)  # the mapping keeps the file open
    except (OSError, ValueError):
        return None
    flat = torch.frombuffer(buf, dtype=torch.uint8)
    out, offset = [], 0
    for t, size in zip(sources, sizes):
        out.append(flat[offset:offset + t.numel() * dtype.itemsize].view(dtype).view(t.shape))
        offset += size
    return out


def private_file_mappings():
    """[(start, end)] of this process's private (copy-on-write) mappings of files, such as a memory-mapped
    checkpoint (or the converted weights of `converted_on_disk`)."""
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if fields[1].endswith("p") and len(fields) == 6 and fields[5].startswith("/"):
                    lo, hi = (int(v, 16) for v in fields[0].split("-"))
                    spans.append((lo, hi))
    except OSError:
        pass
    return spans


def release_file_pages(tensors, mappings=None):
    """Let go of the resident pages under each tensor that is a view of a memory-mapped file nobody wrote to.

    The loader maps checkpoints privately (copy-on-write) and uses the weights in place, so once a
    weight has been packed its pages are a second copy held in the resident set for nothing. Pages
    still identical to the file are unmapped from this process (they stay in the page cache, and
    are read back from it if the tensor is ever read again); if any page of a tensor was written to
    in place, nothing of it is released. Linux only; elsewhere, and for any other tensor, a no-op.
    `mappings`: `private_file_mappings()`, read once for many calls. Returns how many tensors had
    pages released.
    """
    if not sys.platform.startswith("linux"):
        return 0
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    tensors = [t for t in tensors if t.device.type == "cpu" and t.numel()]
    if not tensors:
        return 0
    mappings = private_file_mappings() if mappings is None else mappings
    return sum(_release(t, mappings) for t in tensors)


def release_module_pages(module, mappings=None):
    """`release_file_pages` for every parameter and buffer of `module`: for a phase of the run that does not
    use it (the UNet is not read while decoding, the text encoder not while sampling). The tensors stay as
    they are; a later call reads its pages back from the page cache (minor faults). Returns how many
    tensors had pages released (0 for weights in memory of their own: converted, on a GPU, written to)."""
    tensors = {t.data_ptr(): t for t in itertools.chain(module.parameters(), module.buffers())}
    return release_file_pages(list(tensors.values()), mappings)


def containing_mapping(t, mappings):
    """[(start, end)] of the mapping in `mappings` that holds tensor t's data, or []."""
    begin = t.data_ptr()
    end = begin + t.numel() * t.element_size()
    return [(lo, hi) for lo, hi in mappings if lo <= begin and end <= hi][:1]


def _release(t, mappings):
    page = mmap.PAGESIZE
    begin = t.data_ptr()
    start = -(-begin // page) * page  # whole pages inside the tensor only
    end = (begin + t.numel() * t.element_size()) // page * page
    if end <= start or not any(lo <= start and end <= hi for lo, hi in mappings):
        return False
    try:
        n = (end - start) // page
        with open("/proc/self/pagemap", "rb") as f:  # 64 bits per page: 63 present, 62 swapped, 61 file page
            f.seek(start // page * 8)
            entries = torch.frombuffer(bytearray(f.read(8 * n)), dtype=torch.int64)
        present = entries < 0
        swapped = (entries >> 62) & 1 == 1
        file_page = (entries >> 61) & 1 == 1
        if len(entries) != n or bool((present & ~file_page).any() or swapped.any()):  # a page written to since mapped
            return False
        return _c_library().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0
    except (OSError, ValueError, AttributeError):
        return False
