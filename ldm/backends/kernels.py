"""The CPU float32 inference kernels the backend's fused modules call: oneDNN matmul, convolution,
fused attention, and the rearrangements that feed them. Each takes bfloat16 as well where oneDNN
computes it on this CPU (`bf16_available`: AVX512-BF16 or AMX), products accumulated in float32.

- `F.linear` sends float32 to MKL's sgemm, which on AMD processors takes an AVX2 path at about
  half of what the cores can do; oneDNN's matmul (`mkldnn::_linear_pointwise`) runs the full
  AVX-512 path on the same weights, 2 to 3x faster here. Its epilogue adds a residual, or
  applies GELU and a product (`geglu`), on the way out.
- `F.conv2d` hands oneDNN a plain weight and oneDNN reorders it into its blocked layout on every
  call, which costs more than the convolution itself on the small feature maps of the UNet's
  deep levels (1280 channels at 4x4: 60 MB reordered for 1 GFLOP). The backend reorders once
  (`pack_conv_weight`) and keeps the packed copy beside the parameter.
- On tiny outputs (at most `GEMM_MAX_ROWS` positions, batch included: the 4x4 maps of the UNet's
  deepest level at 256x256) a convolution is one matmul instead (`gemm_conv`), 1.3 to 1.6x faster
  than oneDNN's direct convolution there.
- A nearest 2x upsampling followed by a 3x3 convolution is four 2x2 convolutions on the small map,
  one per output phase (`phase_weights`): 4/9 of the FLOPs, and no upsampled copy.
- Attention runs as oneDNN Graph's fused kernel up to 1024 keys (`FusedAttention`), and beyond
  where the kernels run AVX-512 as the same kernel on blocks of queries (`FusedAttention.in_blocks`)
  or as blocked matmuls (`attention`); without AVX-512 (an AVX2 machine, or oneDNN capped to AVX2)
  SDPA's flash kernel takes those, faster there (`avx512`).

Every function here is pure: what it keeps (traced graphs) lives in objects the caller owns.
"""

import collections
import functools
import logging
import math
import os
import warnings

import torch
import torch.nn.functional as F

from . import native as _native

log = logging.getLogger(__name__)


def onednn_available():
    """True when this torch has the oneDNN (mkldnn) inference ops the CPU backend calls."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
                and hasattr(ops, "_convolution_pointwise") and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))
    except (AttributeError, RuntimeError):
        return False


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def compiling():
    """True while torch.compile traces (it lowers plain ops to its own kernels: fast paths step aside)."""
    return _is_compiling()


_BF16 = []  # [whether oneDNN computes bfloat16 on this CPU], asked once


def bf16_available():
    """True when oneDNN computes bfloat16 on this CPU (AVX512-BF16 or AMX; AVX-512 core emulates it)."""
    if not _BF16:
        try:
            _BF16.append(bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
        except (AttributeError, RuntimeError):
            _BF16.append(False)
    return _BF16[0]


def fast_dtype(dtype):
    """True for the dtypes the oneDNN path computes in: float32, and bfloat16 where oneDNN has it."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and bf16_available())


_ONEDNN_AVX512_CAPS = ("ALL", "AVX512", "AVX10", "AMX")  # ONEDNN_MAX_CPU_ISA values that leave AVX-512 on


@functools.lru_cache(maxsize=None)
def avx512():
    """True when this process's CPU kernels run AVX-512: ATen's vector kernels were built for it and picked
    it (`torch.backends.cpu.get_cpu_capability()`, "AVX2" on an AVX2 machine or with ATEN_CPU_CAPABILITY=avx2),
    and oneDNN is not capped below it (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA, which oneDNN reads once, at its
    first use: a fact about the process, read here for the same reason). Decides kernels whose speed
    ranks differently on AVX2 (bench/README.md, "AVX2")."""
    try:
        aten = torch.backends.cpu.get_cpu_capability().upper()
    except (AttributeError, RuntimeError):
        aten = "DEFAULT"
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return aten.startswith("AVX512") and cap.startswith(_ONEDNN_AVX512_CAPS)


def fast(x, weight):
    """True when this call can take the oneDNN path: CPU, float32 (or bfloat16 where the CPU has it, see
    `fast_dtype`) in both, no gradient to record, not traced."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype and fast_dtype(x.dtype)
            and not records_grad(x, weight) and not compiling())


def records_grad(x, weight) -> bool:
    """True when autograd records a call on x with weight (the fused paths are for inference)."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def recording(t) -> bool:
    """True while torch.compile traces or a CUDA graph captures work on t's device: what Python code
    decides then is frozen into what gets replayed, so caches keyed on tensor contents must step aside."""
    return compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())


def tensor_key(t):
    """What identifies a tensor's current contents: address, in-place version (-1 for an inference tensor), shape, dtype."""
    try:
        version = t._version
    except RuntimeError:  # an inference tensor has no version counter
        version = -1
    return (t.data_ptr(), version, tuple(t.shape), t.dtype)


# ----------------------------------------------------------------------------- matmul


def matmul(x, w, bias=None):
    """x @ w^T (+ bias) through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def fusable(residual, shape, x):
    """True when `residual` can be added in the epilogue of a product (same shape and dtype, dense: row-major,
    or channels-last like a channels-last input, the layout of the maps between the decoder's convolutions)."""
    if tuple(residual.shape) != tuple(shape) or residual.dtype != x.dtype:
        return False
    return residual.is_contiguous() or (residual.dim() == 4 == x.dim() and x.is_contiguous(memory_format=torch.channels_last)
                                        and residual.is_contiguous(memory_format=torch.channels_last))


def linear(x, weight, bias=None, residual=None):
    """F.linear(x, weight, bias) (+ residual), the sum done by oneDNN's epilogue where it can."""
    if residual is not None and fusable(residual, (*x.shape[:-1], weight.shape[0]), x):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    y = matmul(x, weight, bias)
    return y if residual is None else y + residual


def pack_linear_weight(weight, rows=1024):
    """A bfloat16 Linear weight reordered once into oneDNN's blocked layout (for inputs of about `rows`
    rows; others take it as well). oneDNN reorders a plain bfloat16 weight at every call otherwise
    (its bfloat16 kernels read pairs of input channels together), which float32 does not need."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def geglu(x, weight, bias=None, halves=None):
    """a * GELU(g) for [a, g] = linear(x).chunk(2, -1), as two matmuls whose epilogues apply the GELU
    and the product, instead of a matmul and two passes over a strided half each. `halves`: (w_a, w_g)
    as the matmul takes them (packed bfloat16, say), else `weight.chunk(2)`.

    Where the kernels lack AVX-512 (`avx512`), two plain matmuls and the GELU and the product as passes
    in place over their dense outputs: oneDNN's AVX2 epilogues cost more than the passes (one GEGLU of
    v1 at 512x512 under the AVX2 cap, [4096, 320] -> 2 x 1280: 42.2 -> 35.9 ms; natively 20.8 against
    19.7 ms, a tie). The same bits either way (tests/test_layers.py)."""
    w_a, w_g = weight.chunk(2) if halves is None else halves
    b_a, b_g = (None, None) if bias is None else bias.chunk(2)
    if x.dtype == torch.float32 and not avx512():
        gate = matmul(x, w_g, b_g)
        torch._C._nn.gelu_(gate)  # exact (erf) GELU
        return matmul(x, w_a, b_a).mul_(gate)
    gate = torch.ops.mkldnn._linear_pointwise(x, w_g, b_g, "gelu", [], "none")  # "none": the exact (erf) GELU
    return torch.ops.mkldnn._linear_pointwise.binary(x, gate, w_a, b_a, "mul")


# ----------------------------------------------------------------------------- convolution


def pack_conv_weight(weight, padding, stride, dilation, groups, input_shape):
    """A conv weight reordered once into the layout oneDNN picks for inputs of `input_shape`."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.detach().to_mkldnn(), list(padding), list(stride),
                                                     list(dilation), groups, list(input_shape))


def conv(x, packed, bias, padding, stride, dilation, groups, residual=None):
    """conv2d with a packed weight (+ residual, summed in oneDNN's epilogue; the caller checks `fusable`)."""
    args = (list(padding), list(stride), list(dilation), groups)
    if residual is not None:
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, packed, bias, *args, "add", None, None, [], None)
    return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *args, "none", [], "")


GEMM_MAX_ROWS = 64  # output positions (batch x pixels) up to which a convolution runs as one matmul


def gemm_layout(w):
    """A convolution weight [K, C, kh, kw] as `gemm_conv` takes it: [K, kh * kw * C], contiguous."""
    return w.detach().permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()


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
    y = matmul(w, patches.reshape(N * Ho * Wo, kh * kw * C))  # (K, N * Ho * Wo)
    y = y.t().view(N, Ho, Wo, -1)  # (N, Ho, Wo, K) view
    out = y.contiguous() if bias is None else torch.add(y, bias)
    out = out.permute(0, 3, 1, 2)  # (N, K, Ho, Wo), channels-last like oneDNN's convolutions
    return out if residual is None else out.add_(residual)


def conv_output_size(conv, shape):
    """(height, width) of conv's output for inputs of `shape` [N, C, H, W]."""
    return [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
            zip(shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride)]


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


def upsampled_conv(x, kernels, bias, out_channels, gemm):
    """conv3x3(nearest 2x upsampling of x) from the four phase kernels (laid out for `gemm_conv` when
    `gemm`, else packed for oneDNN's convolution), written channels-last like oneDNN's own outputs:
    the phases interleave in runs of K channels, and the next layers get the layout they run in."""
    N, _, H, W = x.shape
    xp = F.pad(x, (1, 1, 1, 1))
    out = x.new_empty(N, H, 2, W, 2, out_channels)
    for a in range(2):
        for b in range(2):
            xs, w = xp[:, :, a:a + H + 1, b:b + W + 1], kernels[2 * a + b]
            if gemm:
                y = gemm_conv(xs, w, (2, 2), (1, 1), (0, 0), bias)
            else:
                y = torch.ops.mkldnn._convolution_pointwise(xs, w, bias, [0, 0], [1, 1], [1, 1], 1, "none", [], "")
            out[:, :, a, :, b] = y.permute(0, 2, 3, 1)  # output rows 2i + a, columns 2j + b
    return out.view(N, 2 * H, 2 * W, out_channels).permute(0, 3, 1, 2)  # (N, K, 2H, 2W), channels-last


# ----------------------------------------------------------------------------- attention


ATTN_MIN_KEYS = 256  # below this (and where the fused kernel does not apply) SDPA's kernel is as fast
ATTN_BLOCK_BYTES = 4 << 20  # scores computed a block of queries at a time: linear memory in the sequence length
FUSED_MAX_KEYS = 1024  # above, the blocked matmuls measured faster (2048 keys: 55 against 66 ms)
FUSED_MAX_SCORES = 256 << 20  # bytes of scores: a graph's first, unfused runs hold them all at once
FUSED_BLOCK_SCORES = 64 << 20  # beyond FUSED_MAX_KEYS, scores per fused call of a block of queries (`in_blocks`)


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
    measured 1.5 to 4x faster than SDPA or the blocked matmuls, within 1e-6 of them. If this torch
    cannot trace or fuse, it says so once in the log and `attention` goes on without it.
    """

    def __init__(self, max_graphs=32, max_keys=FUSED_MAX_KEYS, max_scores=FUSED_MAX_SCORES):
        self.max_graphs, self.max_keys, self.max_scores = max_graphs, max_keys, max_scores
        self.graphs = collections.OrderedDict()  # signature -> traced graph, least recently used first
        self.failed = not (hasattr(torch._C, "_jit_set_llga_enabled") and hasattr(torch.jit, "trace"))

    def applies(self, q, k):
        B, h, N, _ = q.shape
        M = k.shape[2]
        return M <= self.max_keys and B * h * N * M * q.element_size() <= self.max_scores

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
                    # traced on tiny inputs (tracing runs the ops once, unfused): the trace records no shapes the
                    # profiling runs below do not replace with these inputs' own
                    graph = torch.jit.trace(_scaled_dot_product(scale), _tiny_like(q, k, v), check_trace=False)
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

    def in_blocks(self, q, k, v, block_scores=FUSED_BLOCK_SCORES):
        """The same attention over any number of keys, the fused kernel taking a block of queries at a time
        (each block's scores at most `block_scores` bytes in its first, unfused run); laid out as
        [B, N, h, d] like `attention`'s blocks. None when this torch cannot."""
        B, h, N, d = q.shape
        rows = max(16, block_scores // (B * h * k.shape[2] * q.element_size()))
        if rows >= N:
            return self(q, k, v)
        out = _heads_last_buffer(q)
        for i in range(0, N, rows):
            part = self(q[:, :, i:i + rows], k, v)  # one signature for every full block (a view's strides)
            if part is None:
                return None
            out[:, :, i:i + rows] = part
        return out


def _tiny_like(*tensors):
    """Inputs for tracing the attention pattern: each tensor's rank, dtype and last dimension, 2 long elsewhere."""
    return tuple(t.new_zeros((*(2 for _ in t.shape[:-1]), t.shape[-1])) for t in tensors)


def _heads_last_buffer(q):
    """An empty (B, h, N, d) output for q [B, h, N, d], viewed in a (B, N, h, d) buffer: the attention's
    `.transpose(1, 2).reshape(B, N, h * d)` is then free."""
    B, h, N, d = q.shape
    return q.new_empty(B, N, h, d).transpose(1, 2)


def _scaled_dot_product(scale):
    def sdp(q, k, v):  # the pattern oneDNN Graph fuses: MatMul, Multiply by a scalar, SoftMax, MatMul
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1), v)

    return sdp


def attention(q, k, v, fused=None, blocked=True, block_bytes=ATTN_BLOCK_BYTES, sdpa_without_avx512=False,
              fused_blocks=False, native=False):
    """softmax(q k^T / sqrt(d)) v for q [B, h, N, d] and k, v [B, h, M, d] of any strides; [B, h, N, d].

    On the oneDNN path: the `fused` kernel (a FusedAttention) where it applies; else, with `blocked`
    and at least 256 keys, with `fused_blocks` that kernel on blocks of queries (`in_blocks`: all heads
    in one call, 64 MB of scores each), else two oneDNN matmuls per head and block of queries (scores of
    about 4 MB, then softmax, then the values: linear memory), which PyTorch's CPU flash kernel, running
    the UNet's 40-wide heads at a fraction of the machine's speed, does not match on AVX-512. Both
    results are laid out as [B, N, h, d], so `.transpose(1, 2).reshape(B, N, h * d)` is free. Elsewhere
    SDPA. With `native`, beyond `FUSED_MAX_KEYS` keys, our own kernel before any of these
    (`ldm.backends.native.attention`: float32, heads of up to 64 channels), in AVX-512 where the kernels run
    it (`avx512`), else in AVX2: on the 4096-token layers at 512x512 1.45 to 3.3x faster than the fused
    blocks, and 1.14 to 1.18x faster than SDPA under AVX2. Also SDPA instead of the blocks with
    `sdpa_without_avx512` when the kernels lack AVX-512
    (`avx512()`): under AVX2 the flash kernel is the faster (4096 keys: 0.34 against 0.47 s a UNet
    layer), natively the slower. The fused blocks and the matmul blocks took the same time on a quiet
    machine (4096 tokens, 2 x 8 heads of 40: 0.20 s a layer, AVX-512, 2 threads), and half the time
    beside a busy neighbour (0.37 to 0.40 s against 0.81 to 0.87 s): the matmuls' three calls per block
    each wait at a barrier for both threads, one call for all heads does not (bench/README.md).
    """
    B, h, N, d = q.shape
    M = k.shape[2]
    if not (fast(q, k) and v.dtype == q.dtype):
        return F.scaled_dot_product_attention(q, k, v)
    if fused is not None and fused.applies(q, k):
        out = fused(q, k, v)
        if out is not None:
            return out
    if native and M > FUSED_MAX_KEYS:
        out = _native.attention(q, k, v, out=_heads_last_buffer(q), isa="avx512" if avx512() else "avx2")
        if out is not None:
            return out
    if not blocked or M < ATTN_MIN_KEYS or (sdpa_without_avx512 and not avx512()):
        return F.scaled_dot_product_attention(q, k, v)
    if fused is not None and fused_blocks:
        out = fused.in_blocks(q, k, v)
        if out is not None:
            return out
    out = _heads_last_buffer(q)
    q = torch.mul(q, d**-0.5, out=q.new_empty(B, h, N, d))  # scaled, contiguous per head
    k = k.contiguous()  # (B, h, M, d)
    vt = v.transpose(2, 3).contiguous()  # (B, h, d, M)
    rows = max(16, block_bytes // (4 * M))
    for b in range(B):
        for j in range(h):
            for i in range(0, N, rows):
                scores = matmul(q[b, j, i:i + rows], k[b, j])  # (rows, M)
                out[b, j, i:i + rows] = matmul(torch.softmax(scores, dim=-1), vt[b, j])
    return out
