"""The OpenCLIP text encoder that conditions Stable Diffusion 2.x.

Corresponds to the original `ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder`, which holds an
`open_clip` CLIP model without its vision tower as `.model`. Our own small implementation
reproduces that module tree, so a 2.x checkpoint's `cond_stage_model.model.*` keys load unchanged:

    token_embedding.weight                      (vocab, width)
    positional_embedding                        (context, width)
    transformer.resblocks.N.ln_1.{weight,bias}
    transformer.resblocks.N.attn.in_proj_weight (3 * width, width)  q, k, v stacked
    transformer.resblocks.N.attn.in_proj_bias
    transformer.resblocks.N.attn.out_proj.{weight,bias}
    transformer.resblocks.N.ln_2.{weight,bias}
    transformer.resblocks.N.mlp.c_fc.{weight,bias}
    transformer.resblocks.N.mlp.c_proj.{weight,bias}
    ln_final.{weight,bias}
    text_projection                             (width, embed_dim)  unused by SD (hidden states, not the pooled embedding)
    logit_scale                                 ()                  unused by SD (CLIP's contrastive temperature)

Pre-norm residual blocks with plain GELU (not OpenAI CLIP's QuickGELU) and a causal mask.
`layer="penultimate"` (what SD 2.x uses) runs every block but the last, then `ln_final`. Nothing is
downloaded: the sizes come from the `arch` name (or explicit small sizes, for tests), the
vocabulary is CLIP's BPE shipped with this package, and OpenCLIP pads prompts with token 0.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .clip import lookup
from .tokenizer import CLIPTokenizer

# Text towers of the OpenCLIP architectures SD uses (open_clip's model_configs/<arch>.json, text_cfg).
ARCHS = {
    "ViT-H-14": dict(width=1024, heads=16, layers=24, embed_dim=1024, vocab_size=49408),
    "ViT-bigG-14": dict(width=1280, heads=20, layers=32, embed_dim=1280, vocab_size=49408),  # SDXL's second encoder
}
LAYERS = ("last", "penultimate")


class OpenCLIPTokenizer(CLIPTokenizer):
    """CLIP's BPE framed as OpenCLIP frames it: bos, ids, eos, then token 0 (not eos) as padding."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens and self.eos_token_id in ids:  # the zeros after eos are padding, not "!"
            ids = ids[: ids.index(self.eos_token_id)]
        return super().decode([i for i in ids if not (skip_special_tokens and i == self.bos_token_id)])


@functools.lru_cache(maxsize=None)
def open_clip_tokenizer() -> OpenCLIPTokenizer:
    return OpenCLIPTokenizer.from_bpe_file()


class Attention(nn.Module):
    """Multi-head self-attention in torch.nn.MultiheadAttention's parameter layout (q, k, v stacked)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3C)
        q, k, v = qkv.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # each (B, heads, T, d)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, d)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, mlp_ratio=4):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, width * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])


class TextTower(nn.Module):
    """open_clip's CLIP without `visual`: the parameters a 2.x checkpoint holds under `cond_stage_model.model.`."""

    def __init__(self, vocab_size, width, layers, heads, context_length, embed_dim):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))

    def hidden_states(self, ids, n_blocks, vectors=None):
        """Token ids [B, T] -> ln_final of the output of the first n_blocks blocks, [B, T, width]
        (`vectors`: textual-inversion vectors for the ids vocab_size + k, see clip.lookup)."""
        x = lookup(self.token_embedding, ids, vectors) + self.positional_embedding[: ids.shape[1]]
        for block in self.transformer.resblocks[:n_blocks]:
            x = block(x)
        return self.ln_final(x)


class FrozenOpenCLIPEmbedder(nn.Module):
    """Text prompts -> hidden states after `ln_final`, [B, max_length, width] (1024 for ViT-H-14).

    `arch` names the architecture (see ARCHS); `width`, `layers`, `heads`, `embed_dim` and
    `vocab_size` override its sizes (tests build tiny ones). `version` (the pretrained tag the
    original downloads) is recorded only: the weights come from the checkpoint.
    """

    def __init__(self, arch="ViT-H-14", version="laion2b_s32b_b79k", device=None, max_length=77, freeze=True,
                 layer="last", width=None, layers=None, heads=None, embed_dim=None, vocab_size=None):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"FrozenOpenCLIPEmbedder: unknown arch {arch!r}; known: {', '.join(ARCHS)}")
        if layer not in LAYERS:
            raise ValueError(f"FrozenOpenCLIPEmbedder: layer={layer!r} is not supported (choose from {', '.join(LAYERS)})")
        sizes = dict(ARCHS[arch])
        for name, value in (("width", width), ("layers", layers), ("heads", heads), ("embed_dim", embed_dim),
                            ("vocab_size", vocab_size)):
            if value is not None:
                sizes[name] = value
        if sizes["width"] % sizes["heads"]:
            raise ValueError(f"FrozenOpenCLIPEmbedder: width {sizes['width']} is not a multiple of heads {sizes['heads']}")
        # `device` and `freeze` are the original's run-time switches: placement is the caller's,
        # and inference never trains.
        self.arch, self.version, self.layer = arch, version, layer
        self.max_length = max_length
        self.hidden_size = sizes["width"]
        self.n_blocks = sizes["layers"] - (1 if layer == "penultimate" else 0)
        self.model = TextTower(sizes["vocab_size"], sizes["width"], sizes["layers"], sizes["heads"], max_length,
                               sizes["embed_dim"])

    def unused_keys(self):
        """State-dict keys that encoding never reads: the blocks past the chosen layer, the projection
        and the temperature. Files converted back from diffusers' 23-layer text encoder lack them."""
        skipped = [f"model.transformer.resblocks.{i}." for i in range(self.n_blocks, len(self.model.transformer.resblocks))]
        return [k for k in self.state_dict(keep_vars=True)
                if k in ("model.text_projection", "model.logit_scale") or k.startswith(tuple(skipped))]

    @property
    def tokenizer(self):
        return open_clip_tokenizer()

    def encode_ids(self, ids, vectors=None):
        """Token ids [B, T<=max_length] -> hidden states [B, T, width] (`vectors`: see clip.lookup)."""
        device = self.model.positional_embedding.device
        vectors = None if vectors is None else vectors.to(device)
        return self.model.hidden_states(ids.to(device), self.n_blocks, vectors)

    def forward(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        return self.encode_ids(self.tokenizer(list(texts), max_length=self.max_length))

    def encode(self, texts):
        return self(texts)
