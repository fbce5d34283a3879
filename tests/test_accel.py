"""ldm.backends.cuda and the GPU paths: CUDA graphs, torch.compile, float16 against diffusers, the pipeline
on CUDA, and the float16 decode guard.

The CUDA tests are skipped on a machine without a GPU (CI has none); `bench/gpu.sh` runs them on one.
The fallbacks they rely on, torch.compile and the decode guard are tested on the CPU.
"""

import logging

import pytest
import torch

from helpers import V1_CONFIG, randomize_, rel_err, tiny_config, write_tiny_model
from ldm.backends import BackendOptions, optimize
from ldm.backends import cuda as accel
from ldm.backends.cuda import CUDAGraphs
from ldm.checkpoint import build_model
from ldm.config import model_config
from ldm.pipeline import Txt2Img

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _tiny_model(device="cpu", dtype=torch.float32, seed=3):
    return randomize_(build_model(tiny_config(), "cpu"), seed=seed).eval().to(device, dtype)


def test_cuda_graphs_run_eagerly_off_the_gpu():
    calls = []

    def fn(x, t):
        calls.append(x.device.type)
        return x * t[:, None]

    run = CUDAGraphs(fn)
    x, t = torch.randn(2, 3), torch.tensor([2.0, -1.0])
    with torch.no_grad():
        torch.testing.assert_close(run(x, t), torch.stack([2 * x[0], -x[1]]), rtol=0, atol=0)
    assert calls == ["cpu"] and run.captures == 0 and not run.graphs


@pytest.mark.slow  # a minute of tracing
@pytest.mark.parametrize("optimized", [False, True])
def test_unet_traces_as_one_graph(optimized):
    """torch.compile sees the whole UNet step at once, reference or optimized: no graph breaks (the
    oneDNN paths and the key/value cache step aside while tracing)."""
    unet = _tiny_model().model.diffusion_model
    step = optimize(unet).fast_forward if optimized else unet
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([5.0]), torch.randn(1 + optimized, 77, 64)
    with torch.no_grad():
        explained = torch._dynamo.explain(step)(x, t, c)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons[:1]


@pytest.mark.slow
def test_compiled_unet_matches_eager():
    eager, compiled = _tiny_model(), _tiny_model()  # the same seed: the same weights
    optimize(compiled, BackendOptions(compile=True))
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    t = torch.tensor([700.0, 3.0])
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled.apply_model(x, t, c), eager.apply_model(x, t, c), rtol=1e-4, atol=1e-4)
            c.mul_(-1)  # the same context tensor changed in place: no stale keys and values either way


def test_a_failed_compile_falls_back_to_eager(monkeypatch, caplog):
    from torch._dynamo.exc import TorchDynamoException

    def broken_compile(fn, **kwargs):
        def run(*a, **k):
            raise TorchDynamoException("backend failed: no C++ compiler")
        return run

    monkeypatch.setattr(accel.torch, "compile", broken_compile)
    model = optimize(_tiny_model())
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 64)
    with torch.no_grad():
        want = model.apply_model(x, t, c)
        optimize(model, BackendOptions(compile=True))
        with caplog.at_level(logging.WARNING, logger="ldm.backends.cuda"):
            got = [model.apply_model(x, t, c), model.apply_model(x, t, c)]
    assert caplog.text.count("torch.compile failed") == 1
    assert torch.equal(got[0], want) and torch.equal(got[1], want)
    assert model.model.diffusion_model._runner.failed()  # running eagerly from then on


def test_model_errors_are_not_taken_for_compile_errors(monkeypatch):
    monkeypatch.setattr(accel.torch, "compile", lambda fn, **kwargs: fn)
    unet = optimize(_tiny_model().model.diffusion_model, BackendOptions(compile=True))
    with torch.no_grad(), pytest.raises(RuntimeError):
        unet(torch.randn(1, 3, 8, 8), torch.tensor([1.0]), torch.randn(1, 77, 64))  # 3 channels, not 4


def test_half_precision_decode_falls_back_to_float32_on_overflow(tmp_path, caplog):
    """An autoencoder that overflows float16 (inf) is decoded again in float32, its weights left in float16."""
    model = _tiny_model()
    conv_out = model.first_stage_model.decoder.conv_out
    with torch.no_grad():
        conv_out.weight.mul_(3e4)  # fits float16, but the outputs do not
    model.first_stage_model.half().float()  # weights float16 can hold: the float32 decode is then the reference
    pipe = Txt2Img(model, "cpu", "full")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.decode_first_stage(z)
        assert torch.isfinite(want).all() and want.abs().max() > 7e4  # float32 holds what float16 cannot
        expected = pipe.decode(z)[0]  # float32: no guard needed
        model.first_stage_model.half()
        pipe.dtype = torch.float16  # as precision "half" sets on a GPU
        assert not torch.isfinite(model.decode_first_stage(z.half())).all()
        with caplog.at_level(logging.WARNING, logger="ldm.pipeline"):
            got = pipe.decode(z)[0]
    assert "decoding again in float32" in caplog.text
    assert got.tobytes() == expected.tobytes()
    assert all(p.dtype == torch.float16 for p in model.first_stage_model.parameters())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graphs_match_eager(dtype):
    model = _tiny_model("cuda", dtype)
    run = CUDAGraphs(model.apply_model)  # any fn(*tensors) -> tensor
    g = torch.Generator("cuda").manual_seed(0)
    tol = 1e-5 if dtype == torch.float32 else 2e-3

    def inputs(batch=2):
        x = torch.randn(batch, 4, 16, 16, device="cuda", generator=g).to(dtype)
        t = torch.rand(batch, device="cuda", generator=g) * 999
        c = torch.randn(batch, 77, 64, device="cuda", generator=g).to(dtype)
        return x, t, c

    with torch.no_grad():
        outs = []
        for _ in range(3):  # new inputs, a new text context each time: the replay reads them all
            x, t, c = inputs()
            outs.append(run(x, t, c))
            torch.testing.assert_close(outs[-1], model.apply_model(x, t, c), rtol=tol, atol=tol)
        assert run.captures == 1
        assert not torch.equal(outs[0], outs[1])  # an earlier output is not overwritten by later replays
        torch.testing.assert_close(outs[0], outs[0].clone())
        c.mul_(-1)  # the same context tensor changed in place: no stale keys and values
        torch.testing.assert_close(run(x, t, c), model.apply_model(x, t, c), rtol=tol, atol=tol)
        x1, t1, c1 = inputs(batch=1)  # another shape: another graph
        torch.testing.assert_close(run(x1, t1, c1), model.apply_model(x1, t1, c1), rtol=tol, atol=tol)
        assert run.captures == 2


@needs_cuda
def test_cuda_graphs_under_autocast():
    model = _tiny_model("cuda", torch.float32)
    run = CUDAGraphs(model.apply_model)
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(2, 4, 16, 16, device="cuda", generator=g)
    t = torch.tensor([500.0, 20.0], device="cuda")
    c = torch.randn(2, 77, 64, device="cuda", generator=g)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        got = [run(x, t, c), run(x + 1, t, c)]
        want = [model.apply_model(x, t, c), model.apply_model(x + 1, t, c)]
    assert got[0].dtype == want[0].dtype
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    assert run.captures == 1


@needs_cuda
def test_pipeline_on_cuda_same_images_with_and_without_graphs(tmp_path):
    config, ckpt = write_tiny_model(tmp_path)
    images = {}
    for graphs in (True, False):
        pipe = Txt2Img.from_files(config, ckpt, device="cuda", precision="half", hash_model=False, cuda_graphs=graphs)
        res = pipe("a red circle", steps=6, H=64, W=64, n_samples=2, n_iter=1, seed=5, sampler="plms")
        images[graphs] = [torch.tensor(list(r.image.getdata()), dtype=torch.int16) for r in res]
        runner = pipe.model.model.diffusion_model._runner
        assert isinstance(runner, CUDAGraphs) == graphs
        if graphs:
            assert runner.captures == 1  # both images, every step: one graph
    for a, b in zip(images[True], images[False]):
        assert (a - b).abs().max() <= 1
    assert not torch.equal(images[True][0], images[True][1])


@needs_cuda
@pytest.mark.slow
def test_full_v1_float16_on_cuda_as_accurate_as_diffusers():
    """The real v1 UNet and VAE in float16 on the GPU, eager and from a CUDA graph, against diffusers in
    float16 on the same weights, both measured against our float32 result on the CPU."""
    from test_model_parity import _reference_models

    config = {"model": model_config(V1_CONFIG)}
    ours = randomize_(build_model(config, "cpu"), seed=0).eval()
    unet_d, vae_d, _ = _reference_models(config, ours.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 32, 32, generator=g)
    t = torch.tensor([801.0, 41.0])
    c = torch.randn(2, 77, 768, generator=g)
    z = torch.randn(1, 4, 32, 32, generator=g)
    with torch.no_grad():
        eps_ref, img_ref = ours.apply_model(x, t, c), ours.first_stage_model.decode(z)
        ours.to("cuda", torch.float16)
        unet_d.to("cuda", torch.float16)
        vae_d.to("cuda", torch.float16)
        xh, th, ch, zh = x.cuda().half(), t.cuda(), c.cuda().half(), z.cuda().half()
        eps_ours = ours.apply_model(xh, th, ch).float().cpu()
        eps_d = unet_d(xh, th, encoder_hidden_states=ch).sample.float().cpu()
        img_ours = ours.first_stage_model.decode(zh).float().cpu()
        img_d = vae_d.decode(zh).sample.float().cpu()
        optimize(ours, BackendOptions(cuda_graphs=True))
        eps_graph = ours.apply_model(xh, th, ch).float().cpu()
        optimize(ours, BackendOptions(half_groupnorm=True))  # the GPU levers the benchmark weighs
        eps_no_upcast = ours.apply_model(xh, th, ch).float().cpu()
        optimize(ours, BackendOptions(fp32_attention=False))
        eps_half_attention = ours.apply_model(xh, th, ch).float().cpu()
        unet = ours.model.diffusion_model.to(memory_format=torch.channels_last)
        eps_cl = unet(xh.contiguous(memory_format=torch.channels_last), th, ch).float().cpu()
    err_ours, err_d = rel_err(eps_ours, eps_ref), rel_err(eps_d, eps_ref)
    assert err_ours < 1e-2 and err_ours <= 1.5 * err_d + 1e-4, (err_ours, err_d)
    assert rel_err(eps_graph, eps_ours) < 1e-3
    for eps in (eps_no_upcast, eps_half_attention, eps_cl):
        assert rel_err(eps, eps_ref) <= 1.5 * err_d + 1e-4, (rel_err(eps, eps_ref), err_d)
    err_ours, err_d = rel_err(img_ours, img_ref), rel_err(img_d, img_ref)
    assert err_ours < 1e-2 and err_ours <= 1.5 * err_d + 1e-4, (err_ours, err_d)


def test_gpu_script_runs_tests_that_exist():
    """bench/gpu.sh is run only where a GPU is lent: the tests it names must still exist when it is."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = (root / "bench" / "gpu.sh").read_text()
    named = re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", script)
    assert len(named) >= 3
    for path, test in named:
        assert (root / path).is_file(), path
        if test:
            assert f"def {test}(" in (root / path).read_text(), f"{path}::{test}"
