"""CLIP tokenizer: golden ids, framing, and parity with transformers' CLIPTokenizer (offline)."""

import shutil
import json
import socket

import pytest
import torch

from ldm.models.tokenizer import (
    BOS,
    EOS,
    VOCAB_SIZE,
    CLIPTokenizer,
    HuggingFaceTokenizer,
    build_vocab,
    bytes_to_unicode,
    load_tokenizer,
    read_bpe_merges,
)

PUPPY_IDS = [49406, 320, 1674, 539, 320, 6829, 49407]

PROMPTS = [
    "A picture of a puppy",
    "a photograph of an astronaut riding a horse",
    "A PAINTING OF A FOX IN THE STYLE OF STARRY NIGHT",
    "it's a dog's life, isn't it? I'm sure they'll say we'd've",
    "Hello, world!!! What?! ... -- ;; ~~",
    "masterpiece, best quality, 1girl, solo, blunt_bangs, white_hair",
    "(masterpiece:1.2), ((best quality)), [blurry], {{{solo}}}, \\(escaped\\)",
    "a   lot    of     spaces\tand\ttabs\nand\nnewlines",
    "   leading and trailing whitespace   ",
    "numbers 1234567890 and 3.14159 and 1e-10 and 50%",
    "4k, 8k uhd, 16:9, f/1.8, 35mm, iso 100",
    "café crème brûlée, naïve façade, Ångström, Zürich",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Emoji 🐶🐱 and symbols ♥ ★ © ® ™ € £ ¥",
    "ΟΔΟΣ ΣΟΦΙΑ and Straße, ﬁne ligatures",
    "email@example.com https://example.com/path?q=1&x=y#frag",
    "a_b_c __init__ snake_case_words CamelCaseWords",
    "quotes \"double\" 'single' `back` «guillemets» “curly”",
    "brackets <angle> [square] {curly} (round) |pipes|",
    "a<|endoftext|>b <|startoftext|> c",
    "<|ENDOFTEXT|> mixed case special token",
    "hyphenated-words, well-known, state-of-the-art",
    "trending on artstation, unreal engine, octane render, 8k",
    "O'Neil's rock'n'roll, y'all, 'quoted'",
    "ALL CAPS SHOUTING WITH NUMBERS 2024",
    "x" * 60,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "math: a+b=c, x^2 <= y, 10/3 ≈ 3.33, ∑ ∫ √",
    "",
    "   ",
]


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_bpe_file()


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    """vocab.json, merges.txt and tokenizer_config.json of CLIP, written from our shipped BPE file.

    The config marks the special tokens as normalised, like the one of openai/clip-vit-large-patch14.
    """
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    merges = read_bpe_merges()
    (folder / "vocab.json").write_text(json.dumps(build_vocab(merges)), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(pair) for pair in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"lstrip": False, "rstrip": False, "normalized": True, "single_word": False, "special": True}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "added_tokens_decoder": {"49406": {"content": BOS, **special}, "49407": {"content": EOS, **special}},
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "model_max_length": 77,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(hf_files):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(hf_files), local_files_only=True)


def test_vocabulary_layout(tokenizer):
    vocab = tokenizer.vocab
    assert len(vocab) == VOCAB_SIZE == 49408
    assert vocab["!"] == 0 and vocab["a"] == 64 and vocab["a</w>"] == 320
    assert vocab["in"] == 512  # the first merge, "i n"
    assert vocab[BOS] == 49406 and vocab[EOS] == 49407
    assert len(set(bytes_to_unicode().values())) == 256


def test_puppy_ids(tokenizer):
    ids = tokenizer("A picture of a puppy")
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == PUPPY_IDS
    assert (ids[0, 7:] == 49407).all()
    assert tokenizer.encode("A picture of a puppy") == PUPPY_IDS[1:-1]
    assert tokenizer.decode(ids[0, :7]) == "<|startoftext|>a picture of a puppy <|endoftext|>"
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "a picture of a puppy"


def test_truncation_keeps_eos_last(tokenizer):
    prompt = " ".join(["puppy"] * 100)
    assert len(tokenizer.encode(prompt)) == 100
    ids = tokenizer([prompt, "a cat"])
    assert ids.shape == (2, 77)
    assert ids[0].tolist() == [49406] + [6829] * 75 + [49407]
    assert ids[1, :4].tolist() == [49406, 320, 2368, 49407]
    assert (ids[1, 4:] == tokenizer.pad_token_id).all()


def test_other_max_length(tokenizer):
    ids = tokenizer("a picture of a puppy", max_length=5)
    assert ids.tolist() == [[49406, 320, 1674, 539, 49407]]
    assert tokenizer("", max_length=4).tolist() == [[49406, 49407, 49407, 49407]]


def test_parity_with_transformers(tokenizer, hf_tokenizer):
    for prompt in PROMPTS:
        expected = hf_tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        assert tokenizer.encode(prompt) == hf_tokenizer.encode(prompt, add_special_tokens=False), prompt
        assert torch.equal(tokenizer(prompt), expected.input_ids), prompt
        ids = tokenizer.encode(prompt)
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids), prompt


def test_load_tokenizer_adapter_matches_ours(tokenizer, hf_files, hf_tokenizer):
    adapter = load_tokenizer(str(hf_files))
    assert isinstance(adapter, HuggingFaceTokenizer)
    assert load_tokenizer(str(hf_files)) is adapter  # cached
    assert (adapter.bos_token_id, adapter.eos_token_id, adapter.pad_token_id) == (49406, 49407, 49407)
    assert torch.equal(adapter(PROMPTS[:5]), tokenizer(PROMPTS[:5]))
    assert adapter.decode(PUPPY_IDS, skip_special_tokens=True) == "a picture of a puppy"


def test_loading_never_opens_a_connection(monkeypatch, hf_files):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    load_tokenizer.cache_clear()
    try:
        assert load_tokenizer()("A picture of a puppy")[0, :7].tolist() == PUPPY_IDS
        assert isinstance(load_tokenizer("no-such-owner/no-such-tokenizer"), CLIPTokenizer)
        assert isinstance(load_tokenizer(str(hf_files)), HuggingFaceTokenizer)
    finally:
        load_tokenizer.cache_clear()


def test_tokenizer_found_in_the_hugging_face_hub_cache(monkeypatch, tmp_path, hf_files):
    """A copy of openai/clip-vit-large-patch14 in the hub cache layout is preferred to the shipped file."""
    snapshot = tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "0123abcd"
    shutil.copytree(hf_files, snapshot)
    (tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "refs").mkdir()
    (tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_tokenizer.cache_clear()
    try:
        tok = load_tokenizer()
        assert isinstance(tok, HuggingFaceTokenizer)
        assert tok("A picture of a puppy")[0, :7].tolist() == PUPPY_IDS
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
        load_tokenizer.cache_clear()
        assert isinstance(load_tokenizer(), CLIPTokenizer)
    finally:
        load_tokenizer.cache_clear()
