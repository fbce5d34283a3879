"""The CLIP text encoder that conditions Stable Diffusion v1.

Corresponds to the original `ldm.modules.encoders.modules.FrozenCLIPEmbedder`, which wraps
Hugging Face's `CLIPTextModel` as `.transformer`. Our own small implementation reproduces that
module tree (`transformer.text_model.encoder.layers.0.self_attn.q_proj.weight`, ...,
`transformer.text_model.embeddings.position_ids`), so a v1 checkpoint loads unchanged. It is
built from sizes alone: nothing is downloaded. The default sizes are ViT-L/14's text tower.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizer import load_tokenizer

CLIP_VIT_L14 = "openai/clip-vit-large-patch14"


def lookup(table: nn.Embedding, ids, vectors=None):
    """table(ids), with row k of `vectors` for the ids table.num_embeddings + k (placeholders of
    textual-inversion embeddings); the table itself is not changed."""
    if vectors is None:
        return table(ids)
    vocab = table.num_embeddings
    extra = ids >= vocab
    x = table(ids.masked_fill(extra, 0))
    rows = vectors.to(x.dtype)[(ids - vocab).clamp(0, len(vectors) - 1)]
    return torch.where(extra[..., None], rows, x)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, d)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, width, hidden, act):
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, width, heads, hidden, act):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = CLIPMLP(width, hidden, act)
        self.layer_norm2 = nn.LayerNorm(width)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab_size, width, max_positions):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_positions, width)
        # Persistent, as in the checkpoints of the v1 era (the loader fills it in when a file lacks it).
        # Made on the CPU even in a meta-device build (a meta arange runs a Python decomposition that
        # costs seconds of imports); the loader assigns the file's values anyway.
        self.register_buffer("position_ids", torch.arange(max_positions, device="cpu")[None], persistent=True)

    def forward(self, ids, vectors=None):
        """`vectors` [n, width]: extra token vectors, taken for the ids vocab_size + k (textual inversion)."""
        return lookup(self.token_embedding, ids, vectors) + self.position_embedding(self.position_ids[:, : ids.shape[1]])


class CLIPTextTransformer(nn.Module):
    def __init__(self, vocab_size, width, layers, heads, hidden, max_positions, act):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab_size, width, max_positions)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([CLIPEncoderLayer(width, heads, hidden, act) for _ in range(layers)])
        self.final_layer_norm = nn.LayerNorm(width)

    def forward(self, ids, vectors=None, n_layers=None):
        """The final layer norm of the output of the first `n_layers` layers (default all)."""
        x = self.embeddings(ids, vectors)
        for layer in self.encoder.layers[:n_layers]:
            x = layer(x)
        return self.final_layer_norm(x)


class _TextModel(nn.Module):
    """Holds `text_model`, as Hugging Face's CLIPTextModel does, for the key names."""

    def __init__(self, **sizes):
        super().__init__()
        self.text_model = CLIPTextTransformer(**sizes)

    def forward(self, ids, vectors=None, n_layers=None):
        return self.text_model(ids, vectors, n_layers)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class FrozenCLIPEmbedder(nn.Module):
    """Text prompts -> last hidden state after the final layer norm, [B, max_length, hidden_size].

    The sizes default to CLIP ViT-L/14's text transformer; a config may give smaller ones (the
    bundled demo model does) while keeping the real CLIP tokenizer.
    """

    def __init__(self, version=CLIP_VIT_L14, max_length=77, vocab_size=49408, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=3072, hidden_act="quick_gelu"):
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"FrozenCLIPEmbedder: hidden_act must be one of {sorted(ACTIVATIONS)}")
        self.version = version
        self.max_length = max_length
        self.hidden_size = hidden_size
        self.transformer = _TextModel(
            vocab_size=vocab_size, width=hidden_size, layers=num_hidden_layers, heads=num_attention_heads,
            hidden=intermediate_size, max_positions=max_length, act=ACTIVATIONS[hidden_act],
        )

    @property
    def tokenizer(self):
        return load_tokenizer(self.version)

    def encode_ids(self, ids, vectors=None, clip_skip=1):
        """Token ids [B, T<=max_length] -> hidden states [B, T, hidden_size].

        `vectors` [n, hidden_size] are taken for the ids vocab_size + k (textual-inversion embeddings);
        `clip_skip` N stops N - 1 layers before the last (the web UIs' meaning; the final layer norm
        still applies)."""
        layers = len(self.transformer.text_model.encoder.layers)
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip skip must be between 1 and {layers} (this text encoder's layers), got {clip_skip}")
        device = self.transformer.text_model.embeddings.position_ids.device
        vectors = None if vectors is None else vectors.to(device)
        return self.transformer(ids.to(device), vectors, layers - clip_skip + 1)

    def forward(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        return self.encode_ids(self.tokenizer(list(texts), max_length=self.max_length))

    def encode(self, texts):
        return self(texts)
