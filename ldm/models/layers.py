"""`Linear`, `Conv2d` and `attention` that run CPU float32 inference through oneDNN; drop-in for `nn`.

Same parameters, same checkpoint keys, same results within float32 rounding; only the kernels
differ, and only for inference (no autograd graph needed) on the CPU in float32:

- `F.linear` sends float32 to MKL's sgemm, which on AMD processors takes an AVX2 path at about
  half of what the cores can do; oneDNN's matmul (`mkldnn::_linear_pointwise`) runs the full
  AVX-512 path on the same weights, 2 to 3x faster here.
- `F.conv2d` hands oneDNN a plain weight and oneDNN reorders it into its blocked layout on every
  call, which costs more than the convolution itself on the small feature maps of the UNet's
  deep levels (1280 channels at 4x4: 60 MB reordered for 1 GFLOP). We reorder once, on first
  use, and keep the packed copy beside the parameter (not in the state dict); it is rebuilt
  whenever the weight changes (another tensor, an in-place update, `.to()`).

Everything else (GPU, half precision, training, a torch built without oneDNN) takes the plain
`nn` path. `ONEDNN = False` (or the environment variable `LDM_ONEDNN=0`) turns the fast path off,
which the benchmark uses to measure what it gains.
"""

import contextlib
import ctypes
import mmap
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_available():
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
                and hasattr(ops, "_convolution_pointwise") and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_available() and os.environ.get("LDM_ONEDNN", "1") != "0"


@contextlib.contextmanager
def onednn(enabled):
    """Temporarily turn the oneDNN inference path on or off (for A/B measurements)."""
    global ONEDNN
    before, ONEDNN = ONEDNN, bool(enabled) and _onednn_available()
    try:
        yield
    finally:
        ONEDNN = before


def _fast(x, weight):
    """True when this call can take the oneDNN path: CPU, float32, and no gradient to record."""
    return (ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


_ATTN_MIN_KEYS = 256  # below this SDPA's fused kernel is as fast
_ATTN_BLOCK_BYTES = 4 << 20  # scores computed a block of queries at a time: linear memory in the sequence length


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v for q [B, h, N, d] and k, v [B, h, M, d] of any strides; [B, h, N, d].

    SDPA, except on the oneDNN path with at least 256 keys: there, PyTorch's CPU flash kernel runs
    the UNet's 40-wide heads at a fraction of the machine's speed, and two oneDNN matmuls per head
    and block of queries (scores of about 4 MB, then softmax, then the values) are 1.4 to 2x faster.
    That result is laid out as [B, N, h, d], so `.transpose(1, 2).reshape(B, N, h * d)` is free.
    """
    B, h, N, d = q.shape
    M = k.shape[2]
    if not (_fast(q, k) and v.dtype == q.dtype and M >= _ATTN_MIN_KEYS):
        return F.scaled_dot_product_attention(q, k, v)
    matmul = torch.ops.mkldnn._linear_pointwise  # (x, w) -> x @ w^T
    out = q.new_empty(B, N, h, d).transpose(1, 2)  # (B, h, N, d) view of a (B, N, h, d) buffer
    q = torch.mul(q, d**-0.5, out=q.new_empty(B, h, N, d))  # scaled, contiguous per head
    k = k.contiguous()  # (B, h, M, d)
    vt = v.transpose(2, 3).contiguous()  # (B, h, d, M)
    rows = max(16, _ATTN_BLOCK_BYTES // (4 * M))
    for b in range(B):
        for j in range(h):
            for i in range(0, N, rows):
                scores = matmul(q[b, j, i:i + rows], k[b, j], None, "none", [], "")  # (rows, M)
                out[b, j, i:i + rows] = matmul(torch.softmax(scores, dim=-1), vt[b, j], None, "none", [], "")
    return out


def geglu(x, proj):
    """a * GELU(g) for [a, g] = proj(x).chunk(2, -1): on the oneDNN path, two matmuls whose epilogues
    apply the GELU and the product, instead of a matmul and two passes over a strided half each."""
    if not _fast(x, proj.weight):
        a, gate = proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)
    w_a, w_g = proj.weight.chunk(2)
    b_a, b_g = (None, None) if proj.bias is None else proj.bias.chunk(2)
    gate = torch.ops.mkldnn._linear_pointwise(x, w_g, b_g, "gelu", [], "none")  # "none": the exact (erf) GELU
    return torch.ops.mkldnn._linear_pointwise.binary(x, gate, w_a, b_a, "mul")


class Linear(nn.Linear):
    def forward(self, x):
        if _fast(x, self.weight):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose weight is reordered into oneDNN's layout once, not on every call."""

    _packed = None  # (key of the weight it was made from, packed weight)

    def _weight_key(self):
        w = self.weight
        try:
            version = w._version
        except RuntimeError:  # an inference tensor has no version counter (and cannot be changed in place)
            version = -1
        return (w.data_ptr(), version, tuple(w.shape))

    def packed_weight(self, x):
        key = self._weight_key()
        if self._packed is None or self._packed[0] != key:
            self._packed = None  # release the old copy before making the new one
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self.weight.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(x.shape))
            self._packed = (key, packed)
            release_file_pages(self.weight)  # the plain copy is not read again: no need to keep it resident
        return self._packed[1]

    def forward(self, x):
        if (_fast(x, self.weight) and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and x.dim() == 4):
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.packed_weight(x), self.bias, list(self.padding), list(self.stride), list(self.dilation),
                self.groups, "none", [], "")
        return super().forward(x)

    def _apply(self, fn, *args, **kwargs):
        self._packed = None  # the weight is about to be replaced (.to(), .half(), ...)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # copies and pickles leave the (opaque, re-creatable) packed weight behind
        state = self.__dict__.copy()
        state.pop("_packed", None)
        return state


# ----------------------------------------------------------------------------- memory


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
