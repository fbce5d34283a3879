"""The KL-regularised autoencoder that maps images to the latent space and back.

Corresponds to the original `ldm.models.autoencoder.AutoencoderKL` with the `Encoder` and
`Decoder` of `ldm.modules.diffusionmodules.model`; module names reproduce the checkpoint keys
(`encoder.down.0.block.1.conv2.weight`, `decoder.up.3.upsample.conv.bias`, `quant_conv.weight`...).
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn import Conv2d


def Normalize(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels=None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels, with 1x1 convolutions as projections."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x):
        _, _, H, W = x.shape
        h = self.norm(x)
        q, k, v = (rearrange(proj(h), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))  # one head
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(h, "b 1 (h w) c -> b c h w", h=H, w=W))


class Downsample(nn.Module):
    """Stride-2 conv with the original's asymmetric (right/bottom) padding."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (AttnBlocks), then an optional resampler."""

    def __init__(self, blocks, attns):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h):
        for i, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[i](h)
        return h


def _mid(channels):
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels)
    return mid


def _run_mid(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution, z_channels,
                 double_z=True):  # double_z: the moments (mean and log-variance) of a KL autoencoder
        super().__init__()
        self.conv_in = Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        res = resolution
        for level, mult in enumerate(ch_mult):
            c_in, c_out = ch * in_mult[level], ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out))
                c_in = c_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(c_out))
            down = _Level(blocks, attns)
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(c_out)
                res //= 2
            self.down.append(down)
        self.mid = _mid(c_out)
        self.norm_out = Normalize(c_out)
        self.conv_out = Conv2d(c_out, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for down in self.down:
            h = down(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels):
        super().__init__()
        c = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = Conv2d(z_channels, c, 3, padding=1)
        self.mid = _mid(c)
        levels = []
        for level in reversed(range(len(ch_mult))):
            c_out = ch * ch_mult[level]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c, c_out))
                c = c_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(c))
            up = _Level(blocks, attns)
            if level != 0:
                up.upsample = Upsample(c)
                res *= 2
            levels.insert(0, up)  # stored lowest level first, as the original's key order
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(c)
        self.conv_out = Conv2d(c, out_ch, 3, padding=1)

    def forward(self, z):
        h = _run_mid(self.mid, self.conv_in(z))
        for up in reversed(self.up):
            h = up(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """The posterior q(z|x) = N(mean, exp(logvar)), from the encoder's moments [B, 2C, h, w]."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32, device="cpu")
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def mode(self):
        return self.mean

    def kl(self):
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Encoder + Decoder with the 1x1 (post_)quant_conv between moments and latents."""

    def __init__(self, ddconfig, embed_dim):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL: ddconfig.double_z must be true (the KL posterior needs mean and logvar)")
        shared = {k: ddconfig[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels")}
        self.encoder = Encoder(**shared, in_channels=ddconfig["in_channels"])
        self.decoder = Decoder(**shared, out_ch=ddconfig["out_ch"])
        self.quant_conv = Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=True, generator=None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
