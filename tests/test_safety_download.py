"""First run without the safety checker in the cache: downloaded once, from a fake hub on 127.0.0.1.

A local HTTP server (started here, bound to 127.0.0.1, stopped at the end) serves a tiny random
StableDiffusionSafetyChecker as `CompVis/stable-diffusion-safety-checker` the way the hub serves a
file (`/{repo}/resolve/{revision}/{file}`, with the commit and ETag headers huggingface_hub needs).
huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when imported, so each run is a subprocess of
the command line with its environment set. The real hub is never contacted.
"""

import hashlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import write_tiny_model
from ldm.safety import HUB_ID

REPO = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_checker_files(folder):
    """{file name: bytes} of a tiny random checker that flags every image (concept thresholds below -1)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    from ldm.safety import _image_processor_class, _quiet_hf

    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=tower, vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0)
        checker.special_care_embeds_weights.fill_(-10.0)
    with _quiet_hf():
        checker.save_pretrained(folder)
        _image_processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
    assert {"config.json", "preprocessor_config.json", "model.safetensors"} <= set(files)
    return files


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.requests = []  # (method, path)


class _Handler(BaseHTTPRequestHandler):
    def _answer(self, body: bool):
        self.server.requests.append((self.command, self.path))
        prefix = f"/{HUB_ID}/resolve/main/"
        name = self.path[len(prefix):] if self.path.startswith(prefix) else None
        data = self.server.files.get(name)
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if name else "RepoNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = FakeHub(fake_checker_files(tmp_path_factory.mktemp("checker")))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def run_cli(tiny, outdir, endpoint, hf_home, offline=False, bars=False):
    config, ckpt = tiny
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGINGFACE_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_ENDPOINT=endpoint, HF_HOME=str(hf_home),
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if bars:  # huggingface_hub draws its bars on a terminal only; this is its switch to draw them into a pipe
        env["TQDM_POSITION"] = "-1"
    args = ["--config", str(config), "--ckpt", str(ckpt), "--H", "64", "--W", "64", "--ddim_steps", "1",
            "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--outdir", str(outdir)]
    return subprocess.run([sys.executable, "-m", "ldm.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)


def endpoint(server):
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.slow  # two whole CLI processes with transformers (12 s); the fast tier loads the checker in tests/test_cli.py
def test_first_run_downloads_the_checker_once_then_uses_the_cache(hub, tiny, tmp_path):
    hf_home = tmp_path / "hf"
    hub.requests.clear()
    r = run_cli(tiny, tmp_path / "first", endpoint(hub), hf_home, bars=True)
    assert r.returncode == 0, r.stderr
    notices = [line for line in r.stderr.splitlines() if "downloading it once" in line]
    assert len(notices) == 1 and notices[0].startswith(f"txt2img: the safety checker {HUB_ID} is not in the")
    assert "model.safetensors" in r.stderr and "100%" in r.stderr  # the progress bar of the weights
    fetched = sorted(path.rsplit("/", 1)[-1] for method, path in hub.requests if method == "GET")
    assert fetched == ["config.json", "model.safetensors", "preprocessor_config.json"]
    snapshot = hf_home / "hub" / ("models--" + HUB_ID.replace("/", "--")) / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").read_bytes() == hub.files["model.safetensors"]
    # The downloaded checker is the one in use: it flags everything, so the sample is written black.
    sample = tmp_path / "first" / "samples" / "00000.png"
    assert "flagged by the safety checker" in r.stdout and not np.asarray(Image.open(sample)).any()

    hub.requests.clear()
    r = run_cli(tiny, tmp_path / "second", endpoint(hub), hf_home)
    assert r.returncode == 0, r.stderr
    assert "downloading" not in r.stderr and hub.requests == []  # from the cache, without asking the hub
    assert "flagged by the safety checker" in r.stdout


@pytest.mark.slow
def test_offline_or_unreachable_hub_keeps_the_clear_message(hub, tiny, tmp_path):
    hub.requests.clear()
    r = run_cli(tiny, tmp_path / "offline", endpoint(hub), tmp_path / "hf1", offline=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("txt2img: error: cannot load the safety checker: it is not in the local Hugging Face "
                               f"cache ({HUB_ID}); download {HUB_ID} once")
    assert hub.requests == []

    import socket

    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = run_cli(tiny, tmp_path / "unreachable", closed, tmp_path / "hf2")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("txt2img: error: cannot load the safety checker: it is not in the local Hugging Face "
                               f"cache ({HUB_ID}) and the hub could not be reached")
    assert "--no_safety_checker" in r.stderr
    assert not (tmp_path / "unreachable" / "samples").exists() or not list((tmp_path / "unreachable" / "samples").iterdir())
