"""Prompt emphasis, 75-token chunking and weighted encoding."""

import pytest
import torch

from ldm.models.tokenizer import CLIPTokenizer
from ldm.prompt import (
    PromptChunks,
    chunk_bounds,
    encode_weighted,
    pad_chunks,
    parse_emphasis,
    tokenize_weighted,
)

BOS, EOS = 49406, 49407
NOVELAI_PROMPT = (
    "{{alice}}, alice in wonderland, {{{solo}}},1girl,{{delicate face}},blunt_bangs,{floating hair}, "
    "white hair bow, {forest}, flowering hedge, {{absurdres}}, {best quality},{masterpiece}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_bpe_file()


def weights_of(pieces):
    return [(text, pytest.approx(weight)) for text, weight in pieces]


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a", [("a", 1.0)]),
        ("(a)", [("a", 1.1)]),
        ("[a]", [("a", 1 / 1.1)]),
        ("(a:1.3)", [("a", 1.3)]),
        ("(a: 0.5 )", [("a", 0.5)]),
        ("(a:.75)", [("a", 0.75)]),
        ("{a}", [("a", 1.05)]),
        ("((a))", [("a", 1.21)]),
        ("{{{solo}}}", [("solo", 1.05**3)]),
        ("[[a]]", [("a", 1 / 1.21)]),
        ("((a:1.5))", [("a", 1.65)]),
        ("[(a:1.5)]", [("a", 1.5 / 1.1)]),
        ("a (b) c", [("a ", 1.0), ("b", 1.1), (" c", 1.0)]),
        ("(a (b) c)", [("a ", 1.1), ("b", 1.21), (" c", 1.1)]),
        ("(a)(b)", [("ab", 1.1)]),
        ("(a)[b]{c}", [("a", 1.1), ("b", 1 / 1.1), ("c", 1.05)]),
        ("(a:x)", [("a:x", 1.1)]),
        ("a:1.3)", [("a:1.3)", 1.0)]),
        (r"\(a\) \[b\] \{c\}", [("(a) [b] {c}", 1.0)]),
        (r"(a \(b\))", [("a (b)", 1.1)]),
        (r"a\\(b)", [("a\\", 1.0), ("b", 1.1)]),
        (r"a\b", [("a\\b", 1.0)]),
        ("(a b", [("a b", 1.1)]),
        ("a ((b", [("a ", 1.0), ("b", 1.21)]),
        ("((a) b", [("a", 1.21), (" b", 1.1)]),
        ("[a (b", [("a ", 1 / 1.1), ("b", 1.0)]),
        ("a) b] c}", [("a) b] c}", 1.0)]),
        ("(a] b)", [("a] b", 1.1)]),
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
    ],
)
def test_parse_emphasis(prompt, expected):
    assert parse_emphasis(prompt) == weights_of(expected)


def test_parse_emphasis_disabled():
    assert parse_emphasis("((a)), [b], (c:1.5)", enabled=False) == [("((a)), [b], (c:1.5)", 1.0)]


def test_novelai_prompt(tokenizer):
    chunks = tokenize_weighted(NOVELAI_PROMPT, tokenizer)
    assert chunks.ids.shape == chunks.weights.shape == (1, 77)
    ids, weights = chunks.ids[0].tolist(), chunks.weights[0].tolist()
    assert ids[0] == BOS and ids[chunks.n_tokens + 1] == EOS

    def weights_at(word):
        (token,) = tokenizer.encode(word)
        return [w for i, w in zip(ids, weights) if i == token]

    assert weights_at("alice") == pytest.approx([1.05**2, 1.0])  # {{alice}}, then plain alice
    assert weights_at("solo") == pytest.approx([1.05**3])
    assert weights_at("face") == pytest.approx([1.05**2])
    assert weights_at("forest") == pytest.approx([1.05])
    assert weights_at("masterpiece") == pytest.approx([1.05])
    assert weights_at("wonderland") == [1.0]
    assert weights_at("bow") == [1.0]
    assert weights_at("girl") == [1.0]
    assert tokenizer.decode(ids[: chunks.n_tokens + 2], skip_special_tokens=True).startswith(
        "alice , alice in wonderland , solo , 1 girl , delicate face , blunt _ bangs , floating hair"
    )


def test_plain_prompt_matches_the_tokenizer(tokenizer):
    prompt = "A picture of a puppy, trending on artstation"
    chunks = tokenize_weighted(prompt, tokenizer)
    assert torch.equal(chunks.ids, tokenizer(prompt))
    assert torch.equal(chunks.weights, torch.ones(1, 77))
    assert chunks.n_tokens == len(tokenizer.encode(prompt)) == 10  # "artstation" is two tokens


def test_emphasis_off_keeps_brackets_as_tokens(tokenizer):
    chunks = tokenize_weighted("(puppy:1.5)", tokenizer, emphasis=False)
    assert torch.equal(chunks.ids, tokenizer("(puppy:1.5)"))
    assert (chunks.weights == 1.0).all()
    assert tokenize_weighted("(puppy:1.5)", tokenizer).ids[0, :3].tolist() == [BOS, 6829, EOS]


def test_empty_prompt_is_one_chunk(tokenizer):
    chunks = tokenize_weighted("", tokenizer)
    assert chunks.n_tokens == 0 and chunks.n_chunks == 1
    assert chunks.ids.tolist() == [[BOS] + [EOS] * 76]
    assert torch.equal(chunks.weights, torch.ones(1, 77))


def test_long_prompt_splits_into_three_chunks(tokenizer):
    prompt = " ".join(["a cat on a mat"] * 40)  # 200 words, one token each, no commas
    chunks = tokenize_weighted(prompt, tokenizer)
    assert chunks.n_tokens == 200
    assert chunks.ids.shape == chunks.weights.shape == (3, 77)
    assert chunks.ids[:, 0].tolist() == [BOS] * 3
    assert chunks.ids[:2, 76].tolist() == [EOS, EOS]
    assert chunks.ids[2, 51:].tolist() == [EOS] * 26  # 50 tokens, eos, padding
    words = tokenizer.encode(prompt)
    assert chunks.ids[:, 1:76].flatten()[:200].tolist() == words
    assert torch.equal(chunks.weights, torch.ones(3, 77))


def test_chunks_break_after_a_late_comma():
    comma, word = 267, 2368
    late = [word] * 60 + [comma] + [word] * 30  # comma at index 60, among the last 20 of 75
    assert chunk_bounds(late, comma) == [(0, 61), (61, 91)]
    early = [word] * 40 + [comma] + [word] * 50  # comma at index 40: cut at 75 as usual
    assert chunk_bounds(early, comma) == [(0, 75), (75, 91)]
    assert chunk_bounds([word] * 75, comma) == [(0, 75)]
    assert chunk_bounds([word] * 150 + [comma], comma) == [(0, 75), (75, 150), (150, 151)]
    assert chunk_bounds([], comma) == [(0, 0)]


def test_weights_survive_chunking(tokenizer):
    prompt = ", ".join(["cat"] * 40) + ", (dog:1.5)"  # 80 tokens before the dog
    chunks = tokenize_weighted(prompt, tokenizer)
    assert chunks.n_chunks == 2
    dog = tokenizer.encode("dog")[0]
    assert chunks.weights[chunks.ids == dog].tolist() == [1.5]
    assert chunks.ids[0, 74:].tolist() == [267, EOS, EOS]  # 74 tokens, the last a comma


def fake_encode(ids):
    """A deterministic stand-in for the text encoder: (n, 77) -> (n, 77, 8), mean well away from 0."""
    position = torch.arange(ids.shape[1], dtype=torch.float32)[:, None]
    channel = torch.arange(8, dtype=torch.float32)
    return 2.0 + torch.sin(ids[..., None].float() * 0.37 + channel) + 0.01 * position


def test_unit_weights_give_the_plain_encoding(tokenizer):
    chunks = tokenize_weighted("a photograph of an astronaut riding a horse", tokenizer)
    assert torch.equal(encode_weighted(chunks, fake_encode), fake_encode(chunks.ids))

    long_chunks = tokenize_weighted(" ".join(["a cat on a mat"] * 40), tokenizer)
    encoded = encode_weighted(long_chunks, fake_encode)
    assert encoded.shape == (1, 3 * 77, 8)
    assert torch.equal(encoded, torch.cat([fake_encode(long_chunks.ids[i : i + 1]) for i in range(3)], dim=1))


def test_weighted_token_is_scaled_and_mean_is_kept(tokenizer):
    chunks = tokenize_weighted("a (puppy:1.5) on grass", tokenizer)
    plain = fake_encode(chunks.ids)
    weights = torch.ones(1, 77)
    weights[0, 2] = 1.5  # bos, a, puppy
    assert torch.equal(chunks.weights, weights)

    encoded = encode_weighted(chunks, fake_encode)
    scale = plain.mean() / (plain * weights[..., None]).mean()
    total, puppy = plain.sum().item(), plain[0, 2].sum().item()
    assert scale.item() == pytest.approx(total / (total + 0.5 * puppy))
    assert encoded.mean().item() == pytest.approx(plain.mean().item(), rel=1e-6)
    torch.testing.assert_close(encoded[0, 2], plain[0, 2] * 1.5 * scale)
    torch.testing.assert_close(encoded[0, [0, 1, 3, 4, 5]], plain[0, [0, 1, 3, 4, 5]] * scale)


def test_mean_is_kept_over_all_chunks(tokenizer):
    chunks = tokenize_weighted(" ".join(["a cat on a mat"] * 20) + " (dog:2)", tokenizer)
    assert chunks.n_chunks == 2
    plain = fake_encode(chunks.ids)
    encoded = encode_weighted(chunks, fake_encode)
    assert encoded.mean().item() == pytest.approx(plain.mean().item(), rel=1e-6)
    assert encoded[0, :77].mean().item() != pytest.approx(plain[0].mean().item(), rel=1e-6)


def test_pad_chunks_equalises_lengths(tokenizer):
    long = tokenize_weighted(" ".join(["a cat on a mat"] * 40), tokenizer)
    empty = tokenize_weighted("", tokenizer)
    padded_empty, padded_long = pad_chunks(empty, long, tokenizer)
    assert padded_long.ids.shape == padded_empty.ids.shape == (3, 77)
    assert torch.equal(padded_long.ids, long.ids) and torch.equal(padded_long.weights, long.weights)
    assert padded_empty.ids.tolist() == [[BOS] + [EOS] * 76] * 3
    assert torch.equal(padded_empty.weights, torch.ones(3, 77))
    assert (padded_empty.n_tokens, padded_long.n_tokens) == (0, 200)

    short = tokenize_weighted("(a puppy)", tokenizer)
    a, b = pad_chunks(short, short, tokenizer)
    assert torch.equal(a.ids, short.ids) and isinstance(b, PromptChunks) and b.n_chunks == 1
    batch = torch.cat([encode_weighted(padded_empty, fake_encode), encode_weighted(padded_long, fake_encode)])
    assert batch.shape == (2, 231, 8)
