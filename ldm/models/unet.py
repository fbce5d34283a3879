"""The Stable Diffusion denoising UNet with spatial transformers (v1, v2 and XL are configurations of it).

Corresponds to the original `ldm.modules.diffusionmodules.openaimodel.UNetModel` and
`ldm.modules.attention.SpatialTransformer` (and `sgm.modules.diffusionmodules.openaimodel.UNetModel`
for SDXL). Attribute names and `nn.Sequential` positions reproduce the original checkpoint keys
(`input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`, ...), so a state dict loads with no
renaming; Dropout positions are kept as identities.

This is the reference model: plain PyTorch, eps = UNet(x[B], t[B], context[B]). Faster kernels,
guidance fan-out and caches are a pass over it (`ldm.backends.optimize`), never part of it.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the activation dtype, as the original."""

    def forward(self, x):
        w, b = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def normalization(channels):
    return GroupNorm32(32, channels)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps t [B] -> [B, dim], cosines first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


# ----------------------------------------------------------------------------- attention


class CrossAttention(nn.Module):
    """Multi-head attention of x over context (self-attention when no context is given)."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())  # .1 was Dropout

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """a * GELU(gate) for [a, gate] = proj(x) (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim))  # .1 was Dropout

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention over the text, feed-forward; each pre-normed and residual."""

    def __init__(self, dim, n_heads, d_head, context_dim=None):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: norm, project in, blocks, project out, residual.

    The projections are 1x1 convolutions (v1), or with `use_linear` linear layers applied to the
    (b, h*w, c) sequence (v2, XL).
    """

    def __init__(self, in_channels, n_heads, d_head, depth=1, context_dim=None, use_linear=False):
        super().__init__()
        inner = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, context_dim=context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1)

    def forward(self, x, context=None):
        _, _, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = rearrange(h, "b c h w -> b (h w) c")
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context=context)
        if self.use_linear:
            h = self.proj_out(h)
        h = rearrange(h, "b (h w) c -> b c h w", h=H, w=W)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h


# ----------------------------------------------------------------------------- conv blocks


class Downsample(nn.Module):
    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (added after the first conv)."""

    def __init__(self, channels, emb_channels, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Identity(), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )  # .2 was Dropout
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of blocks; each receives what it needs (emb for ResBlocks, context for transformers)."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# ----------------------------------------------------------------------------- UNet


class UNetModel(nn.Module):
    """eps = UNet(x_t, t, text context[, y]). Parameters follow the original configs.

    `transformer_depth` is one depth for every level or one per level (SDXL: [1, 2, 10]; the middle
    block takes `transformer_depth_middle`, by default the last level's). `use_linear_in_transformer`
    makes the transformers' projections linear (v2, XL). `num_classes="sequential"` with
    `adm_in_channels` adds `label_emb(y)` of a vector y [B, adm_in_channels] to the timestep
    embedding (SDXL's size and crop conditioning).
    """

    def __init__(
        self,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        channel_mult=(1, 2, 4, 8),
        num_heads=-1,
        num_head_channels=-1,
        transformer_depth=1,
        transformer_depth_middle=None,
        context_dim=None,
        use_linear_in_transformer=False,
        num_classes=None,
        adm_in_channels=None,
    ):
        super().__init__()
        if context_dim is None:
            raise ValueError("UNetModel: context_dim is required for a text-conditioned model")
        if isinstance(context_dim, (list, tuple)):  # sgm's per-level widths (the SDXL refiner's); all one width
            if len(set(context_dim)) != 1:
                raise ValueError(f"UNetModel: per-level context_dim {list(context_dim)} of different widths")
            context_dim = context_dim[0]
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set num_heads or num_head_channels")
        if num_classes not in (None, "sequential"):
            raise ValueError(f"UNetModel: num_classes={num_classes!r} is not supported (only 'sequential', as SDXL)")
        if num_classes == "sequential" and adm_in_channels is None:
            raise ValueError("UNetModel: num_classes 'sequential' needs adm_in_channels")
        levels = len(channel_mult)
        depths = [transformer_depth] * levels if isinstance(transformer_depth, int) else list(transformer_depth)
        if len(depths) != levels:
            raise ValueError(f"UNetModel: transformer_depth has {len(depths)} entries for {levels} levels")
        depth_middle = depths[-1] if transformer_depth_middle is None else transformer_depth_middle

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.context_dim = context_dim
        self.num_classes = num_classes
        self.downsample_factor = 2 ** (levels - 1)  # latent sides must be multiples of this

        def transformer(ch, depth):
            if num_head_channels == -1:
                heads, d_head = num_heads, ch // num_heads
            else:
                heads, d_head = ch // num_head_channels, num_head_channels
            return SpatialTransformer(ch, heads, d_head, depth=depth, context_dim=context_dim,
                                      use_linear=use_linear_in_transformer)

        time_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        if num_classes == "sequential":
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(adm_in_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, time_dim, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(ResBlock(ch, time_dim), transformer(ch, depth_middle),
                                                    ResBlock(ch, time_dim))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), time_dim, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch, depths[level]))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def embedding(self, timesteps, y=None, dtype=torch.float32):
        """The timestep embedding [B, 4 * model_channels] (plus label_emb(y) for a class-conditioned model)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.num_classes is not None:
            if y is None:
                raise ValueError("UNetModel: this model needs its vector conditioning y")
            emb = emb + self.label_emb(y.to(dtype))
        return emb

    def forward(self, x, timesteps, context, y=None):
        """eps for latents x [B, C, H, W] at timesteps [B] under contexts [B, L, D] (and vectors y [B, adm])."""
        if not x.shape[0] == timesteps.shape[0] == context.shape[0]:
            raise ValueError(f"UNetModel: {x.shape[0]} latents, {timesteps.shape[0]} timesteps and "
                             f"{context.shape[0]} contexts")
        emb = self.embedding(timesteps, y, x.dtype)
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
