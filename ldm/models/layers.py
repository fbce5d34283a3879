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
- On tiny outputs (at most 64 positions, batch included: the 4x4 maps of the UNet's deepest level
  at 256x256) a convolution is one matmul instead (`gemm_conv`): the weight, laid out once as
  [out, kh, kw, in], is the matmul's streamed operand and the gathered input patches the small
  one, 1.3 to 1.6x faster than oneDNN's direct convolution there, which runs such layers at half
  its usual rate.
- A nearest 2x upsampling followed by a 3x3 convolution (`Conv2d.upsampled`, the UNet's
  upsamplers) is four 2x2 convolutions on the small map, one per output phase: 4/9 of the FLOPs,
  and no upsampled copy. (In the VAE decoder, whose maps are large, it measured slower as a whole.)
- Attention runs as oneDNN Graph's fused kernel up to 1024 keys (`FusedAttention`), and as
  blocks of queries beyond (`attention`).
- With `LDM_WINOGRAD=1` (off by default), 3x3 convolutions with at least 256 channels in and out
  (and at most 1920 x 640) on maps of at least 16x16 take Winograd's F(4x4, 3x3) instead
  (`winograd_conv3x3`): 36 matrix products in the transformed domain do the work of 144 per 4x4
  output tile. In the v1 UNet that is every 3x3 convolution of the 320- and 640-channel levels,
  each 1.1 to 2x faster on its own; but the whole guided step gained only 0 to 5 % on this
  2-core machine (within its noise at 256x256, 2 to 5 % at 512x512), while the transformed
  weight, 4x the plain one, costs 0.9 GB more for the v1 UNet: hence opt-in. The 1280-channel
  layers always stay direct (they would add 3 GB). `DirectConv2d` never takes it: the VAE
  decoder's single large maps (64x64 to 256x256) measured slower with it, its transforms bound
  by memory traffic there.

Everything else (GPU, half precision, training, a torch built without oneDNN) takes the plain
`nn` path. `ONEDNN = False` (or the environment variable `LDM_ONEDNN=0`) turns the fast path off,
which the benchmark uses to measure what it gains.
"""

import collections
import contextlib
import ctypes
import logging
import math
import mmap
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def _onednn_available():
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
                and hasattr(ops, "_convolution_pointwise") and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_available() and os.environ.get("LDM_ONEDNN", "1") != "0"
WINOGRAD = os.environ.get("LDM_WINOGRAD", "0") == "1"  # opt-in (see above); only ever used on the oneDNN path


@contextlib.contextmanager
def onednn(enabled):
    """Temporarily turn the oneDNN inference path on or off (for A/B measurements)."""
    global ONEDNN
    before, ONEDNN = ONEDNN, bool(enabled) and _onednn_available()
    try:
        yield
    finally:
        ONEDNN = before


_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)  # torch.compile tracing


def _fast(x, weight):
    """True when this call can take the oneDNN path: CPU, float32, no gradient to record, and not
    being traced by torch.compile (which lowers plain ops to its own kernels)."""
    return (ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) and not _compiling())


_ATTN_MIN_KEYS = 256  # below this (and where the fused kernel does not apply) SDPA's kernel is as fast
_ATTN_BLOCK_BYTES = 4 << 20  # scores computed a block of queries at a time: linear memory in the sequence length
FUSED_ATTENTION = True  # oneDNN Graph's fused kernel where it applies (see FusedAttention); False for A/B runs
_FUSED_MAX_KEYS = 1024  # above, the blocked matmuls measured faster (2048 keys: 55 against 66 ms)
_FUSED_MAX_SCORES = 256 << 20  # bytes of scores: a graph's first, unfused runs hold them all at once


class FusedAttention:
    """softmax(q k^T * scale) v in one oneDNN Graph partition, the fused scaled-dot-product kernel
    that oneDNN ships for CPUs: scores and probabilities stay in cache a block at a time.

    PyTorch reaches that kernel through TorchScript's oneDNN fuser, so the four operations are traced
    once per input signature (shapes, strides, scale) and the fuser is switched on only while one of
    these traces runs (it is process-wide; nobody else's TorchScript sees it). A new trace is run
    unfused once while TorchScript profiles it (all scores in memory at once, hence the size limit),
    and that result is thrown away: results differing in the last bits between the first call and
    the next would make the same seed give another image the second time in a process. On the
    UNet's heads (2 x 8 heads of 40 to 160 channels, 64 to 1024 queries, 77 to 1024 keys) it
    measured 1.5 to 4x faster than SDPA or the blocked matmuls, within 1e-6 of them. If this torch cannot trace or fuse, it says so once in
    the log and `attention` goes on without it.
    """

    def __init__(self, max_graphs=32):
        self.max_graphs = max_graphs
        self.graphs = collections.OrderedDict()  # signature -> traced graph, least recently used first
        self.failed = not (hasattr(torch._C, "_jit_set_llga_enabled") and hasattr(torch.jit, "trace"))

    @staticmethod
    def applies(q, k):
        B, h, N, _ = q.shape
        M = k.shape[2]
        return M <= _FUSED_MAX_KEYS and B * h * N * M * q.element_size() <= _FUSED_MAX_SCORES

    def __call__(self, q, k, v):
        """The attention of q [B, h, N, d], k, v [B, h, M, d] as [B, h, N, d]; None when this torch cannot."""
        if self.failed:
            return None
        scale = q.shape[-1] ** -0.5
        key = tuple((tuple(t.shape), t.stride(), t.dtype) for t in (q, k, v)) + (scale,)
        before = torch._C._jit_llga_enabled()
        try:
            torch._C._jit_set_llga_enabled(True)
            graph = self.graphs.get(key)
            if graph is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # TorchScript is deprecated; this use is self-contained
                    graph = torch.jit.trace(_scaled_dot_product(scale), (q, k, v), check_trace=False)
                for _ in range(max(1, getattr(torch._C, "_jit_get_num_profiled_runs", lambda: 1)())):
                    graph(q, k, v)  # TorchScript's profiling runs, unfused: their results are not returned, so
                    # every result comes from the fused kernel (the same bits at every call, the first included)
                self.graphs[key] = graph
                while len(self.graphs) > self.max_graphs:
                    self.graphs.popitem(last=False)
            self.graphs.move_to_end(key)
            return graph(q, k, v)
        except RuntimeError as e:  # no oneDNN Graph in this build, or a fuser failure: not the inputs' fault
            self.failed = True
            self.graphs.clear()
            log.warning("fused attention unavailable (%s); using the unfused kernels", str(e).splitlines()[0][:200])
            return None
        finally:
            torch._C._jit_set_llga_enabled(before)


def _scaled_dot_product(scale):
    def sdp(q, k, v):  # the pattern oneDNN Graph fuses: MatMul, Multiply by a scalar, SoftMax, MatMul
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1), v)

    return sdp


fused_attention = FusedAttention()


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v for q [B, h, N, d] and k, v [B, h, M, d] of any strides; [B, h, N, d].

    On the oneDNN path, oneDNN Graph's fused kernel (`FusedAttention`) up to 1024 keys; beyond, two
    oneDNN matmuls per head and block of queries (scores of about 4 MB, then softmax, then the
    values: linear memory), which PyTorch's CPU flash kernel, running the UNet's 40-wide heads at a
    fraction of the machine's speed, does not match. That result is laid out as [B, N, h, d], so
    `.transpose(1, 2).reshape(B, N, h * d)` is free. Elsewhere SDPA.
    """
    B, h, N, d = q.shape
    M = k.shape[2]
    if not (_fast(q, k) and v.dtype == q.dtype):
        return F.scaled_dot_product_attention(q, k, v)
    if FUSED_ATTENTION and fused_attention.applies(q, k):
        out = fused_attention(q, k, v)
        if out is not None:
            return out
    if M < _ATTN_MIN_KEYS:
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


def _fusable(residual, y_shape, x):
    """True when `residual` can be added in the epilogue of the product (same shape and dtype, dense)."""
    return tuple(residual.shape) == tuple(y_shape) and residual.dtype == x.dtype and residual.is_contiguous()


class Linear(nn.Linear):
    """nn.Linear; `forward(x, residual)` returns linear(x) + residual, the sum done by oneDNN's epilogue."""

    def forward(self, x, residual=None):
        if _fast(x, self.weight):
            if residual is not None and _fusable(residual, (*x.shape[:-1], self.out_features), x):
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        return y if residual is None else y + residual


# Winograd F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
# Y = A^T [(G g G^T) * (B^T d B)] A for a 6x6 input tile d, a 3x3 kernel g and a 4x4 output tile Y.
_WINO_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
            (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_WINO_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
           (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_WINO_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
_WINO_MIN_CHANNELS = 256  # narrower layers: the transforms cost more than the products save
_WINO_MAX_PRODUCT = 1920 * 640  # in x out channels: the 1280-wide layers would need 3 GB more in the v1 UNet
_WINO_MIN_SIZE = 16  # smaller maps: too few tiles per product to read the 4x larger weight for
_WINO_CHUNK_BYTES = 20 << 20  # transformed input processed a band of tile rows at a time


def _wino_matrices():
    bt, at = (torch.tensor(m, dtype=torch.float64) for m in (_WINO_BT, _WINO_AT))
    return torch.kron(bt, bt).float(), torch.kron(at, at).float()  # (36, 36), (16, 36): both 2-D transforms at once


_WINO_B2, _WINO_A2 = _wino_matrices()


def winograd_weight(weight):
    """G g G^T for every 3x3 kernel g of a [K, C, 3, 3] weight: [36, K, C]."""
    K, C = weight.shape[:2]
    g = torch.tensor(_WINO_G, dtype=torch.float64)
    g2 = torch.kron(g, g).to(weight.dtype)  # (36, 9): both sides of G g G^T at once
    u = torch.empty(36, K, C, dtype=weight.dtype)
    torch.mm(g2, weight.reshape(K * C, 9).T, out=u.view(36, K * C))  # one product, no temporary copies
    return u


def winograd_conv3x3(x, u, bias=None, residual=None):
    """conv2d(x, w, bias, padding=1) (+ residual) for x [N, C, H, W] and u = winograd_weight(w); [N, K, H, W].

    The map is cut into 4x4 output tiles (6x6 input tiles overlapping by 2); a band of tile rows at
    a time is gathered, transformed, multiplied by the weight in 36 products (one oneDNN matmul
    each: [tiles, C] x [C, K]) and transformed back into the output, bias added on the way.
    """
    N, C, H, W = x.shape
    K = u.shape[1]
    th, tw = -(-H // 4), -(-W // 4)  # tiles down and across (the last ones may overhang)
    xp = F.pad(x, (1, 4 * tw + 1 - W, 1, 4 * th + 1 - H))
    sn, sc, sh, sw = xp.stride()
    out = x.new_empty(N, K, H, W)
    b = bias.view(1, K, 1, 1) if bias is not None else None
    rows = max(1, min(th, _WINO_CHUNK_BYTES // (36 * N * tw * C * 4)))
    matmul = torch.ops.mkldnn._linear_pointwise  # (x, w) -> x @ w^T
    for i in range(0, th, rows):
        r = min(rows, th - i)
        tiles = N * r * tw
        d = xp[:, :, 4 * i:].as_strided((6, 6, N, r, tw, C), (sh, sw, sn, 4 * sh, 4 * sw, sc))  # 6x6 tiles, no copy
        v = torch.mm(_WINO_B2, d.reshape(36, tiles * C)).view(36, tiles, C)  # B^T d B
        m = x.new_empty(36, tiles, K)
        for j in range(36):
            m[j] = matmul(v[j], u[j], None, "none", [], "")
        y = torch.mm(_WINO_A2, m.view(36, tiles * K)).view(4, 4, N, r, tw, K)  # A^T m A: (4, 4, N, r, tw, K)
        y = y.permute(2, 5, 3, 0, 4, 1).reshape(N, K, 4 * r, 4 * tw)
        lo, hi = 4 * i, min(H, 4 * (i + r))
        y = y[:, :, :hi - lo, :W]
        o = out[:, :, lo:hi]
        if b is None:
            o.copy_(y)
        else:
            torch.add(y, b, out=o)
        if residual is not None:
            o.add_(residual[:, :, lo:hi])  # the band is still in cache
    return out


# Nearest 2x upsampling, then a 3x3 convolution with padding 1: output row 2i + a reads upsampled rows
# 2i + a - 1 .. 2i + a + 1, which are input rows i - 1, i, i (a = 0) or i, i, i + 1 (a = 1); the same
# across. So each output phase (a, b) is a 2x2 convolution of the input padded by one, whose taps are
# sums of the 3x3 taps that land on the same input pixel: 16 products per input pixel, not 36.
_PHASE_TAPS = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))  # [parity][2x2 tap][3x3 tap]


def phase_weights(weight):
    """The four 2x2 kernels [K, C, 2, 2] of conv3x3(upsample2x(x)), by output phase (0, 0), (0, 1), (1, 0), (1, 1)."""
    r = [torch.tensor(t, dtype=torch.float64) for t in _PHASE_TAPS]
    w = weight.detach().double()
    return [torch.einsum("ij,kcjl,ml->kcim", r[a], w, r[b]).to(weight.dtype) for a in range(2) for b in range(2)]


_GEMM_MAX_ROWS = 64  # output positions (batch x pixels) up to which a convolution runs as one matmul


def gemm_layout(w):
    """A convolution weight [K, C, kh, kw] as `gemm_conv` takes it: [K, kh * kw * C], contiguous."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()


def gemm_conv(x, w, k, stride, padding, bias=None, residual=None):
    """conv2d(x, weight) (+ bias) (+ residual) as one matmul, for x [N, C, H, W] and w = the weight
    [K, C, kh, kw] laid out as [K, kh * kw * C]: [N, K, Ho, Wo].

    The patches are gathered from the padded input in channels-last order ([N * Ho * Wo, kh * kw * C],
    contiguous runs of C), then w @ patches^T gives [K, N * Ho * Wo]: the large weight is the
    operand oneDNN streams, the few patches the one it packs.
    """
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = k, stride, padding
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # (N, H + 2ph, W + 2pw, C)
    s_n, s_h, s_w, s_c = xp.stride()
    patches = xp.as_strided((N, Ho, Wo, kh, kw, C), (s_n, sh * s_h, sw * s_w, s_h, s_w, s_c))
    y = torch.ops.mkldnn._linear_pointwise(w, patches.reshape(N * Ho * Wo, kh * kw * C), None, "none", [], "")
    y = y.t().view(N, Ho, Wo, -1)  # (N, Ho, Wo, K) view
    out = y.contiguous() if bias is None else torch.add(y, bias)
    out = out.permute(0, 3, 1, 2)  # (N, K, Ho, Wo), channels-last like oneDNN's convolutions
    return out if residual is None else out.add_(residual)


def tensor_key(t):
    """What identifies a tensor's current contents: address, in-place version (-1 for an inference tensor), shape, dtype."""
    try:
        version = t._version
    except RuntimeError:  # an inference tensor has no version counter
        version = -1
    return (t.data_ptr(), version, tuple(t.shape), t.dtype)


def recording(t) -> bool:
    """True while torch.compile traces or a CUDA graph captures work on t's device: what Python code
    decides then is frozen into what gets replayed, so caches keyed on tensor contents must step aside."""
    return _compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())


class DerivedCache:
    """Mixin for a module that keeps tensors derived from its weights outside the state dict (the
    attributes named in `_derived`): `.to()`, `.half()` and the like drop them, copies and pickles
    leave them behind; they are made again on next use."""

    _derived = ()

    def _apply(self, fn, *args, **kwargs):
        for name in self._derived:  # the weights are about to be replaced
            setattr(self, name, None)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in self._derived:
            state.pop(name, None)
        return state


class Conv2d(DerivedCache, nn.Conv2d):
    """nn.Conv2d whose weight is reordered into oneDNN's layout (or Winograd's domain) once, not on every call."""

    _derived = ("_packed", "_wino", "_gemm", "_phases")
    winograd = True  # may this layer take Winograd's path (when `winograd_ok`)
    _packed = None  # (key of the weight it was made from, packed weight)
    _wino = None  # (key of the weight it was made from, winograd_weight(weight))
    _gemm = None  # (key of the weight it was made from, the weight as [out, kh * kw * in] for gemm_conv)
    _phases = None  # (key of the weight it was made from and the path, the four phase kernels for `upsampled`)
    # each is kept by `_derived_weight`

    def _derived_weight(self, name, make, variant=None):
        """The weight in another form, kept in attribute `name` as (key, value) and made again by
        `make()` when the weight (or `variant`, what else the form depends on) has changed."""
        key = (tensor_key(self.weight), variant)
        cached = getattr(self, name)
        if cached is None or cached[0] != key:
            setattr(self, name, None)  # release the old copy before making the new one
            setattr(self, name, (key, make()))
            release_file_pages(self.weight)  # the plain copy is not read again: no need to keep it resident
        return getattr(self, name)[1]

    def packed_weight(self, x):
        return self._derived_weight("_packed", lambda: torch._C._nn.mkldnn_reorder_conv2d_weight(
            self.weight.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
            list(x.shape)))

    def winograd_ok(self, x):
        """True when this call takes `winograd_conv3x3` (see the module docstring for when it pays)."""
        return (WINOGRAD and self.winograd and self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros"
                and min(self.in_channels, self.out_channels) >= _WINO_MIN_CHANNELS
                and self.in_channels * self.out_channels <= _WINO_MAX_PRODUCT
                and x.dim() == 4 and min(x.shape[2:]) >= _WINO_MIN_SIZE and _fast(x, self.weight))

    def upsampled(self, x):
        """self(F.interpolate(x, scale_factor=2, mode="nearest")); on the oneDNN path, for a 3x3
        convolution with padding 1, as four 2x2 convolutions of x, one per output phase."""
        if not (_fast(x, self.weight) and x.dim() == 4 and self.kernel_size == (3, 3) and self.stride == (1, 1)
                and self.padding == (1, 1) and self.dilation == (1, 1) and self.groups == 1
                and self.padding_mode == "zeros"):
            return self(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        N, _, H, W = x.shape
        gemm = N * H * W <= _GEMM_MAX_ROWS
        weights = self.phase_kernels(gemm, x)
        xp = F.pad(x, (1, 1, 1, 1))
        # Channels-last, like the oneDNN convolutions' own outputs: the phases interleave in runs of
        # K channels, and the next layers get the layout they run in (an NCHW map costs them a copy).
        out = x.new_empty(N, H, 2, W, 2, self.out_channels)
        for a in range(2):
            for b in range(2):
                xs, w = xp[:, :, a:a + H + 1, b:b + W + 1], weights[2 * a + b]
                if gemm:
                    y = gemm_conv(xs, w, (2, 2), (1, 1), (0, 0), self.bias)
                else:
                    y = torch.ops.mkldnn._convolution_pointwise(xs, w, self.bias, [0, 0], [1, 1], [1, 1], 1, "none", [], "")
                out[:, :, a, :, b] = y.permute(0, 2, 3, 1)  # output rows 2i + a, columns 2j + b
        return out.view(N, 2 * H, 2 * W, self.out_channels).permute(0, 3, 1, 2)  # (N, K, 2H, 2W), channels-last

    def phase_kernels(self, gemm, x):
        """The four 2x2 phase kernels (`phase_weights`), kept in the form the call takes: laid out for
        `gemm_conv`, or reordered for oneDNN's convolution (no plain copy kept)."""
        N, C, H, W = x.shape

        def make():
            if gemm:
                return [gemm_layout(w) for w in phase_weights(self.weight)]
            return [torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [0, 0], [1, 1], [1, 1], 1, [N, C, H + 1, W + 1])
                    for w in phase_weights(self.weight)]

        return self._derived_weight("_phases", make, variant=gemm)

    def gemm_ok(self, x):
        """True when this call takes `gemm_conv`: a kxk convolution (k > 1) with few output positions."""
        return (self.kernel_size != (1, 1) and self.groups == 1 and self.dilation == (1, 1)
                and x.shape[0] * math.prod(self._output_size(x)) <= _GEMM_MAX_ROWS)

    def gemm_weight(self):
        return self._derived_weight("_gemm", lambda: gemm_layout(self.weight.detach()))

    def winograd_weight(self):
        return self._derived_weight("_wino", lambda: winograd_weight(self.weight.detach()))

    def forward(self, x, residual=None, shift=None):
        """conv(x) (+ residual) (+ shift[n, c] on every pixel of sample n, channel c).

        On the oneDNN path the residual is summed on the way out of the convolution, and a shift that
        is the same for every sample (a timestep embedding under guidance) is folded into the bias.
        """
        fast = (_fast(x, self.weight) and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and x.dim() == 4)
        bias = self.bias
        if fast and shift is not None and shift.dtype == x.dtype and bool((shift == shift[:1]).all()):
            bias = shift[0] if bias is None else bias + shift[0]
            shift = None
        fuse = fast and residual is not None and _fusable(residual, (x.shape[0], self.out_channels, *self._output_size(x)), x)
        if self.winograd_ok(x) and (residual is None or fuse):
            y = winograd_conv3x3(x, self.winograd_weight(), bias, residual)
            residual = None
        elif fast and (residual is None or fuse) and self.gemm_ok(x):
            y = gemm_conv(x, self.gemm_weight(), self.kernel_size, self.stride, self.padding, bias, residual)
            residual = None
        elif fast:
            args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
            if fuse:
                y = torch.ops.mkldnn._convolution_pointwise.binary(
                    x, residual, self.packed_weight(x), bias, *args, "add", None, None, [], None)
                residual = None
            else:
                y = torch.ops.mkldnn._convolution_pointwise(x, self.packed_weight(x), bias, *args, "none", [], "")
        else:
            y = super().forward(x)
        if shift is not None:
            y = y + shift.to(y.dtype)[:, :, None, None]
        return y if residual is None else y + residual

    def _output_size(self, x):
        return [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                zip(x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride)]


class DirectConv2d(Conv2d):
    """`Conv2d` that always convolves directly (no Winograd), for layers where that measured faster."""

    winograd = False


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
