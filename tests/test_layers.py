"""The CPU inference kernels of `ldm.backends` (kernels and the fused modules) against plain PyTorch in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import rel_err
from ldm.backends import BackendOptions, kernels, optimize
from ldm.backends import modules as fast
from ldm.models.unet import GEGLU, CrossAttention, Upsample

pytestmark = pytest.mark.skipif(not kernels.onednn_available(), reason="this torch has no oneDNN")


def _conv(c_in, c_out, seed=0, bias=True, k=3, options=None):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias).eval()
    with torch.no_grad():
        conv.weight.normal_(0, (k * k * c_in) ** -0.5)
        if bias:
            conv.bias.normal_()
    return optimize(conv, options or BackendOptions())


def _reference(conv, x):
    b = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), conv.weight.double(), b, padding=conv.padding)


def test_packed_convolution_follows_weight_changes():
    conv = _conv(64, 96)
    assert isinstance(conv, fast.PackedConv2d)
    x = torch.randn(2, 64, 9, 9, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(conv(x), _reference(conv, x)) < 5e-6
        assert conv._form[1] == "packed"
        conv.weight.add_(1.0)  # in place
        assert rel_err(conv(x), _reference(conv, x)) < 5e-6
        conv.weight = nn.Parameter(torch.randn_like(conv.weight) * 0.01)  # another tensor
        assert rel_err(conv(x), _reference(conv, x)) < 5e-6
        packed = conv._form
        conv(x)
        assert conv._form is packed  # the same weight and input shape: packed once
        conv(x[:, :, :5])
        assert conv._form is not packed and conv._form[0][2] == (2, 64, 5, 9)  # another shape: packed for it


@pytest.mark.parametrize("gemm", [True, False])
def test_tiny_convolution_as_one_matmul(gemm):
    """At most 64 output positions (batch included): one matmul on the gathered patches, or with the
    lever off the packed convolution; both equal the convolution, strides and residual included."""
    conv = _conv(48, 40, options=BackendOptions(tiny_conv_gemm=gemm))
    g = torch.Generator().manual_seed(5)
    x, r = torch.randn(2, 48, 4, 4, generator=g), torch.randn(2, 40, 4, 4, generator=g)
    with torch.no_grad():
        assert rel_err(conv(x), _reference(conv, x)) < 5e-6
        assert conv._form[1] == ("gemm" if gemm else "packed")
        assert rel_err(conv(x, r), _reference(conv, x) + r) < 5e-6
        y = conv(torch.randn(2, 48, 12, 12, generator=g))  # 288 positions: the packed convolution
        assert conv._form[1] == "packed" and y.shape == (2, 40, 12, 12)
    strided = optimize(nn.Conv2d(8, 8, 3, stride=2, padding=1))
    xs = torch.randn(1, 8, 8, 8, generator=g)
    with torch.no_grad():
        assert rel_err(strided(xs), F.conv2d(xs.double(), strided.weight.double(), strided.bias.double(), 2, 1)) < 5e-6
    assert strided._form[1] == "gemm"


def _qkv(keys, queries=200, heads=3, d=40, seed=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, queries, heads, d, generator=g).transpose(1, 2)  # (B, h, N, d), strided like the UNet's
    k, v = (torch.randn(2, keys, heads, d, generator=g).transpose(1, 2) for _ in range(2))
    return q, k, v


def _softmax_attention(q, k, v):
    qd, kd, vd = q.double(), k.double(), v.double()
    return torch.softmax(qd @ kd.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ vd


# fused (oneDNN Graph) up to 1024 keys; without it, SDPA below 256 keys and blocked matmuls from 256 on
@pytest.mark.parametrize("keys, use_fused, blocked", [(77, True, True), (300, True, True), (77, False, True),
                                                      (300, False, True), (300, False, False)])
def test_attention_matches_softmax_formula(keys, use_fused, blocked):
    fused = kernels.FusedAttention()
    q, k, v = _qkv(keys)
    with torch.no_grad():
        outs = [kernels.attention(q, k, v, fused if use_fused else None, blocked, block_bytes=64 * keys * 4)
                for _ in range(4)]  # 64 queries a block: several blocks
    ref = _softmax_attention(q, k, v)
    for out in outs:
        assert out.shape == (2, 3, 200, 40)
        assert rel_err(out, ref) < 1e-5
    assert len(fused.graphs) == (1 if use_fused else 0)


def test_fused_attention_is_fused_and_leaves_the_fuser_off():
    """The traced graph really runs as one oneDNN Graph partition (otherwise it would be a slow
    unfused TorchScript path), one graph per input signature; TorchScript's oneDNN fuser stays off outside."""
    fused = kernels.FusedAttention()
    assert not torch._C._jit_llga_enabled()
    q, k, v = _qkv(96)
    with torch.no_grad():
        outs = [kernels.attention(q, k, v, fused) for _ in range(3)]
        out = outs[0]
        assert torch.equal(outs[1], out) and torch.equal(outs[2], out)  # the same bits from the first call on
        assert not fused.failed and not torch._C._jit_llga_enabled()
        (graph,) = fused.graphs.values()
        torch._C._jit_set_llga_enabled(True)
        try:
            assert "prim::oneDNNFusionGroup" in str(graph.graph_for(q, k, v))
        finally:
            torch._C._jit_set_llga_enabled(False)
        kernels.attention(q.contiguous(), k, v, fused)  # other strides: another graph
        assert len(fused.graphs) == 2
        assert rel_err(out, _softmax_attention(q, k, v)) < 1e-5


def test_fused_attention_runs_its_pattern_unfused_once_at_full_size():
    """A new signature is traced on tiny inputs, so the first call computes the full-size attention
    unfused once (TorchScript's profiling run: its two matmuls), not twice, before the fused kernel."""
    from torch.profiler import ProfilerActivity, profile

    fused = kernels.FusedAttention()
    q, k, v = _qkv(96)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = kernels.attention(q, k, v, fused)
    full = [e for e in prof.events() if e.name == "aten::bmm" and e.input_shapes and 200 in e.input_shapes[0]]  # 200 queries
    assert len(full) == 2  # scores and values, once
    assert not fused.failed and rel_err(out, _softmax_attention(q, k, v)) < 1e-5


def test_fused_attention_keeps_a_bounded_number_of_graphs():
    fused = kernels.FusedAttention(max_graphs=2)
    with torch.no_grad():
        for keys in (20, 30, 40, 20):
            q, k, v = _qkv(keys, queries=16)
            assert rel_err(kernels.attention(q, k, v, fused), _softmax_attention(q, k, v)) < 1e-5
    assert len(fused.graphs) == 2
    assert [key[1][0][2] for key in fused.graphs] == [40, 20]  # the least recently used (30 keys) went


@pytest.mark.parametrize("lever, has_avx512, sdpa", [(True, False, True), (True, True, False), (False, False, False)])
def test_long_attention_without_avx512_takes_sdpa(monkeypatch, lever, has_avx512, sdpa):
    """Beyond the fused kernel's 1024 keys: SDPA's flash kernel where the CPU kernels lack AVX-512 (faster
    under AVX2), the blocked matmuls with it; the same values either way."""
    calls = []
    plain = F.scaled_dot_product_attention
    monkeypatch.setattr(kernels.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or plain(*a, **kw))
    monkeypatch.setattr(kernels, "avx512", lambda: has_avx512)
    q, k, v = _qkv(1100, queries=40, heads=2)
    with torch.no_grad():
        out = kernels.attention(q, k, v, kernels.FusedAttention(), sdpa_without_avx512=lever)
    assert len(calls) == (1 if sdpa else 0)
    assert out.shape == (2, 2, 40, 40)
    assert rel_err(out, _softmax_attention(q, k, v)) < 1e-5


_CAP_SCRIPT = """
import torch, torch.nn.functional as F
from ldm.backends import BackendOptions, kernels, optimize
from ldm.models.unet import CrossAttention
torch.manual_seed(0)
attn = optimize(CrossAttention(80, heads=2, dim_head=40).eval(), BackendOptions())
x = torch.randn(1, 1100, 80)
with torch.no_grad():
    out = attn(x)
    q, k, v = (t.view(1, 1100, 2, 40).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))
    ref = attn.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 1100, 80))
print(kernels.avx512(), torch.equal(out, ref))
"""


@pytest.mark.parametrize("env, expect", [
    ({"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, "False True"),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "False True"),
])
def test_avx2_cap_is_seen_and_takes_sdpa(env, expect):
    """Under the AVX2 cap (set before torch starts, as oneDNN reads it once) `avx512()` is False and a
    1100-token self-attention of an optimized module is SDPA's, bit for bit."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full_env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1", **env}
    res = subprocess.run([sys.executable, "-c", _CAP_SCRIPT], env=full_env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[-2] == expect


def test_avx512_follows_the_process():
    import os

    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    expected = (torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")
                and cap.startswith(("ALL", "AVX512", "AVX10", "AMX")))
    assert kernels.avx512() == expected


def test_fused_attention_stays_out_of_long_sequences():
    """Its first, unfused calls hold every score at once, and beyond 1024 keys the blocked matmuls are faster."""
    fused = kernels.FusedAttention()
    q, k, v = _qkv(1025, queries=8, heads=1)
    assert not fused.applies(q, k)
    assert fused.applies(*_qkv(1024, queries=8, heads=1)[:2])
    assert not kernels.FusedAttention(max_scores=2 * 3 * 200 * 77 * 4 - 1).applies(*_qkv(77)[:2])
    with torch.no_grad():
        assert rel_err(kernels.attention(q, k, v, fused), _softmax_attention(q, k, v)) < 1e-5
    assert not fused.graphs


def test_fused_attention_falls_back_when_the_fuser_fails(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no oneDNN Graph here")

    fused = kernels.FusedAttention()
    monkeypatch.setattr(torch.jit, "trace", broken)
    q, k, v = _qkv(77)
    with torch.no_grad():
        out = kernels.attention(q, k, v, fused)
        again = kernels.attention(q, k, v, fused)
    assert fused.failed and not fused.graphs and not torch._C._jit_llga_enabled()
    assert rel_err(out, _softmax_attention(q, k, v)) < 1e-5 and torch.equal(out, again)
    assert [r.message for r in caplog.records if "fused attention" in r.message] == [
        "fused attention unavailable (no oneDNN Graph here); using the unfused kernels"]


def test_fused_attention_in_blocks_matches_softmax_formula():
    """Beyond 1024 keys, the fused kernel on blocks of queries: 64 a block here (three full, one of 8: two
    graphs), laid out as [B, N, h, d] like the matmul blocks, the same bits at every call."""
    fused = kernels.FusedAttention()
    q, k, v = _qkv(1100)
    with torch.no_grad():
        outs = [fused.in_blocks(q, k, v, block_scores=64 * 2 * 3 * 1100 * 4) for _ in range(3)]
    assert outs[0].shape == (2, 3, 200, 40) and outs[0].transpose(1, 2).is_contiguous()
    assert rel_err(outs[0], _softmax_attention(q, k, v)) < 1e-5
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])
    assert sorted(key[0][0][2] for key in fused.graphs) == [8, 64]  # query rows of each traced signature


@pytest.mark.parametrize("fused_blocks", [True, False])
def test_long_attention_takes_the_fused_blocks_with_the_lever(monkeypatch, fused_blocks):
    monkeypatch.setattr(kernels, "avx512", lambda: True)
    fused = kernels.FusedAttention()
    q, k, v = _qkv(1100, queries=40, heads=2)
    with torch.no_grad():
        out = kernels.attention(q, k, v, fused, fused_blocks=fused_blocks)
    assert bool(fused.graphs) == fused_blocks
    assert out.shape == (2, 2, 40, 40)
    assert rel_err(out, _softmax_attention(q, k, v)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("lever", [True, False])
def test_v1_self_attention_at_4096_tokens_equals_the_reference(monkeypatch, lever):
    """A self-attention of v1's top level at 512x512 (4096 tokens, 320 channels, 8 heads of 40, both halves
    of the guided batch), optimized with `fused_attention_blocks` on and off (and our kernel off, which would
    take it first: tests/test_native.py), against the reference module."""
    monkeypatch.setattr(kernels, "avx512", lambda: True)  # the blocked paths, not SDPA, on any CPU
    torch.manual_seed(0)
    ref = CrossAttention(320, heads=8, dim_head=40).eval().requires_grad_(False)
    attn = optimize(copy.deepcopy(ref), BackendOptions(fused_attention_blocks=lever, native_attention=False))
    x = torch.randn(2, 4096, 320)
    with torch.no_grad():
        want = ref(x)
        outs = [attn(x) for _ in range(2)]
    assert bool(attn.fused.graphs) == lever
    for out in outs:
        assert rel_err(out, want) < 1e-5
    assert torch.equal(outs[0], outs[1])


def test_linear_and_conv_add_the_residual_in_their_epilogue():
    g = torch.Generator().manual_seed(6)
    lin = optimize(nn.Linear(48, 40).eval())
    assert isinstance(lin, fast.OneDNNLinear)
    x, r = torch.randn(2, 9, 48, generator=g), torch.randn(2, 9, 40, generator=g)
    conv = _conv(24, 32)
    xc, rc = torch.randn(2, 24, 7, 7, generator=g), torch.randn(2, 32, 7, 7, generator=g)
    with torch.no_grad():
        assert rel_err(lin(x, r), F.linear(x.double(), lin.weight.double(), lin.bias.double()) + r) < 5e-6
        assert rel_err(lin(x, r.transpose(0, 1).contiguous().transpose(0, 1)), lin(x) + r) < 5e-6  # strided
        assert rel_err(conv(xc, rc), _reference(conv, xc) + rc) < 5e-6
        geglu = optimize(GEGLU(48, 40))
        assert isinstance(geglu, fast.FastGEGLU)
        a, gate = F.linear(x.double(), geglu.proj.weight.double(), geglu.proj.bias.double()).chunk(2, -1)
        assert rel_err(geglu(x), a * F.gelu(gate)) < 5e-6  # GELU and product in the matmuls' epilogues


@pytest.mark.parametrize("isa_avx512", [True, False])
def test_geglu_in_epilogues_or_in_place_passes_by_isa(monkeypatch, isa_avx512):
    """GEGLU: GELU and product in the matmuls' epilogues where the kernels run AVX-512, else as passes in
    place after plain matmuls; both a * GELU(g) to float rounding."""
    monkeypatch.setattr(kernels, "avx512", lambda: isa_avx512)
    calls = []
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(300, 64, generator=g), torch.randn(2 * 96, 64, generator=g) * 0.1
    b = torch.randn(192, generator=g)
    with torch.no_grad():
        monkeypatch.setattr(torch._C._nn, "gelu_", lambda t: calls.append(t.shape) or real_gelu_(t))
        out = kernels.geglu(x, w, b)
    a, gate = F.linear(x.double(), w.double(), b.double()).chunk(2, -1)
    assert rel_err(out, a * F.gelu(gate)) < 5e-6
    assert calls == ([] if isa_avx512 else [(300, 96)])  # the gate's GELU as a pass of its own


real_gelu_ = torch._C._nn.gelu_


def test_channels_last_residual_is_summed_in_the_epilogue(monkeypatch):
    """Maps between the decoder's convolutions are channels-last: such a residual goes to oneDNN's sum
    epilogue (not a separate add) beside a channels-last input, and the sum is exact; a row-major input
    with a channels-last residual adds it after."""
    g = torch.Generator().manual_seed(8)
    conv = _conv(24, 32)
    cl = torch.channels_last
    x, r = torch.randn(1, 24, 9, 10, generator=g).contiguous(memory_format=cl), torch.randn(1, 32, 9, 10, generator=g)
    assert kernels.fusable(r.contiguous(memory_format=cl), (1, 32, 9, 10), x)
    assert not kernels.fusable(r.contiguous(memory_format=cl), (1, 32, 9, 10), x.contiguous())
    assert not kernels.fusable(r.transpose(2, 3), (1, 32, 9, 10), x)  # neither layout
    fused = []
    real = kernels.conv
    monkeypatch.setattr(kernels, "conv", lambda *a, **k: fused.append(a[-1] is not None) or real(*a, **k))
    with torch.no_grad():
        for xi, ri, summed in [(x, r.contiguous(memory_format=cl), True), (x.contiguous(), r.contiguous(memory_format=cl), False)]:
            fused.clear()
            y = conv(xi, ri)
            assert fused == [summed]
            assert torch.equal(y, conv(xi) + ri)
            assert rel_err(y, _reference(conv, xi) + ri) < 5e-6


@pytest.mark.parametrize("lever", [True, False])
def test_feed_forward_runs_over_blocks_of_tokens_beyond_the_heap_block(monkeypatch, lever):
    """With `token_chunks`, a feed-forward whose inner activation would pass FF_CHUNK_BYTES runs over equal
    blocks of rows that stay under it (here 3), with the residual in each block's epilogue; the same values."""
    from ldm.models.unet import FeedForward

    torch.manual_seed(0)
    ref = FeedForward(32).eval()
    ff = optimize(copy.deepcopy(ref), BackendOptions(token_chunks=lever))
    g = torch.Generator().manual_seed(13)
    x, r = torch.randn(2, 45, 32, generator=g), torch.randn(2, 45, 32, generator=g)
    monkeypatch.setattr(fast, "FF_CHUNK_BYTES", 2 * 45 * 128 * 4 // 3)  # 90 rows of 128 floats: 3 blocks of 30
    rows = []
    real = kernels.geglu
    monkeypatch.setattr(kernels, "geglu", lambda x_, *a, **k: rows.append(x_.shape[0]) or real(x_, *a, **k))
    with torch.no_grad():
        want = ref(x) + r
        got = ff(x, residual=r)
    assert got.shape == want.shape and rel_err(got, want) < 5e-6
    assert rows == ([30, 30, 30] if lever else [2])


def test_decoder_blocks_take_the_phase_kernels_and_the_residual_epilogue():
    """The autoencoder's upsampler runs as phase kernels and its ResnetBlock (with and without a 1x1
    shortcut) sums the shortcut in conv2's epilogue, both equal to the reference modules."""
    from ldm.models import autoencoder

    torch.manual_seed(0)
    x = torch.randn(1, 64, 6, 7, generator=torch.Generator().manual_seed(12))
    for ref in (autoencoder.Upsample(64), autoencoder.ResnetBlock(64), autoencoder.ResnetBlock(64, 96)):
        ref.eval()
        with torch.no_grad():
            want = ref(x)
            fast_ = optimize(copy.deepcopy(ref))
            assert type(fast_) is not type(ref)
            got = fast_(x)
        assert rel_err(got, want) < 5e-6
        if isinstance(ref, autoencoder.Upsample):
            assert isinstance(fast_, fast.PhaseUpsample) and "_phases" in fast_.__dict__
        else:
            assert isinstance(fast_, fast.FastResnetBlock)
            xg = x.clone().requires_grad_(True)  # under autograd: the reference computation, gradients included
            fast_(xg).sum().backward()
            want_grad = torch.autograd.grad(ref(x.clone().requires_grad_(True)).sum(), ref.conv1.weight)[0]
            assert rel_err(fast_.conv1.weight.grad, want_grad) < 5e-6


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_adds_a_per_sample_channel_shift(onednn, bias):
    """conv(x, shift=s) = conv(x) + s[:, :, None, None]; a shift the same for every sample (the timestep
    embedding under guidance) is folded into the bias, and the weights are untouched."""
    g = torch.Generator().manual_seed(9)
    conv = _conv(24, 32, bias=bias, options=BackendOptions(onednn=onednn))
    x = torch.randn(2, 24, 7, 7, generator=g)
    same = torch.randn(1, 32, generator=g).expand(2, 32)
    differ = torch.randn(2, 32, generator=g)
    before = None if conv.bias is None else conv.bias.clone()
    r = torch.randn(2, 32, 7, 7, generator=g)
    with torch.no_grad():
        for shift in (same, differ):
            ref = _reference(conv, x) + shift.double()[:, :, None, None]
            assert rel_err(fast._conv(conv, x, shift=shift), ref) < 5e-5
            assert rel_err(fast._conv(conv, x, r, shift=shift), ref + r) < 5e-5
    assert isinstance(conv, fast.PackedConv2d) == onednn
    assert before is None and conv.bias is None or torch.equal(before, conv.bias)


def test_cross_attention_reuses_keys_and_values_only_while_nothing_changed():
    torch.manual_seed(7)
    attn = optimize(CrossAttention(64, context_dim=32, heads=2, dim_head=16).eval())
    reference = CrossAttention(64, context_dim=32, heads=2, dim_head=16).eval()
    calls = []
    attn.to_k.register_forward_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(8)
    x, ctx = torch.randn(2, 10, 64, generator=g), torch.randn(2, 5, 32, generator=g)

    def check():
        reference.load_state_dict(attn.state_dict())
        assert rel_err(attn(x, ctx), reference(x, ctx)) < 1e-6

    with torch.no_grad():
        attn(x, ctx)
        attn(x, ctx)
        assert len(calls) == 1  # the same context: keys and values kept
        ctx.mul_(2)  # the context changed in place
        check()
        attn.to_v.weight.add_(0.1)  # a weight changed in place
        check()
        assert len(calls) == 3
        attn(x, ctx.clone())  # another tensor, even with the same values
        assert len(calls) == 4
    attn(x, ctx)  # with autograd on: computed afresh, nothing kept
    assert "_kv" not in attn.__dict__ and len(calls) == 5
    with torch.inference_mode():
        c = ctx.clone()
        attn(x, c)
        attn(x, c)
    assert len(calls) == 7  # an inference tensor has no version counter: never reused


@pytest.mark.parametrize("c, size", [(24, 5), (16, 12), (256, 4)])
def test_phase_upsampling_equals_conv_of_the_nearest_upsampling(c, size):
    """The UNet's upsampler as four 2x2 convolutions by output phase (the last case: batch 2 at 4x4,
    small enough for the single-matmul path); the phase kernels are kept while the weight stays, the
    bias read at each call."""
    torch.manual_seed(0)
    up = optimize(Upsample(c, c + 8).eval())
    assert isinstance(up, fast.PhaseUpsample)
    x = torch.randn(2, c, size, size + 1, generator=torch.Generator().manual_seed(11))

    def ref():
        return _reference(up.conv, F.interpolate(x.double(), scale_factor=2.0, mode="nearest"))

    with torch.no_grad():
        y = up(x)
        assert rel_err(y, ref()) < 5e-6
        assert "_phases" in up.__dict__ and "_form" not in up.conv.__dict__  # the phases ran, not the 3x3 conv
        assert y.is_contiguous(memory_format=torch.channels_last)  # as oneDNN's convolutions give
        kept = up._phases
        up.conv.bias.add_(1.0)
        assert rel_err(up(x), ref()) < 5e-6
        assert up._phases is kept and len(kept[1]) == 4
        up.conv.weight.mul_(2.0)  # a changed weight: new phase kernels
        assert rel_err(up(x), ref()) < 5e-6
        assert up._phases is not kept
    assert all(not k.startswith("_") for k in up.state_dict())
