"""The reproducibility promise as it holds, on the tiny random-weight model.

Same flags, seed, machine and thread count: the same bytes, whether the images come from one process
or from torchrun's processes. Across thread counts, float rounding follows the split of the work, so
the pixels are close (within 2/255), not necessarily identical; nothing asserts that they differ.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import write_tiny_model

REPO = Path(__file__).resolve().parent.parent
# Slow tier: three or four whole processes. The fast tier keeps tests/test_distributed.py, which compares
# the files of two processes at the same thread count.
pytestmark = pytest.mark.slow

N_IMAGES = 4  # 2 prompts x --n_iter 2


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("repro")
    config, ckpt = write_tiny_model(d)
    prompts = d / "prompts.txt"
    prompts.write_text("a red circle\na blue square --negative_prompt green\n", encoding="utf-8")
    args = ["--from-file", str(prompts), "--n_samples", "2", "--n_iter", "2", "--H", "64", "--W", "64",
            "--ddim_steps", "3", "--seed", "11", "--config", str(config), "--ckpt", str(ckpt), "--device", "cpu",
            "--no_safety_checker", "--no_watermark", "--resume"]  # --resume: files named by image index, as torchrun's
    return d, args


def env(threads):
    e = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(var, None)
    return e


def single(args, outdir, threads):
    return subprocess.Popen([sys.executable, "-m", "ldm.cli", *args, "--outdir", str(outdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(threads), cwd=REPO)


def finish(proc):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def samples(outdir):
    files = sorted((outdir / "samples").iterdir())
    assert [p.name for p in files] == [f"{k:05d}.png" for k in range(N_IMAGES)]
    return files


@pytest.fixture(scope="module")
def runs(job):
    """One process at 1 thread, twice, and at 2 threads (run side by side: only the results matter)."""
    d, args = job
    outs = {name: d / name for name in ("one_a", "one_b", "two_threads")}
    procs = [single(args, outs["one_a"], 1), single(args, outs["one_b"], 1), single(args, outs["two_threads"], 2)]
    for p in procs:
        finish(p)
    return outs


def test_same_thread_count_gives_the_same_bytes(runs):
    for a, b in zip(samples(runs["one_a"]), samples(runs["one_b"])):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert (runs["one_a"] / "grid-0000.png").read_bytes() == (runs["one_b"] / "grid-0000.png").read_bytes()


def test_torchrun_matches_one_process_at_the_same_thread_count(job, runs):
    """2 processes of 1 thread each (torchrun's default) against 1 process of 1 thread: the same bytes."""
    d, args = job
    out = d / "torchrun"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "ldm.cli", *args, "--outdir", str(out)],
                       capture_output=True, text=True, timeout=300, env=env(1), cwd=REPO)
    assert r.returncode == 0, r.stderr
    for a, b in zip(samples(runs["one_a"]), samples(out)):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_other_thread_count_gives_close_pixels(runs):
    """1 thread against 2: rounding may move a pixel by a level or two, never more."""
    for a, b in zip(samples(runs["one_a"]), samples(runs["two_threads"])):
        pa = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
        pb = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
        assert np.abs(pa - pb).max() <= 2, a.name
        assert Image.open(a).info["parameters"] == Image.open(b).info["parameters"]
