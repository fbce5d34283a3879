"""Memory policy of the CPU backend: let go of the file pages under a weight once a packed copy replaces it."""

import ctypes
import mmap
import sys

import torch

_MADV_DONTNEED = 4


def _in_private_file_mapping(start, end):
    """True when [start, end) lies inside one private mapping of a file (a memory-mapped checkpoint)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= start and end <= hi:
                return fields[1].endswith("p") and len(fields) == 6 and fields[5].startswith("/")
    return False


def release_file_pages(t):
    """Let go of the resident pages under tensor t when t is a view of a memory-mapped file that nobody wrote to.

    The loader maps checkpoints privately (copy-on-write) and uses the weights in place, so once a
    weight has been packed its pages are a second copy held in the resident set for nothing. Pages
    still identical to the file are unmapped from this process (they stay in the page cache, and
    are read back from it if the tensor is ever read again); if any page was written to in place,
    nothing is released. Linux only; elsewhere, and for any other tensor, a no-op. Returns True
    when pages were released.
    """
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return False
    page = mmap.PAGESIZE
    begin = t.data_ptr()
    start = -(-begin // page) * page  # whole pages inside the tensor only
    end = (begin + t.numel() * t.element_size()) // page * page
    if end <= start:
        return False
    try:
        if not _in_private_file_mapping(start, end):
            return False
        n = (end - start) // page
        with open("/proc/self/pagemap", "rb") as f:  # 64 bits per page: 63 present, 61 file page
            f.seek(start // page * 8)
            entries = torch.frombuffer(bytearray(f.read(8 * n)), dtype=torch.int64)
        present = entries < 0
        file_page = (entries >> 61) & 1 == 1
        if len(entries) != n or bool((present & ~file_page).any()):  # a page written to since it was mapped
            return False
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0
    except (OSError, ValueError, AttributeError):
        return False
