"""Our C attention kernel (ldm.backends.native): its results against float64 softmax attention, what it
declines, how it is built and cached, and the backend's use of it beyond 1024 keys."""

import copy
import logging
import subprocess

import pytest
import torch

from helpers import rel_err
from ldm.backends import BackendOptions, kernels, native, optimize
from ldm.models.unet import CrossAttention

@pytest.fixture
def kernel():
    """Skips where the kernels cannot be had (built on first use: at run time, not when tests are collected)."""
    if native.library() is None:
        pytest.skip("our attention kernel needs AVX2 and a C compiler (see the log)")


needs_kernel = pytest.mark.usefixtures("kernel")


def _qkv(B, h, N, M, d, seed=0):
    """q [B, h, N, d] and k, v [B, h, M, d], strided like the UNet's (views of [B, tokens, h * d])."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, h * d, generator=g).view(B, N, h, d).transpose(1, 2)
    k, v = (torch.randn(B, M, h * d, generator=g).view(B, M, h, d).transpose(1, 2) for _ in range(2))
    return q, k, v


def _softmax_attention(q, k, v):
    qd, kd, vd = q.double(), k.double(), v.double()
    return torch.softmax(qd @ kd.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ vd


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 8, 300, 512, 40),  # v1's heads; a last block of 12 queries, a row tile of 4
                                   (1, 3, 37, 64, 33),    # odd channels: a masked last vector
                                   (2, 2, 50, 96, 48),    # three full vectors (six in AVX2)
                                   (1, 2, 20, 64, 60),    # AVX2: 8 vectors, a masked last one, one row a tile
                                   (1, 2, 9, 32, 64),     # SD 2.x / SDXL heads: the 4-vector tile, one key tile
                                   (3, 1, 40, 128, 16),   # one vector (two in AVX2)
                                   (1, 2, 30, 32, 24),    # AVX2: three vectors
                                   (1, 1, 1, 32, 1)])     # one query, one channel
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_attention_equals_softmax_attention(shape, isa):
    if not native.supports(isa):
        pytest.skip(f"this CPU lacks {isa}")
    q, k, v = _qkv(*shape)
    out = native.attention(q, k, v, isa=isa)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert rel_err(out, _softmax_attention(q, k, v)) < 2e-6
    assert torch.equal(native.attention(q, k, v, isa=isa), out)  # the same bits every call (threads take any items)


@needs_kernel
def test_attention_writes_into_the_given_buffer_and_takes_any_strides():
    q, k, v = _qkv(2, 3, 70, 64, 40)
    buf = torch.full((2, 70, 3, 40), 7.0)  # heads-last, as kernels.attention hands it
    out = native.attention(q.contiguous(), k.contiguous(), v, out=buf.transpose(1, 2))
    assert out.data_ptr() == buf.data_ptr()
    assert rel_err(buf.transpose(1, 2), _softmax_attention(q, k, v)) < 2e-6
    with pytest.raises(ValueError, match="out must be"):
        native.attention(q, k, v, out=torch.empty(2, 3, 70, 41))


@needs_kernel
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_attention_keeps_extreme_scores_finite_and_propagates_nan(isa):
    """Scores of +-1e4 (an exp overflowing without the max subtracted) give the reference's result; a NaN
    in a query gives NaN in that query's row only, as the reference does."""
    if not native.supports(isa):
        pytest.skip(f"this CPU lacks {isa}")
    q, k, v = _qkv(1, 2, 24, 64, 40, seed=3)
    q = q * 300.0
    want = _softmax_attention(q, k, v)
    assert torch.isfinite(want).all()
    assert rel_err(native.attention(q, k, v, isa=isa), want) < 1e-5
    q = q.clone()
    q[0, 1, 5, 7] = float("nan")
    out = native.attention(q, k, v, isa=isa)
    assert torch.isnan(out[0, 1, 5]).all()
    finite = torch.ones(2, 24, dtype=torch.bool)
    finite[1, 5] = False
    assert torch.isfinite(out[0][finite]).all()


@pytest.mark.parametrize("change", ["keys", "head", "dtype", "device_strides"])
def test_attention_declines_what_it_does_not_take(change):
    q, k, v = _qkv(1, 2, 16, 64, 40)
    if change == "keys":  # not a multiple of the key tile (the text's 77 tokens)
        q, k, v = _qkv(1, 2, 16, 77, 40)
    elif change == "head":
        q, k, v = _qkv(1, 2, 16, 64, 80)
    elif change == "dtype":
        q, k, v = q.half(), k.half(), v.half()
    else:  # channels not contiguous
        q = q.transpose(2, 3).contiguous().transpose(2, 3)
    assert not native.applies(q, k, v)
    assert native.attention(q, k, v) is None


def test_build_compiles_once_into_the_cache_and_names_the_file_by_source(tmp_path):
    cmd = native.compiler()
    if cmd is None:
        pytest.skip("no C compiler")
    source = tmp_path / "k.c"
    source.write_text("int attention_f32(void) { return 0; }\n")
    first = native.build(tmp_path / "cache", cmd, source)
    assert first.is_file() and first.parent == tmp_path / "cache"
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path / "cache", cmd, source) == first and first.stat().st_mtime_ns == stamp  # reused
    source.write_text("int attention_f32(void) { return 1; }\n")
    assert native.build(tmp_path / "cache", cmd, source) != first  # a changed source builds anew
    source.write_text("this is not C\n")
    with pytest.raises(subprocess.SubprocessError):
        native.build(tmp_path / "cache", cmd, source)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".so", ".so"]  # no half-written file left


def test_library_is_none_with_a_reason_where_it_cannot_be_built(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setattr(native, "supports", lambda isa: True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with caplog.at_level(logging.INFO, logger="ldm.backends.native"):
        assert native.library() is None
        assert native.library() is None  # asked once: the answer is kept
    assert [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()] == [
        "our attention kernel is unavailable (building attention.c failed: failed); oneDNN's takes its place"]
    q, k, v = _qkv(1, 2, 16, 64, 40)
    assert native.attention(q, k, v) is None
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setattr(native, "supports", lambda isa: False)
    assert native.library() is None


@pytest.mark.parametrize("cc, want", [("gcc -O0", ["gcc", "-O0"]), ("'unbalanced", None), ("  ", None)])
def test_compiler_from_cc(monkeypatch, cc, want):
    monkeypatch.setenv("CC", cc)
    assert native.compiler() == want


def test_library_builds_in_a_temporary_folder_when_the_cache_is_unusable(monkeypatch, tmp_path):
    """A cache folder that cannot be made (a file in its place), then a damaged library file in the cache
    (removed): both times the kernels are built afresh in a temporary folder, and they work."""
    if native.compiler() is None or not native.supports("avx2"):
        pytest.skip("no C compiler or no AVX2")
    (tmp_path / "txt2img").write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", [])
    assert native.library() is not None
    q, k, v = _qkv(1, 2, 16, 64, 40)
    assert rel_err(native.attention(q, k, v, isa="avx2"), _softmax_attention(q, k, v)) < 2e-6
    cache = tmp_path / "other"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(native, "_loaded", [])
    built = native.build(cache / "txt2img" / "native", native.compiler())
    built.write_bytes(b"not a shared library")
    assert native.library() is not None
    assert not built.exists()  # the damaged file removed: the next process builds it again in the cache


@needs_kernel
@pytest.mark.parametrize("isa_avx512", [True, False])
def test_backend_takes_the_kernel_beyond_1024_keys(monkeypatch, isa_avx512):
    """kernels.attention: our kernel beyond FUSED_MAX_KEYS, for AVX-512 when the CPU kernels run it, else
    for AVX2 (before SDPA, which it outruns there); never up to 1024 keys, where oneDNN's fused kernel is
    the faster."""
    calls = []
    real = native.attention
    monkeypatch.setattr(native, "attention",
                        lambda *a, **kw: calls.append((a[1].shape[2], kw["isa"])) or real(*a, **kw))
    monkeypatch.setattr(kernels, "avx512", lambda: isa_avx512)
    for keys in (1024, 1056):
        q, k, v = _qkv(2, 2, 40, keys, 40)
        with torch.no_grad():
            out = kernels.attention(q, k, v, kernels.FusedAttention(), fused_blocks=True, native=True,
                                    sdpa_without_avx512=True)
        assert rel_err(out, _softmax_attention(q, k, v)) < 2e-6
    assert calls == [(1056, "avx512" if isa_avx512 else "avx2")]


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize("lever", [True, False])
def test_v1_self_attention_at_4096_tokens_with_our_kernel_equals_the_reference(monkeypatch, lever):
    """A self-attention of v1's top level at 512x512 (4096 tokens, 8 heads of 40, both halves of the guided
    batch) optimized with `native_attention` on (our kernel, no oneDNN graph traced) and off (the fused blocks)."""
    monkeypatch.setattr(kernels, "avx512", lambda: True)
    torch.manual_seed(0)
    ref = CrossAttention(320, heads=8, dim_head=40).eval().requires_grad_(False)
    attn = optimize(copy.deepcopy(ref), BackendOptions(native_attention=lever))
    x = torch.randn(2, 4096, 320)
    with torch.no_grad():
        want = ref(x)
        outs = [attn(x) for _ in range(2)]
    assert bool(attn.fused.graphs) != lever
    for out in outs:
        assert rel_err(out, want) < 1e-5
    assert torch.equal(outs[0], outs[1])
