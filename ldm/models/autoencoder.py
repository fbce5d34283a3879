"""The KL-regularised autoencoder that maps images to the latent space and back.

Corresponds to the original `ldm.models.autoencoder.AutoencoderKL` with the `Encoder` and
`Decoder` of `ldm.modules.diffusionmodules.model`; module names reproduce the checkpoint keys
(`encoder.down.0.block.1.conv2.weight`, `decoder.up.3.upsample.conv.bias`, `quant_conv.weight`...).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import DirectConv2d as Conv2d  # Winograd measured slower in the VAE (layers.py)
from .layers import attention


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
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = attention(q, k, v)[:, 0]  # (B, HW, C)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


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
        # Not conv.upsampled(x): on the decoder's large maps the whole decode measured 3 to 8 % slower with it.
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
                 double_z=True, out_ch=None, dropout=0.0, resamp_with_conv=True, use_linear_attn=False,
                 attn_type="vanilla", give_pre_end=False, tanh_out=False):
        super().__init__()
        _check_vanilla(resamp_with_conv, use_linear_attn, attn_type)
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
    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels,
                 in_channels=None, double_z=None, dropout=0.0, resamp_with_conv=True, give_pre_end=False,
                 tanh_out=False, use_linear_attn=False, attn_type="vanilla"):
        super().__init__()
        _check_vanilla(resamp_with_conv, use_linear_attn, attn_type)
        if give_pre_end or tanh_out:
            raise ValueError("Decoder: give_pre_end / tanh_out are not used by SD v1 and not supported")
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

    def forward_tiled(self, z, tile=16):
        """`forward` computed in bands of rows, `tile` latent rows high (scaled with each upsampling).

        The latent-resolution part (conv_in, the mid block and its attention) runs whole. Above it,
        every GroupNorm takes its statistics from the whole feature map and every 3x3 convolution
        sees one row of real context on each side of its band, so the result is `forward`'s up to
        float rounding: no seams, and no overlap to blend. Only the layer inputs and outputs are
        held whole; the wide temporaries (normalised, activated, upsampled) exist one band at a time.
        """
        h = _run_mid(self.mid, self.conv_in(z))
        rows = tile
        for up in reversed(self.up):
            for i, block in enumerate(up.block):
                h = _resnet_tiled(block, h, rows)
                if up.attn:
                    h = up.attn[i](h)  # global attention: whole
            if hasattr(up, "upsample"):
                conv = up.upsample.conv
                out = h.new_empty(h.shape[0], conv.out_channels, 2 * h.shape[2], 2 * h.shape[3])
                h = _by_rows(lambda b: conv(F.interpolate(b, scale_factor=2.0, mode="nearest")), h, out, rows, scale=2)
                rows *= 2
        stats = _group_stats(self.norm_out, h)
        out = h.new_empty(h.shape[0], self.conv_out.out_channels, *h.shape[2:])
        return _by_rows(lambda b: self.conv_out(_norm_silu(self.norm_out, stats, b)), h, out, rows)


# ----------------------------------------------------------------------------- decoding in bands of rows


def _group_stats(norm, x):
    """(mean, 1/std) [B, groups] of GroupNorm `norm` over the whole of x, in float32."""
    groups = x.reshape(x.shape[0], norm.num_groups, -1)  # (B, G, C/G * H * W), a view
    if x.dtype == torch.float32:
        var, mean = torch.var_mean(groups, dim=-1, unbiased=False)
    else:  # in float32 one group at a time, never a float32 copy of the whole map
        stats = [torch.var_mean(groups[:, g].float(), dim=-1, unbiased=False) for g in range(norm.num_groups)]
        var, mean = (torch.stack(s, dim=1) for s in zip(*stats))
    return mean, torch.rsqrt(var + norm.eps)


def _norm_silu(norm, stats, x):
    """SiLU(GroupNorm(x)) with the given statistics: pointwise, so it applies to any band of rows."""
    mean, rstd = stats
    B, C = x.shape[:2]
    per_group = C // norm.num_groups
    scale = (rstd[:, :, None] * norm.weight.float().view(norm.num_groups, per_group)).reshape(B, C, 1, 1)
    shift = norm.bias.float().view(1, C, 1, 1) - mean.repeat_interleave(per_group, dim=1).view(B, C, 1, 1) * scale
    return F.silu(torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype)), inplace=True)


def _by_rows(fn, x, out, rows, scale=1, halo=1, accumulate=False):
    """out = fn(x) (or out += fn(x)) for a local fn (3x3 support): x in bands of `rows` rows with `halo`
    rows of context each side; fn maps a band of n rows to scale * n rows. Returns out."""
    H = x.shape[2]
    for r0 in range(0, H, rows):
        r1 = min(r0 + rows, H)
        s0, s1 = max(r0 - halo, 0), min(r1 + halo, H)
        y = fn(x[:, :, s0:s1])[:, :, scale * (r0 - s0):scale * (r1 - s0)]  # (B, C', scale * (r1 - r0), W')
        if accumulate:
            out[:, :, scale * r0:scale * r1] += y
        else:
            out[:, :, scale * r0:scale * r1] = y
    return out


def _resnet_tiled(block, x, rows):
    """ResnetBlock.forward in bands of rows, with whole-map GroupNorm statistics. Without a channel
    change, the result is written into x (which conv2 does not read), one map fewer held whole."""
    B, _, H, W = x.shape
    c_out = block.conv1.out_channels
    stats = _group_stats(block.norm1, x)
    h = _by_rows(lambda b: block.conv1(_norm_silu(block.norm1, stats, b)), x, x.new_empty(B, c_out, H, W), rows)
    stats = _group_stats(block.norm2, h)
    skip = getattr(block, "nin_shortcut", None)
    if skip is None:
        out = x
    else:
        out = x.new_empty(B, c_out, H, W)
        for r0 in range(0, H, rows):
            out[:, :, r0:r0 + rows] = skip(x[:, :, r0:r0 + rows])
    return _by_rows(lambda b: block.conv2(_norm_silu(block.norm2, stats, b)), h, out, rows, accumulate=True)


def _check_vanilla(resamp_with_conv, use_linear_attn, attn_type):
    if not resamp_with_conv or use_linear_attn or attn_type != "vanilla":
        raise ValueError("autoencoder: only the vanilla attention and conv resampling of SD v1 are supported")


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

    def __init__(self, ddconfig, embed_dim, lossconfig=None, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None, ema_decay=None, learn_logvar=False):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL: ddconfig.double_z must be true (the KL posterior needs mean and logvar)")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    @torch.no_grad()
    def decode_tiled(self, z, tile=16):
        """`decode` one image at a time and in bands of `tile` latent rows (see Decoder.forward_tiled):
        the same image up to float rounding, in less memory for large images. Inference only."""
        return torch.cat([self.decoder.forward_tiled(self.post_quant_conv(z[i:i + 1]), tile) for i in range(len(z))])

    def forward(self, x, sample_posterior=True, generator=None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
