"""The fused modules `optimize` swaps in: subclasses of the reference modules that add no parameter
or buffer (the state dict keeps its keys and tensors) and override `forward` only.

Each reads its levers from `self.backend` (a BackendOptions) at call time and falls back to the
reference computation where a kernel does not apply (another device or dtype, autograd, tracing).
What one keeps between calls (packed weights, the text's keys and values, traced attention graphs)
sits outside the state dict, is dropped by `.to()` and friends and by pickling, and is rebuilt when
the weight it came from changes (`tensor_key`) or on `ldm.backends.refresh`.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..models import autoencoder
from ..models.autoencoder import AttnBlock
from ..models.unet import (BasicTransformerBlock, CrossAttention, FeedForward, GEGLU, GroupNorm32, ResBlock,
                           SpatialTransformer, UNetModel, Upsample)
from . import kernels
from .memory import HEAP_MMAP_THRESHOLD, release_file_pages


def fan_out(t, k):
    """t repeated k times along the batch, [t, t, ...]: each latent under k contexts. (`cat` keeps the
    memory layout, channels-last included; `repeat` would make an NCHW copy.)"""
    return torch.cat([t] * k) if k > 1 else t


class Derived:
    """Mixin for a module that keeps tensors derived from its weights outside the state dict (the
    attributes named in `_derived`): `.to()`, `.half()` and the like drop them, copies and pickles
    leave them behind; they are made again on next use."""

    _derived = ()
    _transient = ()  # attributes that copies and pickles leave behind, but `.to()` keeps
    backend = None  # the BackendOptions, set by optimize
    file_mapping = ()  # [(start, end)] of the file mapping under the weight, if any (found by optimize)

    def clear_derived(self):
        for name in self._derived:
            self.__dict__.pop(name, None)

    def _apply(self, fn, *args, **kwargs):
        self.clear_derived()  # the weights are about to be replaced
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in self._derived + self._transient:
            state.pop(name, None)
        return state


# ----------------------------------------------------------------------------- leaves: Linear, Conv2d


class OneDNNLinear(Derived, nn.Linear):
    """nn.Linear through oneDNN's matmul; `forward(x, residual)` adds the residual in its epilogue.
    A bfloat16 weight is packed once into oneDNN's layout (`bf16_weight`)."""

    _derived = ("_bf16",)

    def bf16_weight(self, parts=1):
        """The bfloat16 weight packed for oneDNN, split in `parts` along the outputs first (GEGLU: 2); kept
        while the weight stays."""
        key = (kernels.tensor_key(self.weight), parts)
        kept = self.__dict__.get("_bf16")
        if kept is None or kept[0] != key:
            self.__dict__.pop("_bf16", None)
            self._bf16 = (key, [kernels.pack_linear_weight(w) for w in self.weight.chunk(parts)])
            if self.file_mapping:  # the plain copy is not read again: no need to keep it resident
                release_file_pages(self.weight, self.file_mapping)
        return self._bf16[1]

    def forward(self, x, residual=None):
        if self.backend.onednn and kernels.fast(x, self.weight):
            weight = self.bf16_weight()[0] if x.dtype == torch.bfloat16 else self.weight
            return kernels.linear(x, weight, self.bias, residual)
        y = F.linear(x, self.weight, self.bias)
        return y if residual is None else y + residual


LARGE_WEIGHT_BYTES = 32 << 20  # a weight this large has its own, lower, limit for packing (pack_max_positions_large)


class PackedConv2d(Derived, nn.Conv2d):
    """nn.Conv2d through oneDNN with its weight reordered once (`pack`); tiny outputs as one matmul.

    `forward(x, residual, shift)` returns conv(x) + residual + shift[n, c] (on every pixel of sample n,
    channel c); the residual is summed in the epilogue and a shift the same for every sample (a timestep
    embedding under guidance) folded into the bias.
    """

    _derived = ("_form",)
    hint = None  # the input shape the packed weight is laid out for (set by optimize)

    def _plain_path(self, x):
        return not (self.backend.onednn and kernels.fast(x, self.weight) and self.padding_mode == "zeros"
                    and not isinstance(self.padding, str) and x.dim() == 4)

    def weight_form(self, kind, input_shape=None):
        """The weight as the call takes it: "packed" (oneDNN's layout for inputs of `input_shape`) or
        "gemm" (`gemm_layout`). One form is kept at a time, made again when the weight changed or, for
        the packed form, when the input shape did (oneDNN would otherwise reorder it at every call)."""
        key = (kernels.tensor_key(self.weight), kind, tuple(input_shape) if kind == "packed" else None)
        form = self.__dict__.get("_form")
        if form is None or form[0] != key:
            self.__dict__.pop("_form", None)  # release the old copy before making the new one
            if kind == "gemm":
                value = kernels.gemm_layout(self.weight)
            else:
                value = kernels.pack_conv_weight(self.weight, self.padding, self.stride, self.dilation, self.groups,
                                                 input_shape)
            self._form = (key, kind, value)
            if self.file_mapping:  # the plain copy is not read again: no need to keep it resident
                release_file_pages(self.weight, self.file_mapping)
        return self._form[2]

    def pack(self, input_shape):
        """Lay the weight out for inputs of `input_shape` now (at optimize time, not in the first step);
        False when calls of that shape run on the plain weight (`_plain_ok`): nothing is kept then."""
        self.hint = tuple(input_shape)
        if self._plain_ok(self.hint):
            self.clear_derived()
            return False
        self.weight_form("gemm" if self._gemm_ok(self.hint) else "packed", self.hint)
        return True

    def _plain_ok(self, shape):
        """True when a call on inputs of `shape` hands oneDNN the plain weight, to reorder for that call only:
        an output of more than `pack_max_positions` positions (batch included; `pack_max_positions_large` for
        a weight of 32 MiB or more), where the reorder is a small part of the convolution's time, of a
        weight held in memory of its own (converted from a float16
        file, say), which a packed copy would double. (A weight viewed in a mapped file is packed: its pages
        are let go once packed, so the packed copy replaces it.)"""
        limit = self.backend.pack_max_positions
        if limit is None or self.file_mapping or self._gemm_ok(shape):
            return False
        if self.weight.numel() * self.weight.element_size() >= LARGE_WEIGHT_BYTES:
            limit = min(limit, self.backend.pack_max_positions_large)
        ho, wo = kernels.conv_output_size(self, shape)
        return shape[0] * ho * wo > limit

    def _gemm_ok(self, shape):
        """True when a call on inputs of `shape` takes `gemm_conv`: a kxk convolution (k > 1) with few outputs."""
        ho, wo = kernels.conv_output_size(self, shape)
        return (self.backend.tiny_conv_gemm and self.kernel_size != (1, 1) and self.groups == 1
                and self.dilation == (1, 1) and shape[0] * ho * wo <= kernels.GEMM_MAX_ROWS)

    def forward(self, x, residual=None, shift=None):
        if self._plain_path(x):
            y = super().forward(x)
        else:
            bias = self.bias
            if shift is not None and shift.dtype == x.dtype and bool((shift == shift[:1]).all()):
                bias = shift[0] if bias is None else bias + shift[0]
                shift = None
            out_shape = (x.shape[0], self.out_channels, *kernels.conv_output_size(self, x.shape))
            fuse = residual is not None and kernels.fusable(residual, out_shape, x)
            if self._gemm_ok(x.shape):
                y = kernels.gemm_conv(x, self.weight_form("gemm"), self.kernel_size, self.stride, self.padding, bias,
                                      residual if fuse else None)
            else:
                if self._plain_ok(x.shape):
                    self.__dict__.pop("_form", None)  # a packed copy for another shape is not kept beside it
                    weight = self.weight
                    # channels-last in, so channels-last out, as from a packed weight (from an NCHW input a plain
                    # weight gives NCHW, and every layer after it runs slower: the v1 decode 9 s -> 11 s)
                    x = x.contiguous(memory_format=torch.channels_last)
                else:
                    weight = self.weight_form("packed", x.shape)
                y = kernels.conv(x, weight, bias, self.padding, self.stride, self.dilation, self.groups,
                                 residual if fuse else None)
            if fuse:
                residual = None
        if shift is not None:
            y = y + shift.to(y.dtype)[:, :, None, None]
        return y if residual is None else y + residual


def _linear(layer, x, residual=None):
    """layer(x) + residual, summed in the matmul's epilogue when the layer and the options allow."""
    if residual is not None and isinstance(layer, OneDNNLinear) and layer.backend.epilogues:
        return layer(x, residual)
    y = layer(x)
    return y if residual is None else y + residual


def _conv(layer, x, residual=None, shift=None):
    """layer(x) + shift[:, :, None, None] + residual, in the convolution's epilogue when allowed."""
    if isinstance(layer, PackedConv2d) and layer.backend.epilogues:
        return layer(x, residual, shift)
    y = layer(x)
    if shift is not None:
        y = y + shift[:, :, None, None]
    return y if residual is None else y + residual


# ----------------------------------------------------------------------------- attention


class Attention:
    """What the attention modules share: softmax(q k^T / sqrt(d)) v by the kernel the options pick."""

    fused = None  # a kernels.FusedAttention shared by the model's attention modules (set by optimize)
    _transient = ("fused",)

    def attend(self, q, k, v):  # (b, h, n, d) each
        opts = self.backend
        # bfloat16 on the oneDNN path stays bfloat16: it has float32's range (no overflow to avoid), and
        # oneDNN computes it at twice the speed
        onednn_bf16 = opts.onednn and q.dtype == torch.bfloat16 and v.dtype == q.dtype and kernels.fast(q, k)
        if opts.fp32_attention and not onednn_bf16 and (q.dtype in (torch.float16, torch.bfloat16)
                                                        or (q.is_cuda and torch.is_autocast_enabled("cuda"))):
            with torch.autocast(q.device.type, enabled=False):
                return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        if opts.onednn:
            return kernels.attention(q, k, v, fused=self.fused if opts.fused_attention else None,
                                     blocked=opts.blocked_attention, sdpa_without_avx512=opts.sdpa_without_avx512,
                                     fused_blocks=opts.fused_attention_blocks, native=opts.native_attention)
        return F.scaled_dot_product_attention(q, k, v)


class FastCrossAttention(Attention, Derived, CrossAttention):
    """CrossAttention with the residual in to_out's epilogue and the text's keys and values kept across steps."""

    _derived = ("_kv",)

    def keys_values(self, context):
        """to_k(context), to_v(context); kept from the previous call while the context tensor and both
        weights are unchanged (`kv_reuse`)."""
        if (not self.backend.kv_reuse or kernels.recording(context) or torch.is_grad_enabled()
                or context.is_inference()):  # a change could go unseen: compute afresh
            self.__dict__.pop("_kv", None)
            return self.to_k(context), self.to_v(context)
        key = (kernels.tensor_key(context), kernels.tensor_key(self.to_k.weight), kernels.tensor_key(self.to_v.weight))
        kv = self.__dict__.get("_kv")
        if kv is None or kv[0] is not context or kv[1] != key:
            self.__dict__.pop("_kv", None)
            self._kv = (context, key, self.to_k(context), self.to_v(context))
        return self._kv[2], self._kv[3]

    def forward(self, x, context=None, residual=None):
        q = self.to_q(x)
        k, v = (self.to_k(x), self.to_v(x)) if context is None else self.keys_values(context)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = rearrange(self.attend(q, k, v), "b h n d -> b n (h d)")
        return _linear(self.to_out[0], out, residual)  # to_out[1] is an identity


class FastGEGLU(Derived, GEGLU):
    def forward(self, x):
        proj = self.proj
        if (self.backend.epilogues and self.backend.onednn and isinstance(proj, OneDNNLinear)
                and kernels.fast(x, proj.weight)):
            halves = proj.bf16_weight(2) if x.dtype == torch.bfloat16 else None
            return kernels.geglu(x, proj.weight, proj.bias, halves)
        return super().forward(x)


FF_CHUNK_BYTES = HEAP_MMAP_THRESHOLD  # largest inner activation of `token_chunks`: a block glibc serves from its heap


class FastFeedForward(Derived, FeedForward):
    def forward(self, x, residual=None):
        rows, inner = x.numel() // x.shape[-1], self.net[2].in_features
        n = -(-rows * inner * x.element_size() // FF_CHUNK_BYTES)  # blocks of tokens for `token_chunks`
        if n <= 1 or not self.backend.token_chunks or not x.is_contiguous() or x.device.type != "cpu":
            return _linear(self.net[2], self.net[0](x), residual)  # net[1] is an identity
        flat = x.view(rows, x.shape[-1])
        skips = [None] * n if residual is None else residual.reshape(rows, residual.shape[-1]).chunk(n)
        outs = [_linear(self.net[2], self.net[0](xs), rs) for xs, rs in zip(flat.chunk(n), skips)]
        return torch.cat(outs).view(*x.shape[:-1], outs[0].shape[-1])


class FastTransformerBlock(Derived, BasicTransformerBlock):
    """The block with its residuals in the epilogues, fanning x out to k contexts at the cross-attention."""

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x), residual=x)
        if context is not None and context.shape[0] != x.shape[0]:  # each latent under k contexts: fan out here
            x = fan_out(x, context.shape[0] // x.shape[0])  # (k*B, N, C)
        x = self.attn2(self.norm2(x), context=context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class FastSpatialTransformer(Derived, SpatialTransformer):
    def forward(self, x, context=None):
        B, _, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = rearrange(h, "b c h w -> b (h w) c")
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context=context)
        x = fan_out(x, h.shape[0] // B)  # the residual follows a fan-out inside the blocks
        if self.use_linear:
            return x + rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=H, w=W)
        return _conv(self.proj_out, rearrange(h, "b (h w) c -> b c h w", h=H, w=W), residual=x)


class PhaseUpsample(Derived):
    """conv(nearest 2x upsampling of x) as four 2x2 convolutions of x, one per output phase: a mixin over
    an upsampler with a 3x3 `conv` (the UNet's and the autoencoder decoder's, below)."""

    _derived = ("_phases",)
    hint = None  # the input shape the phase kernels were first packed for (set by optimize)

    def _applies(self, x):
        c = self.conv
        return (self.backend.phase_upsample and self.backend.onednn and isinstance(c, PackedConv2d)
                and kernels.fast(x, c.weight)
                and x.dim() == 4 and c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1)
                and c.dilation == (1, 1) and c.groups == 1 and c.padding_mode == "zeros")

    def phase_kernels(self, gemm, input_shape):
        """The four phase kernels, in the form the call takes: laid out for `gemm_conv`, or packed for
        oneDNN's convolution of inputs like `input_shape` (kept while the weight stays)."""
        key = (kernels.tensor_key(self.conv.weight), gemm, None if gemm else tuple(input_shape))
        kept = self.__dict__.get("_phases")
        if kept is None or kept[0] != key:
            self.__dict__.pop("_phases", None)
            N, C, H, W = input_shape
            weights = kernels.phase_weights(self.conv.weight)
            if gemm:
                value = [kernels.gemm_layout(w) for w in weights]
            else:
                value = [kernels.pack_conv_weight(w, (0, 0), (1, 1), (1, 1), 1, (N, C, H + 1, W + 1)) for w in weights]
            self._phases = (key, value)
            if self.file_mapping:
                release_file_pages(self.conv.weight, self.file_mapping)
        return self._phases[1]

    def _gemm(self, shape):
        N, _, H, W = shape
        return self.backend.tiny_conv_gemm and N * H * W <= kernels.GEMM_MAX_ROWS

    def pack(self, input_shape):
        self.hint = tuple(input_shape)
        self.phase_kernels(self._gemm(self.hint), self.hint)

    def forward(self, x):
        if not self._applies(x):
            return super().forward(x)
        gemm = self._gemm(x.shape)
        kernels_ = self.phase_kernels(gemm, x.shape)
        return kernels.upsampled_conv(x, kernels_, self.conv.bias, self.conv.out_channels, gemm)


class UNetPhaseUpsample(PhaseUpsample, Upsample):
    pass


class DecoderPhaseUpsample(PhaseUpsample, autoencoder.Upsample):
    pass


class FastResnetBlock(Derived, autoencoder.ResnetBlock):
    """The autoencoder's ResnetBlock with its SiLUs in place on the GroupNorms' fresh outputs and the
    shortcut summed in conv2's epilogue: two passes over the block's maps fewer."""

    def forward(self, x):
        if kernels.records_grad(x, self.conv1.weight):  # SiLUs in place: inference only
            return super().forward(x)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return _conv(self.conv2, F.silu(self.norm2(h), inplace=True), residual=shortcut)  # shortcut + conv2(...)


class FastResBlock(Derived, ResBlock):
    def forward(self, x, emb):
        norm, act, conv = self.in_layers
        h = _conv(conv, act(norm(x)), shift=self.emb_layers(emb))  # in_layers(x) + emb_layers(emb)[:, :, None, None]
        out = self.out_layers
        return _conv(out[3], out[2](out[1](out[0](h))), residual=self.skip_connection(x))  # skip(x) + out_layers(h)


class FastGroupNorm32(Derived, GroupNorm32):
    def forward(self, x):
        if (self.backend.half_groupnorm and x.is_cuda and x.dtype == self.weight.dtype
                and x.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled("cuda")):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if self.backend.onednn and x.dtype == torch.bfloat16 and kernels.fast(x, self.weight):
            # the CPU kernel keeps bfloat16's statistics in float32 itself: no float32 copy in and out
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


class FastUNet(Derived, UNetModel):
    """The UNet taking B latents with k*B contexts (`fan_out`), run eagerly, compiled or from CUDA graphs."""

    _derived = ("_runner",)  # dropped by .to(): CUDA graphs read the weights at the addresses they were captured at

    def forward(self, x, timesteps, context, y=None):
        runner = self.__dict__.get("_runner")
        if runner is None:
            from .cuda import runner_for  # the compiled / graphed step, made on first use after optimize or .to()

            runner = self._runner = runner_for(self)
        return runner(x, timesteps, context) if y is None else runner(x, timesteps, context, y)

    def fast_forward(self, x, timesteps, context, y=None):
        """eps for latents x [B] at timesteps [B] under contexts [k*B] (unconditional rows first under
        guidance): that of the reference on x, timesteps and y repeated k times, with the layers before
        the first cross-attention run once per latent when `fan_out` is on. y [k*B] (a vector per context,
        as SDXL's guidance gives) is taken as it is, and then every layer runs on k*B."""
        B = x.shape[0]
        if context.shape[0] % B or timesteps.shape[0] != B:
            raise ValueError(f"UNetModel: {B} latents and {timesteps.shape[0]} timesteps for {context.shape[0]} contexts")
        k = context.shape[0] // B
        per_context_y = k > 1 and y is not None and y.shape[0] == context.shape[0]  # SDXL guided: y differs per context
        if k > 1 and (per_context_y or not self.backend.fan_out):  # then the embeddings differ from the first layer
            x, timesteps = fan_out(x, k), fan_out(timesteps, k)
            y = y if y is None or per_context_y else fan_out(y, k)
        emb = self.embedding(timesteps, y, x.dtype)
        h, skips = x, []
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


class FastAttnBlock(Attention, Derived, AttnBlock):
    """The autoencoder's single-head attention over pixels, through the backend's attention kernels."""

    def forward(self, x):
        _, _, H, W = x.shape
        h = self.norm(x)
        q, k, v = (rearrange(proj(h), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))
        h = rearrange(self.attend(q, k, v), "b 1 (h w) c -> b c h w", h=H, w=W)
        return x + self.proj_out(h)


# reference class -> fused class; the leaves only with `onednn` (the others read their levers at call time)
COMPOSITE = {
    GroupNorm32: FastGroupNorm32, CrossAttention: FastCrossAttention, GEGLU: FastGEGLU, FeedForward: FastFeedForward,
    BasicTransformerBlock: FastTransformerBlock, SpatialTransformer: FastSpatialTransformer, Upsample: UNetPhaseUpsample,
    ResBlock: FastResBlock, UNetModel: FastUNet, AttnBlock: FastAttnBlock,
    autoencoder.Upsample: DecoderPhaseUpsample, autoencoder.ResnetBlock: FastResnetBlock,
}
LEAVES = {nn.Linear: OneDNNLinear, nn.Conv2d: PackedConv2d}
