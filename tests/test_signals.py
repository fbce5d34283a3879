"""SIGTERM is handled as SIGINT (keep what was written, grid of those, exit 143); a second signal ends at once."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import write_tiny_model
from ldm.signals import Interrupted, exit_status, interrupts

REPO = Path(__file__).resolve().parent.parent


def test_first_signal_raises_and_handlers_are_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for signum, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        with pytest.raises(KeyboardInterrupt) as e:
            with interrupts():
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler interrupts this
        assert isinstance(e.value, Interrupted) and e.value.signum == signum
        assert exit_status(e.value) == status
    assert exit_status(KeyboardInterrupt()) == 130
    assert {s: signal.getsignal(s) for s in before} == before


# The command line's shape: the clean-up after the first signal (the grid of the finished images) runs
# inside `interrupts()`, so a second signal meets our handler whatever the parent left the signals at
# (a pytest-xdist worker, or a shell's background job, starts its children with SIGINT ignored).
SLOW_CLEANUP = """
import sys, time
from ldm.signals import interrupts
with interrupts():
    try:
        print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        print("cleaning up", flush=True)
        time.sleep(60)  # a clean-up that would take long: a second signal must cut it short
print("finished", flush=True)
"""


@pytest.mark.parametrize("first,second", [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGINT),
                                          (signal.SIGTERM, signal.SIGTERM)])
def test_second_signal_ends_at_once(first, second):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLEANUP], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(first)
        assert proc.stdout.readline() == "cleaning up\n"
        proc.send_signal(second)
        proc.wait(timeout=30)  # well before the 60 s clean-up
    finally:
        proc.kill()
    assert proc.returncode == -second  # killed by the second signal, not finished
    assert "finished" not in proc.stdout.read()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def start(tiny, outdir, wrapper=None):
    config, ckpt = tiny
    args = ["--config", str(config), "--ckpt", str(ckpt), "--H", "64", "--W", "64", "--ddim_steps", "2",
            "--n_samples", "1", "--n_iter", "200", "--outdir", str(outdir), "--no_safety_checker"]
    script = [str(wrapper)] if wrapper else ["-m", "ldm.cli"]
    return subprocess.Popen([sys.executable, *script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"), cwd=REPO)


def wait_for(path, proc, seconds=240):
    deadline = time.monotonic() + seconds
    while not (path.is_file() and path.stat().st_size > 0) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]


def saved_names(outdir):
    return sorted(p.name for p in (outdir / "samples").iterdir())


def test_sigterm_keeps_what_was_written_and_writes_the_grid(tiny, tmp_path):
    proc = start(tiny, tmp_path)
    wait_for(tmp_path / "samples" / "00001.png", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    saved = saved_names(tmp_path)
    assert 2 <= len(saved) < 200 and saved == [f"{k:05d}.png" for k in range(len(saved))]  # no partial file
    for name in saved:
        assert Image.open(tmp_path / "samples" / name).info["parameters"]
    grid = Image.open(tmp_path / "grid-0000.png")  # one image a row (n_rows = n_samples = 1)
    assert grid.size[0] == 66 + 2 and (grid.size[1] - 2) // 66 == len(saved)
    assert f"interrupted: {len(saved)} image(s) saved" in err and "Traceback" not in err


@pytest.mark.slow
def test_second_signal_during_the_grid_ends_the_run_at_once(tiny, tmp_path):
    """SIGTERM, then SIGINT while the grid is being made (made slow here): the process ends by the second
    signal without waiting, and every image written before stays whole under its final name."""
    wrapper = tmp_path / "slow_grid.py"
    wrapper.write_text(
        "import sys, time\n"
        "from ldm import images\n"
        "def slow_grid(*args, **kwargs):\n"
        "    print('making the grid', file=sys.stderr, flush=True)\n"
        "    time.sleep(120)\n"
        "images.make_grid = slow_grid\n"
        "from ldm.cli import main\n"
        "sys.exit(main())\n")
    outdir = tmp_path / "out"
    proc = start(tiny, outdir, wrapper)
    wait_for(outdir / "samples" / "00000.png", proc)
    proc.send_signal(signal.SIGTERM)
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if not line or "making the grid" in line:
            break
    assert "making the grid" in lines[-1], lines
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)  # the grid would take 120 s
    assert proc.returncode == -signal.SIGINT
    saved = saved_names(outdir)
    assert saved and saved == [f"{k:05d}.png" for k in range(len(saved))]
    for name in saved:
        assert Image.open(outdir / "samples" / name).info["parameters"]
    assert not (outdir / "grid-0000.png").exists()
