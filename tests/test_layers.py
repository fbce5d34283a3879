"""The CPU inference kernels of `ldm.models.layers` against plain PyTorch, computed in float64."""

import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err
from ldm.models import layers

pytestmark = pytest.mark.skipif(not layers._onednn_available(), reason="this torch has no oneDNN")


@pytest.fixture(autouse=True)
def winograd_on(monkeypatch):
    monkeypatch.setattr(layers, "WINOGRAD", True)  # opt-in in use (LDM_WINOGRAD=1); always tested


def _conv(c_in, c_out, seed=0, bias=True, cls=layers.Conv2d):
    torch.manual_seed(seed)
    conv = cls(c_in, c_out, 3, padding=1, bias=bias).eval()
    with torch.no_grad():
        conv.weight.normal_(0, (9 * c_in) ** -0.5)
        if bias:
            conv.bias.normal_()
    return conv


def _reference(conv, x):
    b = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), conv.weight.double(), b, padding=1)


@pytest.mark.parametrize("n, c_in, c_out, h, w, bias", [
    (2, 256, 256, 16, 16, True),  # the UNet's smallest case
    (1, 320, 272, 21, 18, False),  # sizes that are not multiples of the 4x4 tile, no bias
    (2, 640, 320, 32, 32, True),  # wider in than out (a skip concatenation)
])
def test_winograd_matches_direct_convolution(n, c_in, c_out, h, w, bias):
    conv = _conv(c_in, c_out, bias=bias)
    x = torch.randn(n, c_in, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert conv.winograd_ok(x)
        y = conv(x)
        assert conv._wino is not None and conv._packed is None  # the Winograd path ran, not the direct one
        with layers.onednn(False):
            plain = conv(x)
    ref = _reference(conv, x)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < 5e-5  # F(4x4, 3x3) in float32: about 1e-5 of the largest value
    assert rel_err(plain, ref) < 5e-6
    assert rel_err(y, ref) > 0  # it really is another computation than the float64 one


def test_winograd_in_bands_equals_in_one_piece(monkeypatch):
    conv = _conv(256, 256)
    x = torch.randn(1, 256, 30, 17, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = conv(x)
        monkeypatch.setattr(layers, "_WINO_CHUNK_BYTES", 36 * 5 * 256 * 4 * 2)  # two tile rows a band: 4 bands
        banded = conv(x)
    assert rel_err(banded, whole) < 1e-6  # the same arithmetic per tile; only the matmul blocking may differ
    assert rel_err(banded, _reference(conv, x)) < 5e-5


def test_winograd_follows_weight_changes():
    conv = _conv(256, 256)
    x = torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        conv(x)
        conv.weight.mul_(-2)  # in place
        assert rel_err(conv(x), _reference(conv, x)) < 5e-5
        conv.weight = torch.nn.Parameter(torch.randn_like(conv.weight) * 0.01)  # another tensor
        assert rel_err(conv(x), _reference(conv, x)) < 5e-5


def test_when_winograd_is_used():
    x16 = torch.randn(1, 256, 16, 16)
    with torch.no_grad():
        assert _conv(256, 256).winograd_ok(x16)
        assert not _conv(256, 256).winograd_ok(x16[:, :, :8, :8])  # map too small
        assert not _conv(128, 256).winograd_ok(x16[:, :128])  # too narrow
        assert not _conv(1280, 1280).winograd_ok(torch.randn(1, 1280, 16, 16))  # transformed weight too large
        assert not _conv(256, 256, cls=layers.DirectConv2d).winograd_ok(x16)
        strided = layers.Conv2d(256, 256, 3, stride=2, padding=1)
        assert not strided.winograd_ok(x16)
        with layers.onednn(False):
            assert not _conv(256, 256).winograd_ok(x16)
        layers.WINOGRAD = False  # the default
        assert not _conv(256, 256).winograd_ok(x16)
        layers.WINOGRAD = True
    assert not _conv(256, 256).winograd_ok(x16.requires_grad_())  # training: plain nn path
    assert not _conv(256, 256).double().winograd_ok(x16.detach().double())


def test_packed_direct_convolution_follows_weight_changes():
    conv = _conv(64, 96)
    x = torch.randn(2, 64, 9, 9, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(conv(x), _reference(conv, x)) < 5e-6
        assert conv._packed is not None
        conv.weight.add_(1.0)
        assert rel_err(conv(x), _reference(conv, x)) < 5e-6


def _qkv(keys, queries=200, heads=3, d=40, seed=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, queries, heads, d, generator=g).transpose(1, 2)  # (B, h, N, d), strided like the UNet's
    k, v = (torch.randn(2, keys, heads, d, generator=g).transpose(1, 2) for _ in range(2))
    return q, k, v


def _softmax_attention(q, k, v):
    qd, kd, vd = q.double(), k.double(), v.double()
    return torch.softmax(qd @ kd.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ vd


@pytest.fixture
def fused(monkeypatch):
    """A fresh fused-attention cache, so a test sees its own graphs."""
    fresh = layers.FusedAttention()
    monkeypatch.setattr(layers, "fused_attention", fresh)
    return fresh


# fused (oneDNN Graph) up to 1024 keys; without it, SDPA below 256 keys and blocked matmuls from 256 on
@pytest.mark.parametrize("keys, use_fused", [(77, True), (300, True), (77, False), (300, False)])
def test_attention_matches_softmax_formula(keys, use_fused, fused, monkeypatch):
    monkeypatch.setattr(layers, "FUSED_ATTENTION", use_fused)
    monkeypatch.setattr(layers, "_ATTN_BLOCK_BYTES", 64 * keys * 4)  # 64 queries a block: several blocks
    q, k, v = _qkv(keys)
    with torch.no_grad():
        outs = [layers.attention(q, k, v) for _ in range(4)]
    ref = _softmax_attention(q, k, v)
    for out in outs:
        assert out.shape == (2, 3, 200, 40)
        assert rel_err(out, ref) < 1e-5
    assert len(fused.graphs) == (1 if use_fused else 0)


def test_fused_attention_is_fused_and_leaves_the_fuser_off(fused):
    """The traced graph really runs as one oneDNN Graph partition (otherwise it would be a slow
    unfused TorchScript path), one graph per input signature; TorchScript's oneDNN fuser stays off outside."""
    assert not torch._C._jit_llga_enabled()
    q, k, v = _qkv(96)
    with torch.no_grad():
        outs = [layers.attention(q, k, v) for _ in range(3)]
        out = outs[0]
        assert torch.equal(outs[1], out) and torch.equal(outs[2], out)  # the same bits from the first call on
        assert not fused.failed and not torch._C._jit_llga_enabled()
        (graph,) = fused.graphs.values()
        torch._C._jit_set_llga_enabled(True)
        try:
            assert "prim::oneDNNFusionGroup" in str(graph.graph_for(q, k, v))
        finally:
            torch._C._jit_set_llga_enabled(False)
        layers.attention(q.contiguous(), k, v)  # other strides: another graph
        assert len(fused.graphs) == 2
        assert rel_err(out, _softmax_attention(q, k, v)) < 1e-5


def test_fused_attention_keeps_a_bounded_number_of_graphs(fused):
    fused.max_graphs = 2
    with torch.no_grad():
        for keys in (20, 30, 40, 20):
            q, k, v = _qkv(keys, queries=16)
            assert rel_err(layers.attention(q, k, v), _softmax_attention(q, k, v)) < 1e-5
    assert len(fused.graphs) == 2
    assert [key[1][0][2] for key in fused.graphs] == [40, 20]  # the least recently used (30 keys) went


def test_fused_attention_stays_out_of_long_sequences(fused, monkeypatch):
    """Its first, unfused calls hold every score at once, and beyond 1024 keys the blocked matmuls are faster."""
    q, k, v = _qkv(1025, queries=8, heads=1)
    assert not fused.applies(q, k)
    assert fused.applies(*_qkv(1024, queries=8, heads=1)[:2])
    monkeypatch.setattr(layers, "_FUSED_MAX_SCORES", 2 * 3 * 200 * 77 * 4 - 1)
    assert not fused.applies(*_qkv(77)[:2])
    with torch.no_grad():
        assert rel_err(layers.attention(q, k, v), _softmax_attention(q, k, v)) < 1e-5
    assert not fused.graphs


def test_fused_attention_falls_back_when_the_fuser_fails(fused, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no oneDNN Graph here")

    monkeypatch.setattr(torch.jit, "trace", broken)
    q, k, v = _qkv(77)
    with torch.no_grad():
        out = layers.attention(q, k, v)
        again = layers.attention(q, k, v)
    assert fused.failed and not fused.graphs and not torch._C._jit_llga_enabled()
    assert rel_err(out, _softmax_attention(q, k, v)) < 1e-5 and torch.equal(out, again)
    assert [r.message for r in caplog.records if "fused attention" in r.message] == [
        "fused attention unavailable (no oneDNN Graph here); using the unfused kernels"]


def test_linear_and_conv_add_the_residual_in_their_epilogue():
    g = torch.Generator().manual_seed(6)
    lin = layers.Linear(48, 40).eval()
    x, r = torch.randn(2, 9, 48, generator=g), torch.randn(2, 9, 40, generator=g)
    conv = _conv(24, 32)
    xc, rc = torch.randn(2, 24, 7, 7, generator=g), torch.randn(2, 32, 7, 7, generator=g)
    wide = _conv(256, 256)
    xw, rw = torch.randn(1, 256, 16, 16, generator=g), torch.randn(1, 256, 16, 16, generator=g)
    with torch.no_grad():
        assert rel_err(lin(x, r), F.linear(x.double(), lin.weight.double(), lin.bias.double()) + r) < 5e-6
        assert rel_err(lin(x, r.transpose(0, 1).contiguous().transpose(0, 1)), lin(x) + r) < 5e-6  # strided
        assert rel_err(conv(xc, rc), _reference(conv, xc) + rc) < 5e-6
        assert rel_err(wide(xw, rw), _reference(wide, xw) + rw) < 5e-5  # the Winograd path


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_adds_a_per_sample_channel_shift(onednn, bias):
    """conv(x, shift=s) = conv(x) + s[:, :, None, None]; a shift the same for every sample (the timestep
    embedding under guidance) is folded into the bias on the oneDNN path, and the weights are untouched."""
    g = torch.Generator().manual_seed(9)
    small, wide = _conv(24, 32, bias=bias), _conv(256, 256, bias=bias)
    for conv, x in ((small, torch.randn(2, 24, 7, 7, generator=g)), (wide, torch.randn(2, 256, 16, 16, generator=g))):
        c_out = conv.out_channels
        same = torch.randn(1, c_out, generator=g).expand(2, c_out)
        differ = torch.randn(2, c_out, generator=g)
        before = None if conv.bias is None else conv.bias.clone()
        r = torch.randn(2, c_out, *x.shape[2:], generator=g)
        with torch.no_grad(), layers.onednn(onednn):
            for shift in (same, differ):
                ref = _reference(conv, x) + shift.double()[:, :, None, None]
                assert rel_err(conv(x, shift=shift), ref) < 5e-5
                assert rel_err(conv(x, r, shift=shift), ref + r) < 5e-5
        assert before is None and conv.bias is None or torch.equal(before, conv.bias)


def test_cross_attention_reuses_keys_and_values_only_while_nothing_changed():
    from ldm.models.unet import CrossAttention

    torch.manual_seed(7)
    attn = CrossAttention(64, context_dim=32, heads=2, dim_head=16).eval()
    fresh = CrossAttention(64, context_dim=32, heads=2, dim_head=16).eval()
    calls = []
    attn.to_k.register_forward_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(8)
    x, ctx = torch.randn(2, 10, 64, generator=g), torch.randn(2, 5, 32, generator=g)

    def check():
        fresh.load_state_dict(attn.state_dict())
        fresh._kv = None
        assert torch.equal(attn(x, ctx), fresh(x, ctx))

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
    assert attn._kv is None and len(calls) == 5
    with torch.inference_mode():
        c = ctx.clone()
        attn(x, c)
        attn(x, c)
    assert len(calls) == 7  # an inference tensor has no version counter: never reused


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("c, size", [(24, 5), (16, 12), (256, 4)])
def test_upsampled_conv_equals_conv_of_the_nearest_upsampling(onednn, c, size):
    """conv.upsampled(x) = conv(interpolate(x, 2x, nearest)), in four 2x2 convolutions by output phase
    (the last case: batch 2 at 4x4, small enough for the single-matmul path); the phase kernels are
    kept while the weight stays, the bias read at each call."""
    conv = _conv(c, c + 8)
    x = torch.randn(2, c, size, size + 1, generator=torch.Generator().manual_seed(11))
    ref = _reference(conv, F.interpolate(x.double(), scale_factor=2.0, mode="nearest"))
    with torch.no_grad(), layers.onednn(onednn):
        y = conv.upsampled(x)
        assert rel_err(y, ref) < 5e-6
        assert (conv._phases is not None) == (onednn and layers.ONEDNN)
        if conv._phases is not None:  # channels-last, as oneDNN's convolutions give (NCHW would cost the next layer a copy)
            assert y.is_contiguous(memory_format=torch.channels_last)
        if onednn:
            kept = conv._phases
            conv.bias.add_(1.0)
            assert rel_err(conv.upsampled(x), ref + 1.0) < 5e-6
            assert conv._phases is kept and len(kept[1]) == 4
            conv.weight.mul_(2.0)  # a changed weight: new phase kernels
            assert rel_err(conv.upsampled(x), _reference(conv, F.interpolate(x.double(), scale_factor=2.0))) < 5e-6
            assert conv._phases is not kept
    assert all(not k.startswith("_") for k in conv.state_dict())
