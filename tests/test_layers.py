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


@pytest.mark.parametrize("keys", [77, 300])  # SDPA below 256 keys, blocked oneDNN matmuls from 256 on
def test_attention_matches_softmax_formula(keys, monkeypatch):
    monkeypatch.setattr(layers, "_ATTN_BLOCK_BYTES", 64 * keys * 4)  # 64 queries a block: several blocks
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 200, 3, 40, generator=g).transpose(1, 2)  # (B, h, N, d), strided like the UNet's
    k, v = (torch.randn(2, keys, 3, 40, generator=g).transpose(1, 2) for _ in range(2))
    with torch.no_grad():
        out = layers.attention(q, k, v)
    qd, kd, vd = q.double(), k.double(), v.double()
    ref = torch.softmax(qd @ kd.transpose(-1, -2) / 40**0.5, dim=-1) @ vd
    assert out.shape == (2, 3, 200, 40)
    assert rel_err(out, ref) < 1e-5


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
