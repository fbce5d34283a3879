"""Numeric flags and --device: finite, in range, a known form, or one line and exit 1 before anything loads."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image, PngImagePlugin

from ldm import checks
from ldm.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_device_forms():
    for name in ("cpu", "cuda", "cuda:0", "cuda:12", "mps"):
        assert checks.device(name) == name
    for name in ("tpu", "gpu", "cuda:", "cuda:-1", "cuda:x", "CPU", "cpu:0 ", "", "cuda:0,1"):
        with pytest.raises(ValueError, match=r"is not a device; valid forms: cpu, cuda, cuda:N \(N = 0, 1, \.\.\.\), mps"):
            checks.device(name)


def test_numbers_and_integers():
    assert checks.number("scale", -3.5) == -3.5  # negative guidance is allowed, as in the original
    for bad in (float("nan"), float("inf"), -float("inf"), True, "7"):
        with pytest.raises(ValueError, match="--scale must be a finite number"):
            checks.number("scale", bad)
    with pytest.raises(ValueError, match="--ddim_eta must not be negative, got -0.1"):
        checks.number("ddim_eta", -0.1, minimum=0)
    with pytest.raises(ValueError, match="--strength must be at most 1, got 1.5"):
        checks.RULES["strength"](1.5)
    assert checks.RULES["strength"](0.0) == 0.0 and checks.RULES["strength"](1) == 1
    assert checks.integer("H", 512, maximum=checks.MAX_SIDE) == 512
    with pytest.raises(ValueError, match="--H must be a positive integer, got 0"):
        checks.integer("H", 0)
    with pytest.raises(ValueError, match="--n_rows must be a non-negative integer, got -1"):
        checks.integer("n_rows", -1, minimum=0)
    with pytest.raises(ValueError, match="--W must be at most 16384, got 16392"):
        checks.RULES["W"](16392)
    with pytest.raises(ValueError, match="must be an integer"):
        checks.integer("H", 64.0)
    checks.seeds_fit(2**64 - 3, 3)
    with pytest.raises(ValueError, match="image 3 would get seed 18446744073709551616"):
        checks.seeds_fit(2**64 - 3, 4)


def test_check_flags_checks_what_the_namespace_has():
    checks.check_flags(SimpleNamespace(scale=7.5, ddim_eta=None, device=None, H=64, seed=0))  # None: the default
    with pytest.raises(ValueError, match="--strength must be at most 1"):
        checks.check_flags(SimpleNamespace(strength=2.0))  # a flag added later is checked by its rule


def test_library_rejects_nan_scale_and_unknown_device():
    from ldm.pipeline import Options, pick_device

    with pytest.raises(ValueError, match="--scale must be a finite number, got nan"):
        Options(scale=float("nan")).validate()
    with pytest.raises(ValueError, match="--ddim_eta must be a finite number"):
        Options(eta=float("inf")).validate()
    with pytest.raises(ValueError, match="--device 'tpu' is not a device"):
        pick_device("tpu")
    assert pick_device("cpu").type == "cpu"


BAD_FLAGS = {
    "scale nan": (["--scale", "nan"], "--scale must be a finite number, got nan"),
    "scale inf": (["--scale", "inf"], "--scale must be a finite number, got inf"),
    "scale overflowing": (["--scale", "1e999"], "--scale must be a finite number, got inf"),
    "eta nan": (["--ddim_eta", "nan"], "--ddim_eta must be a finite number, got nan"),
    "eta negative": (["--ddim_eta", "-1"], "--ddim_eta must not be negative, got -1.0"),
    "H zero": (["--H", "0"], "--H must be a positive integer, got 0"),
    "W huge": (["--W", "1000000"], "--W must be at most 16384, got 1000000"),
    "seed negative": (["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    "seed beyond 64 bits": (["--seed", str(2**64)], "--seed must be at most 18446744073709551615"),
    "seed + k beyond 64 bits": (["--seed", str(2**64 - 1), "--n_samples", "2"], "image 1 would get seed"),
    "n_rows negative": (["--n_rows", "-2"], "--n_rows must be a non-negative integer, got -2"),
    "a trillion images": (["--n_samples", "1000000", "--n_iter", "1000000"], "is more than 1000000 images in one run"),
    "device tpu": (["--device", "tpu"], "--device 'tpu' is not a device; valid forms: cpu, cuda, cuda:N"),
    "device cuda:x": (["--device", "cuda:x"], "--device 'cuda:x' is not a device"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flag_one_line_before_anything_loads(case, tmp_path):
    flags, expected = BAD_FLAGS[case]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--ckpt", str(tmp_path / "none.ckpt"), "--outdir", str(tmp_path / "out"), "--no_safety_checker",
                     *(["--n_iter", "1"] if "--n_iter" not in flags else []), *flags])
    assert code == 1
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("txt2img: error: ")
    assert expected in err.getvalue()
    assert not (tmp_path / "out").exists()  # refused before any folder was made


def test_nan_scale_from_png_metadata(tmp_path):
    """--from_png fills flags from a PNG's text: a hostile `CFG scale: nan` is refused like the flag."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a fox\nSteps: 5, Sampler: DDIM, CFG scale: nan, Seed: 3, Size: 64x64")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png", pnginfo=info)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--from_png", str(tmp_path / "x.png"), "--ckpt", str(tmp_path / "none.ckpt"),
                     "--no_safety_checker", "--outdir", str(tmp_path / "out")])
    assert code == 1 and err.getvalue() == "txt2img: error: --scale must be a finite number, got nan\n"


def test_device_tpu_through_the_script():
    """The issue's case: `--device tpu` printed a traceback."""
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "txt2img.py"), "--device", "tpu", "--demo"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr == ("txt2img: error: --device 'tpu' is not a device; valid forms: cpu, cuda, cuda:N (N = 0, 1, ...), "
                        "mps\n")


def test_cuda_index_beyond_the_devices(monkeypatch):
    import torch

    from ldm.pipeline import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device 'cuda:2': this machine has 2 CUDA device\(s\)"):
        pick_device("cuda:2")
