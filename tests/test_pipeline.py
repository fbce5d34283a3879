"""Txt2Img as a library: it leaves the caller's model alone, and its prompt caches stay small."""

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
