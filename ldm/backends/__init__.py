"""Fast paths as a pass over the reference model: `optimize(model, BackendOptions(...)) -> model`.

    from ldm.backends import BackendOptions, optimize
    model = optimize(load_model(config, ckpt), BackendOptions.from_env())   # the CLI's choice
    eps = model.apply_model(x, t, torch.cat([uncond, cond]))               # B latents, 2B contexts

`optimize` changes the class of each module it speeds up to a subclass that overrides `forward`
only (`ldm.backends.modules`), and packs the convolution weights for oneDNN right away (so the
first sampling step does not pay for it). It returns the same object: the model is changed in
place, its parameters, buffers and `state_dict()` untouched (same keys, same tensors).
`deoptimize` turns it back into the reference model; `refresh` rebuilds everything derived from
the weights after they were changed in place (a LoRA merged into them, say) — changes are also
noticed at the next call, but refresh does the packing up front.

The optimized UNet also accepts k*B contexts for B latents (each latent under each context, as
classifier-free guidance asks), which the reference does not: `fans_out(model)` tells a caller
which contract a model has.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..models.autoencoder import AutoencoderKL, Decoder
from ..models.autoencoder import Upsample as DecoderUpsample
from ..models.unet import UNetModel
from . import kernels
from .modules import (COMPOSITE, LEAVES, Derived, FastCrossAttention, FastGEGLU, FastUNet, OneDNNLinear, PackedConv2d,
                      PhaseUpsample)
from .memory import containing_mapping, private_file_mappings, release_file_pages
from .options import BackendOptions

__all__ = ["BackendOptions", "optimize", "deoptimize", "refresh", "fans_out", "is_optimized"]

log = logging.getLogger(__name__)

_REFERENCE = {fast: ref for ref, fast in {**COMPOSITE, **LEAVES}.items()}
_ADDED = ("backend", "fused", "hint", "file_mapping", "_form", "_kv", "_phases", "_runner", "_bf16")  # instance attributes optimize may add


def is_optimized(model: nn.Module) -> bool:
    return any(isinstance(m, Derived) for m in model.modules())


def fans_out(model: nn.Module) -> bool:
    """True when the model's UNet takes B latents with k*B contexts (an optimized one does)."""
    return any(isinstance(m, FastUNet) for m in model.modules())


def optimize(model: nn.Module, options: BackendOptions | None = None) -> nn.Module:
    """Swap the fused modules into `model` (a LatentDiffusion, a UNetModel, or any module tree made of
    ours) as `options` say, pack the convolution weights, and return the same model, changed in place.

    An already optimized model is first turned back (`deoptimize`), so this also changes options; one
    optimized with the same options is returned as it is.
    """
    options = options or BackendOptions()
    onednn = options.onednn and kernels.onednn_available()
    current = {m.backend for m in model.modules() if isinstance(m, Derived)}
    if current == {options.replace(onednn=onednn)}:
        return model
    if current:
        deoptimize(model)
    if options.onednn and not onednn:
        log.info("this torch has no oneDNN inference ops: the CPU kernels stay off")
    hints = {}
    if onednn and options.prepack_latent_size:
        hints = _input_shapes(model, options.prepack_latent_size, options.fan_out)
    shared_fused = kernels.FusedAttention()
    for m in model.modules():
        fast = COMPOSITE.get(type(m)) or (LEAVES.get(type(m)) if onednn else None)
        if fast is None:
            continue
        m.__class__ = fast
        m.backend = options.replace(onednn=onednn)
        if hasattr(fast, "attend"):
            m.fused = shared_fused
    t0 = time.perf_counter()
    n = _pack(model, hints)
    if n:
        log.info("packed %d convolution weights for oneDNN in %.1f s", n, time.perf_counter() - t0)
    return model


def deoptimize(model: nn.Module) -> nn.Module:
    """Turn an optimized model back into the reference model (in place; returns it)."""
    for m in model.modules():
        ref = _REFERENCE.get(type(m))
        if ref is None:
            continue
        for name in _ADDED:
            m.__dict__.pop(name, None)
        m.__class__ = ref
    return model


def refresh(model: nn.Module) -> nn.Module:
    """Rebuild what an optimized model derived from its weights (packed and rearranged weights, kept
    keys and values), after weights were changed in place; returns the model."""
    for m in model.modules():
        if isinstance(m, (PackedConv2d, PhaseUpsample, FastCrossAttention, OneDNNLinear)):
            m.clear_derived()
    _pack(model, None)
    return model


def _phase_convs(model):
    """The convolutions that run only as phase kernels (their plain packed form is never needed)."""
    return {id(m.conv) for m in model.modules()
            if isinstance(m, PhaseUpsample) and m.backend.phase_upsample and isinstance(m.conv, PackedConv2d)}


def _pack(model, hints):
    """Pack each conv weight (or its phase kernels) for its input shape: from `hints`, or for the shape
    it was packed for before (None); returns how many."""
    phase_only = _phase_convs(model)
    mappings = private_file_mappings()  # read once: /proc/self/maps is long
    packed = []
    for m in model.modules():
        if isinstance(m, PhaseUpsample):
            if id(m.conv) not in phase_only:
                continue
        elif not isinstance(m, PackedConv2d) or id(m) in phase_only:
            continue
        weight = m.conv.weight if isinstance(m, PhaseUpsample) else m.weight
        m.file_mapping = containing_mapping(weight, mappings)  # for packing later (a first use, another shape)
        hint = m.hint if hints is None else hints.get(id(m))
        if hint is None or not kernels.fast_dtype(weight.dtype):  # a weight the oneDNN path will not take
            continue
        with torch.no_grad():
            if m.pack(hint) is False:  # runs on its plain weight at that size: nothing packed
                continue
        packed.append(weight)
    release_file_pages(packed, mappings)  # the plain copies are not read again: no need to keep them resident
    if hints is None or hints:
        _pack_bf16_linears(model, mappings)
    return len(packed)


def _pack_bf16_linears(model, mappings):
    """Pack the bfloat16 Linear weights for oneDNN now (float32 ones are used as they are), and let go of the
    pages of the plain weights that are views of a file (the loader's scratch file of converted weights)."""
    halved = {id(m.proj) for m in model.modules() if isinstance(m, FastGEGLU) and m.backend.epilogues}
    for m in model.modules():
        if (isinstance(m, OneDNNLinear) and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"
                and kernels.fast_dtype(m.weight.dtype)):
            m.file_mapping = containing_mapping(m.weight, mappings)  # bf16_weight lets its pages go once packed
            with torch.no_grad():
                m.bf16_weight(2 if id(m) in halved else 1)


@torch.no_grad()
def _input_shapes(model, size, fan_out):
    """{id(module): input shape} of every conv and UNet upsampler of the model's UNets and decoders in
    one sampling step at a latent of `size` (an int, or (height, width)) under guidance (one latent, two contexts: with `fan_out`
    the layers before the first cross-attention see batch 1, the others 2).

    Found by running the (reference) modules once on a small latent and scaling the recorded maps:
    every map of a fully convolutional network scales with its input.
    """
    from ..models.unet import BasicTransformerBlock, Upsample

    sh, sw = (size, size) if isinstance(size, int) else size
    shapes = {}
    for top in model.modules():
        if sh <= 0 or sw <= 0:
            break
        if isinstance(top, UNetModel):
            if sh % top.downsample_factor or sw % top.downsample_factor:
                continue  # a size this UNet cannot take: its weights are packed at their first call
            small = 2 * top.downsample_factor  # 2x2 maps at the deepest level: GroupNorm needs 2 values a group
            p = next(top.parameters())
            args = [torch.zeros(1, top.in_channels, small, small), torch.zeros(1), torch.zeros(1, 1, top.context_dim)]
            if top.num_classes is not None:
                args.append(torch.zeros(1, top.label_emb[0][0].in_features))
            batch = {"n": 1 if fan_out and top.num_classes is None else 2}  # SDXL: y per context, no fan-out
            fanned = [m.attn2 for m in top.modules() if isinstance(m, BasicTransformerBlock)] + [top.middle_block]
        elif isinstance(top, Decoder):
            p = top.conv_in.weight
            small = 2
            args = [torch.zeros(1, top.conv_in.in_channels, small, small)]
            batch, fanned = {"n": 1}, []
        elif isinstance(top, AutoencoderKL):
            shapes[id(top.post_quant_conv)] = (1, top.post_quant_conv.in_channels, sh, sw)
            continue
        else:
            continue
        if p.device.type != "cpu" or not kernels.fast_dtype(p.dtype):
            continue
        args = [a.to(p.dtype) if a.is_floating_point() and a.dim() > 1 else a for a in args]  # bfloat16 weights: inputs too

        def record(m, inputs, batch=batch, small=small):
            _, c, h, w = inputs[0].shape
            shapes[id(m)] = (batch["n"], c, h * sh // small, w * sw // small)

        def fan(m, inputs, batch=batch):
            batch["n"] = 2

        hooks = [m.register_forward_pre_hook(record) for m in top.modules() if isinstance(m, (nn.Conv2d, Upsample, DecoderUpsample))]
        hooks += [m.register_forward_pre_hook(fan) for m in fanned]
        try:
            top(*args)
        finally:
            for h in hooks:
                h.remove()
    return shapes
