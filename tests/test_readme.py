"""The README's first command (install, then generate with the bundled demo model) works as written."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def readme_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```sh\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_install_generate_and_test_commands():
    generate, test = readme_commands()[:2]
    assert generate.startswith("pip install torch==2.13.0 && pip install -e . && txt2img --demo")
    assert test.endswith("python -m pytest -q tests")
    ci = (REPO / ".ci" / "run").read_text()
    assert "python3 -m pytest -q tests" in ci and "torch==2.13.0" in ci


@pytest.mark.slow  # a whole process of the console script; the fast tier runs the same CLI in process
def test_readme_generate_command_runs(tmp_path):
    """The generation part of the first command, run from an empty folder (CI has installed the package)."""
    generate = readme_commands()[0].split("&&")[-1].strip()
    argv = shlex.split(generate)
    assert argv[0] == "txt2img"
    exe = shutil.which("txt2img")
    cmd = [exe, *argv[1:]] if exe else [sys.executable, str(REPO / "scripts" / "txt2img.py"), *argv[1:]]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "not needed for the bundled demo model" in r.stderr
    samples = sorted((tmp_path / "outputs" / "txt2img-samples" / "samples").glob("*.png"))
    assert [p.name for p in samples] == [f"{k:05d}.png" for k in range(6)]  # 3 samples x 2 iterations
    with Image.open(samples[0]) as img:
        assert img.size == (64, 64)
        assert "Seed: 42," in img.info["parameters"]
    assert (tmp_path / "outputs" / "txt2img-samples" / "grid-0000.png").is_file()
