"""Prompt emphasis and prompts longer than 75 tokens, as in the AUTOMATIC1111 Stable Diffusion web UI.

Emphasis syntax (the web UI's, plus NovelAI's curly braces):

    (words)        weight x 1.1
    [words]        weight / 1.1
    {words}        weight x 1.05
    (words:1.3)    weight x 1.3

Brackets nest and their factors multiply: ``((a))`` is 1.21. ``\\(``, ``\\)``, ``\\[``, ``\\]``,
``\\{``, ``\\}`` and ``\\\\`` stand for the literal characters. Unbalanced brackets are lenient:
a bracket never closed applies its factor to the rest of the prompt, a closing bracket with
nothing open is literal text.

Long prompts: the weighted tokens are cut into chunks of 75 tokens, each framed like a plain
CLIP input (bos, tokens, eos, padding to 77) and encoded on its own; the hidden states are
scaled by the weights and concatenated along the sequence axis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

CHUNK_TOKENS = 75  # CLIP's 77 positions less bos and eos
COMMA_BACKTRACK = 20  # a chunk may end early at a comma among its last 20 tokens

_FACTORS = {"(": 1.1, "[": 1 / 1.1, "{": 1.05}
_OPENER_OF = {")": "(", "]": "[", "}": "{"}
_ESCAPABLE = "()[]{}\\"
_EXPLICIT_WEIGHT = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)")


def parse_emphasis(text: str, enabled: bool = True) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces; adjacent pieces of equal weight are merged.

    With ``enabled=False`` the whole prompt is one piece of weight 1.0, brackets included.
    """
    if not enabled:
        return [(text, 1.0)]
    pieces: list[list] = []  # [text, weight]; weights are multiplied when a bracket closes
    open_at: dict[str, list[int]] = {opener: [] for opener in _FACTORS}  # index into pieces
    literal: list[str] = []

    def flush():
        if literal:
            pieces.append(["".join(literal), 1.0])
            literal.clear()

    def close(opener: str, factor: float):
        flush()
        for piece in pieces[open_at[opener].pop() :]:
            piece[1] *= factor

    i = 0
    while i < len(text):
        char, step = text[i], 1
        explicit = _EXPLICIT_WEIGHT.match(text, i) if char == ":" and open_at["("] else None
        if char == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPABLE:
            literal.append(text[i + 1])
            step = 2
        elif explicit:
            close("(", float(explicit.group(1)))
            step = explicit.end() - i
        elif char in _FACTORS:
            flush()
            open_at[char].append(len(pieces))
        elif char in _OPENER_OF and open_at[_OPENER_OF[char]]:
            close(_OPENER_OF[char], _FACTORS[_OPENER_OF[char]])
        else:
            literal.append(char)
        i += step
    flush()
    for opener, starts in open_at.items():  # brackets left open run to the end
        for start in starts:
            for piece in pieces[start:]:
                piece[1] *= _FACTORS[opener]

    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


@dataclass
class PromptChunks:
    """A tokenized prompt cut into CLIP frames."""

    ids: torch.Tensor  # (n_chunks, 77) long
    weights: torch.Tensor  # (n_chunks, 77) float, 1.0 on bos/eos/padding
    n_tokens: int  # real tokens in the prompt, without framing

    @property
    def n_chunks(self) -> int:
        return self.ids.shape[0]


def chunk_bounds(ids: list[int], comma_id: int, spans=()) -> list[tuple[int, int]]:
    """(start, end) of each chunk of at most 75 tokens; an empty prompt is one empty chunk.

    Like the web UI, a chunk that does not reach the end of the prompt ends right after its
    last comma instead, when that comma is among its last 20 tokens, so that the phrase cut
    in two moves whole to the next chunk; and a chunk that would cut one of `spans` ((a, b):
    the vectors of a textual-inversion embedding) ends before it instead.
    """
    bounds = []
    start = 0
    while len(ids) - start > CHUNK_TOKENS:
        end = start + CHUNK_TOKENS
        cut = [a for a, b in spans if start < a < end < b]
        commas = [i for i in range(end - COMMA_BACKTRACK, end) if ids[i] == comma_id]
        if cut:
            end = cut[0]
        elif commas:
            end = commas[-1] + 1
        bounds.append((start, end))
        start = end
    bounds.append((start, len(ids)))
    return bounds


def _frame(ids: list[int], weights: list[float], tokenizer) -> tuple[list[int], list[float]]:
    """bos + ids + eos + padding to 77, with weight 1.0 on everything but the ids."""
    n_pad = CHUNK_TOKENS - len(ids)
    framed_ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * n_pad
    return framed_ids, [1.0, *weights, 1.0] + [1.0] * n_pad


def tokenize_weighted(text: str, tokenizer, emphasis: bool = True) -> PromptChunks:
    """Token ids and weights of a prompt, in frames of 77 (see ``chunk_bounds``).

    ``tokenizer`` needs ``encode(text) -> list[int]`` and ``bos/eos/pad_token_id``; each
    emphasis piece is tokenized on its own.
    """
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_emphasis(text, enabled=emphasis):
        piece_ids = tokenizer.encode(piece)
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    (comma_id,) = tokenizer.encode(",")
    spans = tokenizer.spans(ids) if hasattr(tokenizer, "spans") else ()  # embeddings (ldm.embeddings)
    frames = [_frame(ids[a:b], weights[a:b], tokenizer) for a, b in chunk_bounds(ids, comma_id, spans)]
    return PromptChunks(
        ids=torch.tensor([f[0] for f in frames], dtype=torch.long),
        weights=torch.tensor([f[1] for f in frames], dtype=torch.float32),
        n_tokens=len(ids),
    )


def pad_chunks(a: PromptChunks, b: PromptChunks, tokenizer) -> tuple[PromptChunks, PromptChunks]:
    """Give two prompts (e.g. cond and uncond) the same number of chunks by appending frames of
    the empty prompt to the shorter, so that their encodings can be batched."""
    n_chunks = max(a.n_chunks, b.n_chunks)
    empty_ids, empty_weights = _frame([], [], tokenizer)

    def pad(chunks: PromptChunks) -> PromptChunks:
        n_extra = n_chunks - chunks.n_chunks
        return PromptChunks(
            ids=torch.cat([chunks.ids, torch.tensor(empty_ids, dtype=torch.long).repeat(n_extra, 1)]),
            weights=torch.cat([chunks.weights, torch.tensor(empty_weights, dtype=torch.float32).repeat(n_extra, 1)]),
            n_tokens=chunks.n_tokens,
        )

    return pad(a), pad(b)


def encode_weighted(chunks: PromptChunks, encode_ids) -> torch.Tensor:
    """Hidden states (1, 77 * n_chunks, D) of a weighted prompt.

    ``encode_ids(ids (n, 77)) -> (n, 77, D)`` is the text encoder. Each token's hidden state is
    multiplied by its weight, then everything is rescaled so that the mean over the whole
    prompt (all chunks) equals that of the unweighted hidden states, as the web UI does.
    """
    hidden = encode_ids(chunks.ids)  # (n, 77, D)
    weighted = hidden * chunks.weights.to(hidden)[..., None]
    scale = hidden.float().mean() / weighted.float().mean()
    weighted = weighted * scale.to(hidden.dtype)
    return weighted.reshape(1, -1, hidden.shape[-1])  # (1, n * 77, D)
