"""The Stable Diffusion v1 denoising UNet, with spatial transformers.

Corresponds to the original `ldm.modules.diffusionmodules.openaimodel.UNetModel` and
`ldm.modules.attention.SpatialTransformer`. Attribute names and `nn.Sequential` positions
reproduce the original checkpoint keys (`input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`,
...), so a state dict loads with no renaming. Dropout positions are kept as identities.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d, DerivedCache, Linear, attention, geglu, recording, tensor_key


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32, whatever the activation dtype (as the original).

    With `upcast = False`, a float16 or bfloat16 activation on CUDA with weights of its own dtype and
    no autocast goes to `group_norm` as it is: the CUDA kernel keeps its statistics and arithmetic
    in float32 and rounds once on the way out, like the upcast, without the two extra passes.
    """

    upcast = True

    def forward(self, x):
        if not self.upcast and x.is_cuda and x.dtype == self.weight.dtype and not torch.is_autocast_enabled():
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


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


def fan_out(t, k):
    """t repeated k times along the batch, [t, t, ...]: each latent under k contexts. (`cat` keeps the
    memory layout, channels-last included; `repeat` would make an NCHW copy.)"""
    return torch.cat([t] * k) if k > 1 else t


# ----------------------------------------------------------------------------- attention


class CrossAttention(DerivedCache, nn.Module):
    """Multi-head attention; self-attention when no context is given."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, query_dim), nn.Identity())  # .1 was Dropout

    _derived = ("_kv",)
    _kv = None  # cross-attention at inference: (context, keys of it and the weights, to_k(context), to_v(context))

    def keys_values(self, context):
        """to_k(context), to_v(context); for a cross-attention context (the text, the same tensor at every
        sampling step) kept from the previous call while the context and both weights are unchanged."""
        # A graph being recorded, or no version counter (inference tensors): a change could go unseen.
        if recording(context) or torch.is_grad_enabled() or context.is_inference():
            self._kv = None
            return self.to_k(context), self.to_v(context)
        key = (tensor_key(context), tensor_key(self.to_k.weight), tensor_key(self.to_v.weight))
        if self._kv is None or self._kv[0] is not context or self._kv[1] != key:
            self._kv = None
            self._kv = (context, key, self.to_k(context), self.to_v(context))
        return self._kv[2], self._kv[3]

    def forward(self, x, context=None, residual=None):
        B, N, _ = x.shape
        h = self.heads
        q = self.to_q(x).view(B, N, h, -1).transpose(1, 2)  # (B, h, N, d)
        k, v = (self.to_k(x), self.to_v(x)) if context is None else self.keys_values(context)
        M = k.shape[1]
        k = k.view(B, M, h, -1).transpose(1, 2)  # (B, h, M, d)
        v = v.view(B, M, h, -1).transpose(1, 2)  # (B, h, M, d)
        out = attention(q, k, v)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, -1)  # (B, N, h*d)
        return self.to_out[0](out, residual)  # (+ residual, summed by the matmul); to_out[1] is an identity


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x):
        return geglu(x, self.proj)  # x, gate = proj(x).chunk(2, -1); x * gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Identity(), Linear(inner, dim))  # .1 was Dropout

    def forward(self, x, residual=None):
        return self.net[2](self.net[0](x), residual)  # net[1] is an identity


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, context_dim=None):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x), residual=x)  # x + attn1(norm1(x))
        if context is not None and context.shape[0] != x.shape[0]:  # each latent under k contexts: fan out here
            x = fan_out(x, context.shape[0] // x.shape[0])  # (k*B, N, C)
        x = self.attn2(self.norm2(x), context=context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: 1x1 conv in, blocks, 1x1 conv out, residual."""

    def __init__(self, in_channels, n_heads, d_head, depth=1, context_dim=None):
        super().__init__()
        inner = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, context_dim=context_dim) for _ in range(depth)]
        )
        self.proj_out = Conv2d(inner, in_channels, 1)

    def forward(self, x, context=None):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            h = block(h, context=context)
        h = h.transpose(1, 2).reshape(h.shape[0], -1, H, W)  # (B, inner, H, W); k*B once fanned out
        x = fan_out(x, h.shape[0] // B)  # the residual follows a fan-out inside the blocks
        return self.proj_out(h, residual=x)  # proj_out(h) + x


# ----------------------------------------------------------------------------- conv blocks


class Downsample(nn.Module):
    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.op = Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x):
        return self.conv.upsampled(x)  # conv(nearest 2x upsampling of x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (added after the first conv)."""

    def __init__(self, channels, emb_channels, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Identity(), Conv2d(out_channels, out_channels, 3, padding=1)
        )  # .2 was Dropout
        self.skip_connection = nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        norm, act, conv = self.in_layers
        h = conv(act(norm(x)), shift=self.emb_layers(emb))  # in_layers(x) + emb_layers(emb)[:, :, None, None]
        out = self.out_layers
        return out[3](out[2](out[1](out[0](h))), residual=self.skip_connection(x))  # skip(x) + out_layers(h)


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
    """The v1 denoiser: eps = UNet(x_t, t, text context). Parameters follow the original config."""

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
        use_spatial_transformer=False,
        transformer_depth=1,
        context_dim=None,
        legacy=True,
        conv_resample=True,
        dims=2,
        dropout=0.0,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        n_embed=None,
        image_size=None,
    ):
        super().__init__()
        unsupported = {
            "use_spatial_transformer": not use_spatial_transformer,
            "conv_resample": not conv_resample,
            "dims": dims != 2,
            "num_classes": num_classes is not None,
            "use_scale_shift_norm": use_scale_shift_norm,
            "resblock_updown": resblock_updown,
            "n_embed": n_embed is not None,
        }
        bad = [name for name, is_bad in unsupported.items() if is_bad]
        if bad:
            raise ValueError(f"UNetModel: options not used by SD v1 and not supported: {', '.join(bad)}")
        if context_dim is None:
            raise ValueError("UNetModel: context_dim is required for a text-conditioned model")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set num_heads or num_head_channels")
        # use_checkpoint, use_fp16, dropout, image_size: training or legacy switches, ignored at inference.

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.context_dim = context_dim
        self.downsample_factor = 2 ** (len(channel_mult) - 1)  # latent sides must be multiples of this

        def heads_for(ch):  # (heads, dim per head); `legacy` gives the same split for spatial transformers
            if num_head_channels == -1:
                return num_heads, ch // num_heads
            return ch // num_head_channels, num_head_channels

        time_dim = model_channels * 4
        self.time_embed = nn.Sequential(Linear(model_channels, time_dim), nn.SiLU(), Linear(time_dim, time_dim))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, time_dim, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(SpatialTransformer(ch, *heads_for(ch), depth=transformer_depth, context_dim=context_dim))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_dim),
            SpatialTransformer(ch, *heads_for(ch), depth=transformer_depth, context_dim=context_dim),
            ResBlock(ch, time_dim),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), time_dim, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(SpatialTransformer(ch, *heads_for(ch), depth=transformer_depth, context_dim=context_dim))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), Conv2d(model_channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps, context):
        """eps for latents x [B, C, H, W] at timesteps [B] under text contexts [B, L, D].

        A context of k*B rows means each latent under k contexts (as classifier-free guidance does,
        unconditional rows first): the result is that of `forward(x.repeat(k, 1, 1, 1),
        timesteps.repeat(k), context)`, but the layers before the first cross-attention, which see
        no context, run once per latent instead of k times.
        """
        if context.shape[0] % x.shape[0] or timesteps.shape[0] != x.shape[0]:
            raise ValueError(f"UNetModel: {x.shape[0]} latents and {timesteps.shape[0]} timesteps "
                             f"for {context.shape[0]} contexts")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            k = h.shape[0] // emb.shape[0]  # > 1 once the block fanned out to the contexts: so do the rest
            emb, skips = fan_out(emb, k), [fan_out(s, k) for s in skips]
            skips.append(h)
        k = context.shape[0] // h.shape[0]  # > 1 when no input block had a cross-attention
        h, emb, skips = fan_out(h, k), fan_out(emb, k), [fan_out(s, k) for s in skips]
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
