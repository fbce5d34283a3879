"""Textual-inversion embeddings and clip skip: file formats, tokens in 75-token chunks, parity with diffusers."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import randomize_, rel_err, tiny_config
from ldm.checkpoint import build_model
from ldm.embeddings import EmbeddingError, EmbeddingLibrary, read_embedding
from ldm.models.tokenizer import BOS, EOS, CLIPTokenizer, build_vocab, read_bpe_merges
from ldm.prompt import tokenize_weighted

TOL = 1e-4
VOCAB = 49408


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_bpe_file()


def _write_embeddings(folder, width=64):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    vectors = {
        "mychar": torch.randn(3, width, generator=g),
        "bad-hands": torch.randn(2, width, generator=g),
        "style": torch.randn(1, width, generator=g),
    }
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors["mychar"]}, "name": "mychar",
                "step": 3000, "sd_checkpoint": "abc", "sd_checkpoint_name": "v1"}, folder / "mychar.pt")
    save_file({"emb_params": vectors["bad-hands"]}, str(folder / "bad-hands.safetensors"))
    save_file({"clip_l": vectors["style"], "clip_g": torch.randn(1, 1280, generator=g)},
              str(folder / "style.safetensors"))
    save_file({"emb_params": torch.randn(2, 1024, generator=g)}, str(folder / "sd2only.safetensors"))
    return vectors


def test_file_formats(tmp_path):
    vectors = _write_embeddings(tmp_path, width=768)
    assert torch.equal(read_embedding(tmp_path / "mychar.pt")[""], vectors["mychar"])
    assert torch.equal(read_embedding(tmp_path / "bad-hands.safetensors")[""], vectors["bad-hands"])
    assert set(read_embedding(tmp_path / "style.safetensors")) == {"clip_l", "clip_g"}
    torch.save({"<tok>": torch.ones(768)}, tmp_path / "diffusers.bin")
    assert read_embedding(tmp_path / "diffusers.bin")[""].shape == (1, 768)

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"string_to_param": {"*": torch.ones(1, 768)}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(EmbeddingError, match="refusing"):
        read_embedding(tmp_path / "evil.pt")


def test_placeholders_count_in_chunks(tmp_path, tokenizer):
    _write_embeddings(tmp_path)
    lib = EmbeddingLibrary(tmp_path, width=64, vocab_size=VOCAB)
    tok = lib.tokenizer(tokenizer)
    ids = tok.encode("a photo of MyChar, (bad-hands:1.2) and sd2only")
    plain = tokenizer.encode("a photo of")
    assert ids[: len(plain)] == plain
    first, n = lib.load("mychar")
    assert n == 3 and ids[len(plain): len(plain) + 3] == [first, first + 1, first + 2]
    assert ids[-len(tokenizer.encode("and sd2only")):] == tokenizer.encode("and sd2only")  # wrong width: text
    assert lib.vectors.shape == (3 + 2, 64)
    assert lib.names_in("mychar bad-hands sd2only xmychar") == ["mychar", "bad-hands"]
    # 73 words of one token + a 3-vector embedding: 76 tokens, two chunks; as in the web UI the embedding is
    # not cut (it moves whole to the second chunk), and the weight of its emphasis applies to its vectors
    text = " ".join(["cat"] * 73) + " (mychar:1.5)"
    chunks = tokenize_weighted(text, tok)
    assert chunks.n_tokens == 76 and chunks.n_chunks == 2
    assert chunks.ids[0, 1:75].tolist() == tokenizer.encode("cat") * 73 + [tokenizer.eos_token_id]
    assert chunks.ids[1, 1:4].tolist() == [first, first + 1, first + 2]
    assert chunks.weights[1, 1:4].tolist() == pytest.approx([1.5] * 3)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    merges = read_bpe_merges()
    (folder / "vocab.json").write_text(json.dumps(build_vocab(merges)), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2"] + [" ".join(p) for p in merges]) + "\n",
                                       encoding="utf-8")
    special = {"lstrip": False, "rstrip": False, "normalized": True, "single_word": False, "special": True}
    config = {"tokenizer_class": "CLIPTokenizer", "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
              "unk_token": EOS, "model_max_length": 77,
              "added_tokens_decoder": {"49406": {"content": BOS, **special}, "49407": {"content": EOS, **special}}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def tiny_pair():
    from test_model_parity import _reference_models

    model = randomize_(build_model(tiny_config(), "cpu"), seed=2).eval()
    _, _, clip = _reference_models(tiny_config(), model.state_dict())
    return model, clip


def test_parity_with_diffusers_load_textual_inversion(tmp_path, tokenizer, hf_tokenizer, tiny_pair):
    from diffusers import StableDiffusionPipeline

    model, clip = tiny_pair
    clip = copy.deepcopy(clip)
    _write_embeddings(tmp_path)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=clip, tokenizer=copy.deepcopy(hf_tokenizer), unet=None,
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    # the same order as ours loads them (first seen in the prompt): the same new token ids
    pipe.load_textual_inversion(str(tmp_path / "mychar.pt"), token="mychar")
    pipe.load_textual_inversion(str(tmp_path / "bad-hands.safetensors"), token="bad-hands")
    prompt = "a photo of mychar with bad-hands, oil painting"
    hf_ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
    lib = EmbeddingLibrary(tmp_path, width=64, vocab_size=VOCAB)
    chunks = tokenize_weighted(prompt, lib.tokenizer(tokenizer))
    assert chunks.ids.tolist() == hf_ids.tolist()
    with torch.no_grad():
        ours = model.cond_stage_model.encode_ids(chunks.ids, vectors=lib.vectors)
        ref = pipe.text_encoder(input_ids=hf_ids).last_hidden_state
    assert rel_err(ours, ref) < TOL
    # the table was not touched
    assert model.cond_stage_model.transformer.text_model.embeddings.token_embedding.num_embeddings == VOCAB


def test_clip_skip_parity_with_diffusers(hf_tokenizer, tiny_pair):
    """web UI clip skip N = diffusers' clip_skip N - 1: hidden_states[-(clip_skip + 1)], then the final layer norm.

    diffusers' `encode_prompt` computes exactly that but reaches `text_encoder.text_model.final_layer_norm`,
    which transformers 5 renamed; on such a version its formula is applied here to transformers' model."""
    from diffusers import StableDiffusionPipeline

    model, clip = tiny_pair
    pipe = StableDiffusionPipeline(vae=None, text_encoder=clip, tokenizer=hf_tokenizer, unet=None, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    prompt = "a red fox in the snow"
    ids = hf_tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        for webui in (1, 2):
            diffusers_skip = webui - 1 or None
            if hasattr(clip, "text_model"):
                ref, _ = pipe.encode_prompt(prompt, "cpu", 1, False, clip_skip=diffusers_skip)
            else:
                out = clip(input_ids=ids, output_hidden_states=True)
                ref = out.last_hidden_state if diffusers_skip is None else \
                    clip.final_layer_norm(out.hidden_states[-(diffusers_skip + 1)])
            assert rel_err(model.cond_stage_model.encode_ids(ids, clip_skip=webui), ref) < TOL
        assert rel_err(model.cond_stage_model.encode_ids(ids, clip_skip=2), model.cond_stage_model.encode_ids(ids)) > 1e-3
        with pytest.raises(ValueError, match="between 1 and 2"):
            model.cond_stage_model.encode_ids(ids, clip_skip=3)


def test_clip_skip_range_per_family():
    from test_sd2 import tiny_v2_config

    from ldm.networks import clip_skip_error

    v1 = build_model(tiny_config(), "meta")
    v2 = build_model(tiny_v2_config(), "meta")
    assert clip_skip_error(v1, 2) is None and clip_skip_error(v2, 1) is None and clip_skip_error(v2, 2) is None
    assert "has 2 layers" in clip_skip_error(v1, 3)
    assert "SD 2.x fixes its text layer" in clip_skip_error(v2, 3)
    assert "positive integer" in clip_skip_error(None, 0)
