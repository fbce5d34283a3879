"""Many prompts across processes with torch.distributed: same files and pixels whatever the world size.

The job runs on the CPU with the gloo backend, through torchrun, on a tiny random-weight model.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import write_tiny_model

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "a blue square --negative_prompt green", "a green triangle", "a white dot on black"]
N_IMAGES = 2 * len(PROMPTS)  # --n_iter 2


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    config, ckpt = write_tiny_model(d)
    prompts = d / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    args = ["--from-file", str(prompts), "--n_samples", "3", "--n_iter", "2", "--H", "64", "--W", "64",
            "--ddim_steps", "3", "--seed", "5", "--config", str(config), "--ckpt", str(ckpt), "--device", "cpu",
            "--no_safety_checker", "--no_watermark"]
    return d, args


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(var, None)
    return e


def torchrun(n, *args, script=("-m", "ldm.cli"), timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)


def single(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "ldm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=REPO)


def contents(outdir):
    """{relative path: pixels} of every PNG of an output folder, and the names of any other files."""
    files = sorted(p for p in Path(outdir).rglob("*") if p.is_file())
    others = [p.name for p in files if p.suffix != ".png"]
    return {str(p.relative_to(outdir)): np.asarray(Image.open(p).convert("RGB")) for p in files
            if p.suffix == ".png"}, others


def assert_same(a, b):
    pa, oa = contents(a)
    pb, ob = contents(b)
    assert oa == [] and ob == []
    assert sorted(pa) == sorted(pb)
    for name in pa:
        assert np.array_equal(pa[name], pb[name]), name


@pytest.fixture(scope="module")
def reference(job):
    """The job run by one plain process."""
    d, args = job
    out = d / "one"
    r = single(*args, "--outdir", str(out))
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == [f"{k:05d}.png" for k in range(N_IMAGES)]
    assert (out / "grid-0000.png").is_file()
    return out


@pytest.mark.slow  # two torchrun ranks (13 s); the fast tier keeps the plain-launcher failing-rank job and the group's close
def test_two_processes_give_the_same_files_and_pixels(job, reference):
    d, args = job
    out = d / "two"
    r = torchrun(2, *args, "--outdir", str(out))
    assert r.returncode == 0, r.stderr
    assert_same(reference, out)
    assert r.stdout.count("Your samples are ready") == 1  # rank 0 alone reports
    assert f"{N_IMAGES} sample(s)" in r.stdout
    # The images really were split: each seed's PNG metadata is that of its global index.
    seeds = [Image.open(out / "samples" / f"{k:05d}.png").info["parameters"] for k in range(N_IMAGES)]
    assert all(f"Seed: {5 + k}," in s for k, s in enumerate(seeds))


@pytest.mark.slow
def test_job_refuses_to_overwrite_without_resume(job, reference, tmp_path):
    d, args = job
    out = tmp_path / "again"
    shutil.copytree(reference, out)
    before = contents(out)[0]
    r = torchrun(2, *args, "--outdir", str(out))
    assert r.returncode != 0
    assert "already exists: --resume finishes that job" in r.stderr
    after = contents(out)[0]
    assert sorted(before) == sorted(after) and all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_resume_after_damage_ends_identical(job, reference, tmp_path):
    """A killed job leaves some images, a file cut short and a temporary file: --resume completes it."""
    d, args = job
    out = tmp_path / "damaged"
    (out / "samples").mkdir(parents=True)
    for k in (0, 1, 4):
        shutil.copy(reference / "samples" / f"{k:05d}.png", out / "samples")
    kept = {k: os.stat(out / "samples" / f"{k:05d}.png").st_mtime_ns for k in (0, 1, 4)}
    data = (reference / "samples" / "00002.png").read_bytes()
    (out / "samples" / "00002.png").write_bytes(data[: len(data) // 2])  # cut short
    time.sleep(0.05)
    r = torchrun(2, *args, "--outdir", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert "(3 already there, skipped)" in r.stdout
    assert_same(reference, out)
    for k, mtime in kept.items():  # valid images were not redone
        assert os.stat(out / "samples" / f"{k:05d}.png").st_mtime_ns == mtime


@pytest.mark.slow
def test_interrupted_run_resumed_ends_identical(job, reference, tmp_path):
    d, args = job
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "ldm.cli", *args, "--outdir", str(out), "--resume"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "samples" / "00001.png").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    n_done = len(list((out / "samples").glob("*.png")))
    assert proc.returncode in (0, 130), err
    r = single(*args, "--outdir", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    if proc.returncode == 130:  # interrupted before the end: the resumed run skipped what was there
        assert f"({n_done} already there, skipped)" in r.stdout
    assert_same(reference / "samples", out / "samples")
    # the interrupted run wrote the grid of what it had finished; the resumed run's grid is the whole job's
    full_grid = max(out.glob("grid-*.png"))
    assert np.array_equal(contents(reference)[0]["grid-0000.png"], contents(out)[0][full_grid.name])


def fail_rank1_script(folder):
    """A script that runs the command line, with every batch of rank 1 failing."""
    wrapper = folder / "fail_rank1.py"
    wrapper.write_text(
        "import os, sys\n"
        "from ldm import pipeline\n"
        "if os.environ['RANK'] == '1':\n"
        "    def boom(self, *a, **k):\n"
        "        raise ValueError('simulated failure on rank 1')\n"
        "    pipeline.Txt2Img.generate_batch = boom\n"
        "from ldm.cli import main\n"
        "sys.exit(main())\n"
    )
    return wrapper


@pytest.mark.slow
def test_failing_rank_fails_the_job_quickly(job, tmp_path):
    d, args = job
    wrapper = fail_rank1_script(tmp_path)
    t0 = time.time()
    r = torchrun(2, *args, "--outdir", str(tmp_path / "out"), script=(str(wrapper),), timeout=180)
    assert r.returncode != 0
    assert time.time() - t0 < 170
    assert "txt2img: error (rank 1): simulated failure on rank 1" in r.stderr


def test_failing_rank_ends_every_rank_under_a_plain_launcher(job, tmp_path):
    """Two processes started directly (as a launcher other than torchrun does: nobody kills the
    others when one fails): rank 1 fails at its first batch; rank 0 learns it at the status
    collective after its own batch and stops with that rank's error, instead of waiting."""
    import socket

    d, args = job
    wrapper = fail_rank1_script(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        e = dict(env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                 LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, str(wrapper), *args, "--outdir", str(tmp_path / "out")],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=REPO))
    errs = [p.communicate(timeout=170)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], errs
    assert "txt2img: error (rank 1): simulated failure on rank 1" in errs[1]
    assert "txt2img: error (rank 0): rank 1 failed: simulated failure on rank 1" in errs[0]
    assert not (tmp_path / "out" / "grid-0000.png").exists()  # no grid of a failed job


def test_closing_the_world_frees_the_process_group_and_its_threads():
    """A library imported after the group starts (the model's, while loading) must not keep it alive: its
    gloo threads then outlive destroy_process_group into the interpreter's exit, where one freeing a finished
    gather's tensors aborted a rank after all its images were written (SIGABRT, about 1 run in 50 on a busy
    machine). torch.distributed.nn is such a library: its functions' default `group=group.WORLD`."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = """
import os, torch
from ldm.distributed import world_from_env
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
world = world_from_env("cpu")
running = threads()
import torch.distributed.nn.functional as fn  # as a library imported while loading would
assert world.gather({"rank": world.rank}) == [{"rank": 0}]
world.close()
print(before, running, threads(), fn.broadcast.__defaults__[-1] is None)
"""
    e = dict(env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=e, cwd=REPO)
    assert r.returncode == 0, r.stderr
    before, running, after, default_is_none = r.stdout.split()
    assert int(running) > int(before)  # the group's threads
    assert int(after) == int(before) and default_is_none == "True"
