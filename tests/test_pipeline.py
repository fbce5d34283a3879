"""Txt2Img as a library: it leaves the caller's model alone, and its prompt caches stay small."""

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
