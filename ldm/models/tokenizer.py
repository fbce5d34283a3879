"""CLIP byte-level BPE tokenizer, the text front end of Stable Diffusion v1.

Reproduces the tokenizer of OpenAI's CLIP (``simple_tokenizer.py``) as Hugging Face's
``CLIPTokenizer`` runs it for ``openai/clip-vit-large-patch14`` when ``ftfy`` is not installed:

1. normalise: Unicode NFC, every run of whitespace becomes one space, lowercase;
2. cut out the special tokens ``<|startoftext|>`` and ``<|endoftext|>`` (matched on the
   normalised text, as the hub tokenizer marks them), then split the rest into words with
   CLIP's pattern (contractions, runs of letters, single digits, runs of other symbols;
   whitespace is dropped);
3. map each word's UTF-8 bytes to printable characters (the GPT-2 byte table);
4. apply byte-pair merges, the last character of a word carrying the ``</w>`` marker.

The vocabulary is built from the original merge list shipped in ``ldm/data``.
``load_tokenizer`` prefers a copy of the Hugging Face tokenizer already in the local cache and
never downloads anything.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import unicodedata
from pathlib import Path

import regex
import torch

logger = logging.getLogger(__name__)

DEFAULT_VERSION = "openai/clip-vit-large-patch14"
BPE_PATH = Path(__file__).resolve().parent.parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges
VOCAB_SIZE = 2 * 256 + N_MERGES + 2

# English contractions, letter runs, single digits, runs of other non-space symbols.
_WORD_PATTERN = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+")
_SPECIAL_PATTERN = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_WHITESPACE = regex.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP byte table: each byte value -> one printable character.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 (controls,
    space, soft hyphen, ...) are given the characters U+0100 onward, in byte order.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table = {}
    n_shifted = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + n_shifted)
            n_shifted += 1
    return table


def read_bpe_merges(path: str | Path = BPE_PATH) -> list[tuple[str, str]]:
    """The merge list of CLIP's gzipped BPE file: skip the header line, keep the first 48894."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary: the 256 byte characters, the same with ``</w>``, one token per merge,
    then ``<|startoftext|>`` and ``<|endoftext|>``.

    The byte characters are ordered by code point, which is the original order (printable bytes
    first, then the shifted ones from U+0100).
    """
    chars = sorted(bytes_to_unicode().values())
    tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(pair) for pair in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def normalize(text: str) -> str:
    """NFC, collapse whitespace, lowercase, as Hugging Face's CLIPTokenizer without ftfy.

    Lowercasing is per character, like the ``tokenizers`` library (so a final capital sigma
    becomes σ, not ς).
    """
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


class _Framing:
    """The batch call shared by both tokenizers: bos + ids + eos, then padding."""

    bos_token_id = 49406
    eos_token_id = 49407
    pad_token_id = 49407
    model_max_length = 77

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def __call__(self, texts: str | list[str], max_length: int = 77) -> torch.LongTensor:
        """Token ids [B, max_length]: bos, ids cut to max_length - 2, eos, pad ids."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = [self.bos_token_id, *self.encode(text)[: max_length - 2], self.eos_token_id]
            rows.append(ids + [self.pad_token_id] * (max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


class CLIPTokenizer(_Framing):
    """CLIP's BPE tokenizer (``clip.simple_tokenizer.SimpleTokenizer``), written for this package."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self.vocab = vocab
        self.id_to_token = {i: token for token, i in vocab.items()}
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: byte for byte, c in self.byte_encoder.items()}
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def from_bpe_file(cls, path: str | Path = BPE_PATH) -> CLIPTokenizer:
        merges = read_bpe_merges(path)
        return cls(build_vocab(merges), merges)

    def bpe(self, word: str) -> list[str]:
        """Merge a byte-encoded word: repeatedly join every occurrence of the best-ranked pair."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """BPE token ids of ``text``, without bos/eos and without truncation."""
        ids = []
        for part in _SPECIAL_PATTERN.split(normalize(text)):
            if part in (BOS, EOS):
                ids.append(self.vocab[part])
                continue
            for word in _WORD_PATTERN.findall(part):
                chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                ids.extend(self.vocab[token] for token in self.bpe(chars))
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of token ids; ``</w>`` becomes a space."""
        special = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        tokens = [self.id_to_token[int(i)] for i in ids if not (skip_special_tokens and int(i) in special)]
        data = bytes(self.byte_decoder[c] for c in "".join(tokens))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()


class HuggingFaceTokenizer(_Framing):
    """Our tokenizer API over a ``transformers.CLIPTokenizer`` found in the local cache."""

    def __init__(self, hf_tokenizer):
        self.hf_tokenizer = hf_tokenizer
        self.bos_token_id = hf_tokenizer.bos_token_id
        self.eos_token_id = hf_tokenizer.eos_token_id
        self.pad_token_id = hf_tokenizer.pad_token_id

    def encode(self, text: str) -> list[int]:
        return self.hf_tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf_tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _hf_hub_cache() -> str:
    """The Hugging Face hub cache folder, from the environment as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")


def _maybe_in_hf_cache(version: str) -> bool:
    """Whether `version` is a local folder or has a folder in the Hugging Face hub cache; checked
    without importing transformers (a second of start-up) when it plainly is not there."""
    return Path(version).is_dir() or Path(_hf_hub_cache(), "models--" + version.replace("/", "--")).is_dir()


@functools.lru_cache(maxsize=None)
def load_tokenizer(version: str = DEFAULT_VERSION) -> CLIPTokenizer | HuggingFaceTokenizer:
    """The tokenizer of ``version`` from the local Hugging Face cache (or a local folder) if it
    is there, else ours built from the shipped BPE file. Never touches the network."""
    if not _maybe_in_hf_cache(version):
        logger.info("tokenizer %s not in the local Hugging Face cache; using the shipped CLIP BPE file", version)
        return CLIPTokenizer.from_bpe_file()
    try:
        from transformers import CLIPTokenizer as HFCLIPTokenizer

        hf_tokenizer = HFCLIPTokenizer.from_pretrained(version, local_files_only=True, cache_dir=_hf_hub_cache())
        if hf_tokenizer.vocab_size < VOCAB_SIZE:
            # transformers 5 returns an all but empty tokenizer, not an error, when no files exist
            raise OSError(f"no tokenizer files found (vocabulary of {hf_tokenizer.vocab_size} tokens)")
    except (ImportError, OSError, ValueError) as error:
        logger.info("tokenizer %s not in the local cache (%s); using the shipped CLIP BPE file", version, error)
        return CLIPTokenizer.from_bpe_file()
    logger.info("tokenizer %s loaded from the local Hugging Face cache", version)
    return HuggingFaceTokenizer(hf_tokenizer)
