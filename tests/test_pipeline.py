"""Txt2Img as a library: it leaves the caller's model alone, and its prompt caches stay small."""

import json
import sys

import pytest
import torch

from helpers import randomize_, tiny_config
from ldm.checkpoint import build_model
from ldm.pipeline import Txt2Img


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(build_model(tiny_config(), "cpu"), seed=3).eval().requires_grad_(False)


def test_a_model_of_another_dtype_is_refused_and_left_as_it_was(model):
    half = build_model(tiny_config(), "cpu").half()
    with pytest.raises(ValueError, match="load it with Txt2Img.from_files"):
        Txt2Img(half, "cpu", "full")
    assert next(half.model.parameters()).dtype == torch.float16  # not cast in place
    pipe = Txt2Img(model, "cpu", "full")
    assert pipe.model is model and next(model.parameters()).dtype == torch.float32


def test_prompt_caches_keep_only_the_recent_prompts(model):
    pipe = Txt2Img(model, "cpu", "full")
    pipe._chunks.size = pipe._embeddings.size = 4
    first = pipe.conditioning("prompt 0")[0]
    for i in range(1, 10):
        pipe.conditioning(f"prompt {i}")
    assert len(pipe._chunks) <= 4 and len(pipe._embeddings) <= 4
    assert ("prompt 9", True) in pipe._chunks and ("prompt 0", True) not in pipe._chunks
    again = pipe.conditioning("prompt 0")[0]  # made again, the same values
    assert again is not first and torch.equal(again, first)


_HEAP_PROBE = """
import ctypes, json, sys
from ldm.backends.memory import set_heap_defaults
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
def mapped(mb):  # 1 when a block of `mb` MB is a mapping of its own, 0 when it comes from the heap
    before = libc.mallinfo2().hblks
    block = libc.malloc(mb << 20)
    during = libc.mallinfo2().hblks
    libc.free(ctypes.c_void_p(block))
    return during - before
first = mapped(24)  # also raises glibc's own threshold to 24 MB
applied = set_heap_defaults()
print(json.dumps([first, applied, mapped(28), mapped(40)]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
@pytest.mark.parametrize("env, expect", [({}, [1, True, 0, 1]), ({"MALLOC_TRIM_THRESHOLD_": "131072"}, [1, False, 1, 1])])
def test_heap_defaults_serve_blocks_up_to_32_mb_from_the_heap(env, expect):
    """From the start, not after glibc raised its threshold block by block; above 32 MB a mapping each as
    before; a user's own MALLOC_* setting is left alone."""
    import ctypes
    import os
    import subprocess

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc 2.33 or later")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    r = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, timeout=120,
                       env={**clean, "PYTHONPATH": repo, **env})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == expect


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page maps")
def test_weights_a_phase_does_not_read_leave_the_resident_set(tmp_path, monkeypatch):
    """A model used in place from its mapped checkpoint: the text encoder's pages are let go once the prompts
    are encoded (none resident at any sampling step), the UNet's once sampling ends (none after the run: the
    decode reads the autoencoder only). The weights keep the file's values, read back when next used, and
    the images are the same bits as those of a run that keeps every page."""
    import numpy as np

    from helpers import resident_pages, write_tiny_model
    from ldm.checkpoint import read_state_dict

    config, ckpt = write_tiny_model(tmp_path)
    pipe = Txt2Img.from_files(config, ckpt, device="cpu", precision="full", hash_model=False)
    text = pipe.model.cond_stage_model.transformer.text_model.encoder.layers[0].mlp.fc1.weight  # 128 x 64: 8 pages
    unet = pipe.model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].ff.net[0].proj.weight  # 256 x 32
    file = read_state_dict(ckpt)
    seen = []

    def step(i, x_t, x0_pred):
        seen.append((resident_pages(text), resident_pages(unet)))

    run = dict(steps=2, H=64, W=64, n_samples=1, n_iter=1, seed=3, callback=step)
    first = pipe("a red fox", **run)[0].image
    assert len(seen) == 2 and all(t[1] >= 6 and t[0] == 0 and u[0] == u[1] >= 6 for t, u in seen)
    assert resident_pages(unet)[0] == 0 and resident_pages(text)[0] == 0
    second = pipe("a red fox", **run)[0].image  # the UNet read back from the page cache; the prompt was cached
    monkeypatch.setattr("ldm.pipeline._release_idle", lambda module, what: None)
    kept = Txt2Img.from_files(config, ckpt, device="cpu", precision="full", hash_model=False)("a red fox", **run)[0]
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert np.array_equal(np.asarray(first), np.asarray(kept.image))
    assert torch.equal(unet, file["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"])
    assert torch.equal(text, file["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"])
