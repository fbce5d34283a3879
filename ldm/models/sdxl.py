"""Stable Diffusion XL (base and refiner): sgm's `DiffusionEngine`, inference half, and its conditioner.

The configs are generative-models' `sd_xl_base.yaml` / `sd_xl_refiner.yaml`, unchanged. The module
tree reproduces the single-file checkpoint keys:

    model.diffusion_model.*                              the UNet (ldm.models.unet, with label_emb)
    conditioner.embedders.0.transformer.text_model.*     CLIP ViT-L/14 (base only)
    conditioner.embedders.1.model.*                      OpenCLIP ViT-bigG/14 (refiner: embedders.0)
    first_stage_model.*                                  the autoencoder (as v1's)

Conditioning (what `GeneralConditioner` computes, for inference):

    context [B, 77 n, 2048]  CLIP-L hidden layer 11 (no final norm) ++ bigG penultimate layer (no ln_final)
                             (the refiner: bigG alone, 1280)
    y [B, adm_in_channels]   bigG pooled (ln_final at the end-of-text token @ text_projection, 1280)
                             ++ 256-wide sinusoidal embeddings of each number of original_size (h, w),
                             crop_coords_top_left (top, left), target_size (h, w): 2816 in all;
                             the refiner has aesthetic_score (one number) in place of target_size: 2560.

The denoiser is sgm's `DiscreteDenoiser` with `EpsScaling` over `LegacyDDPMDiscretization`: on the
1000 training timesteps that is exactly v1's eps-prediction with the scaled-linear schedule
0.00085..0.012, so the engine carries the same schedule buffers as `LatentDiffusion` and every
sampler runs unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import instantiate
from .clip import FrozenCLIPEmbedder as _CLIPEmbedder
from .clip import lookup
from .diffusion import DiffusionWrapper, ScheduledModel
from .open_clip import FrozenOpenCLIPEmbedder as _OpenCLIPEmbedder
from .unet import timestep_embedding

EOS = 49407  # CLIP's end-of-text token: OpenCLIP pools at its first occurrence (embedding placeholders are larger)

# ----------------------------------------------------------------------------- the denoiser (no weights)


class LegacyDDPMDiscretization:
    """sgm's discretization of the DDPM training schedule (scaled-linear betas, as v1)."""

    def __init__(self, linear_start=0.00085, linear_end=0.0120, num_timesteps=1000):
        self.linear_start, self.linear_end, self.num_timesteps = linear_start, linear_end, int(num_timesteps)


class EpsScaling:
    """The network predicts the noise eps."""

    parameterization = "eps"


class VScaling:
    """The network predicts v = sqrt(a) eps - sqrt(1 - a) x0."""

    parameterization = "v"


class DiscreteDenoiser:
    """sgm's denoiser over the discrete training timesteps: what the UNet predicts and on which schedule.

    Its `sigmas` buffer is derived from the schedule (the loader drops a stored copy)."""

    def __init__(self, scaling_config, num_idx, discretization_config, do_append_zero=False, quantize_c_noise=True,
                 flip=True):
        self.scaling = instantiate(scaling_config)
        self.discretization = instantiate(discretization_config)
        if int(num_idx) != self.discretization.num_timesteps:
            raise ValueError(f"DiscreteDenoiser: num_idx {num_idx} differs from the schedule's "
                             f"{self.discretization.num_timesteps} timesteps")
        if not quantize_c_noise:
            raise ValueError("DiscreteDenoiser: quantize_c_noise=False (continuous timesteps) is not supported")
        self.num_idx = int(num_idx)


# ----------------------------------------------------------------------------- embedders


class FrozenCLIPEmbedder(_CLIPEmbedder):
    """sgm's `FrozenCLIPEmbedder`: CLIP ViT-L/14 (`transformer.text_model.*`); with layer="hidden" the
    output of the first `layer_idx` encoder layers, without the final layer norm (SDXL: 11 of 12)."""

    def __init__(self, version="openai/clip-vit-large-patch14", device=None, max_length=77, freeze=True, layer="last",
                 layer_idx=None, always_return_pooled=False, vocab_size=49408, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=3072, hidden_act="quick_gelu"):
        super().__init__(version=version, max_length=max_length, vocab_size=vocab_size, hidden_size=hidden_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         intermediate_size=intermediate_size, hidden_act=hidden_act)
        if layer not in ("last", "hidden"):
            raise ValueError(f"FrozenCLIPEmbedder: layer={layer!r} is not supported (last or hidden)")
        if always_return_pooled:
            raise ValueError("FrozenCLIPEmbedder: always_return_pooled is not supported (no SDXL model uses it)")
        n = len(self.transformer.text_model.encoder.layers)
        if layer == "hidden":
            if layer_idx is None or not -n - 1 <= layer_idx <= n:
                raise ValueError(f"FrozenCLIPEmbedder: layer_idx {layer_idx} is not in [-{n + 1}, {n}]")
        self.layer = layer
        self.n_layers = (layer_idx % (n + 1)) if layer == "hidden" else n

    def encode_ids(self, ids, vectors=None):
        """Token ids [B, T] -> hidden states [B, T, 768]: layer `layer_idx` (hidden) or after the final norm (last).

        `vectors` [n, 768]: textual-inversion vectors for the ids vocab_size + k (see clip.lookup)."""
        text = self.transformer.text_model
        device = text.embeddings.position_ids.device
        x = text.embeddings(ids.to(device), None if vectors is None else vectors.to(device))
        for layer in text.encoder.layers[: self.n_layers]:
            x = layer(x)
        return text.final_layer_norm(x) if self.layer == "last" else x


class FrozenOpenCLIPEmbedder2(_OpenCLIPEmbedder):
    """sgm's `FrozenOpenCLIPEmbedder2` with `legacy: False`: OpenCLIP ViT-bigG/14 (`model.*`) giving the
    penultimate layer's hidden states without ln_final, and the pooled embedding
    ln_final(last layer)[end-of-text] @ text_projection."""

    def __init__(self, arch="ViT-H-14", version="laion2b_s32b_b79k", device=None, max_length=77, freeze=True,
                 layer="last", always_return_pooled=False, legacy=True, width=None, layers=None, heads=None,
                 embed_dim=None, vocab_size=None):
        if legacy:
            raise ValueError("FrozenOpenCLIPEmbedder2: legacy=True is not supported (SDXL sets legacy: False)")
        super().__init__(arch=arch, version=version, max_length=max_length, layer=layer, width=width, layers=layers,
                         heads=heads, embed_dim=embed_dim, vocab_size=vocab_size)
        self.return_pooled = bool(always_return_pooled)

    def unused_keys(self):
        return ["model.logit_scale"]  # the pooled output reads every block and the projection

    def encode_with_pooled(self, ids, vectors=None):
        """Token ids [B, T] -> (hidden states [B, T, width] of the chosen layer, pooled [B, embed_dim]).

        `vectors` [n, width]: textual-inversion vectors for the ids vocab_size + k (see clip.lookup). The
        pooled embedding is taken at the first end-of-text token (not the largest id: placeholders are larger)."""
        tower = self.model
        device = tower.positional_embedding.device
        ids = ids.to(device)
        vectors = None if vectors is None else vectors.to(device)
        x = lookup(tower.token_embedding, ids, vectors) + tower.positional_embedding[: ids.shape[1]]
        hidden = None
        for i, block in enumerate(tower.transformer.resblocks):
            if i == self.n_blocks:
                hidden = x
            x = block(x)
        hidden = x if hidden is None else hidden
        last = tower.ln_final(x)
        pooled = last[torch.arange(ids.shape[0], device=ids.device), (ids == EOS).int().argmax(dim=-1)] @ tower.text_projection
        return hidden, pooled

    def encode_ids(self, ids, vectors=None):
        return self.encode_with_pooled(ids, vectors)[0]


class ConcatTimestepEmbedderND(nn.Module):
    """Each number of an [B, n] input through a `outdim`-wide sinusoidal embedding, concatenated: [B, n * outdim]."""

    def __init__(self, outdim):
        super().__init__()
        self.outdim = int(outdim)

    def forward(self, x):
        x = torch.as_tensor(x)
        if x.ndim == 1:
            x = x[:, None]
        b, n = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, n * self.outdim)


TEXT_KEY = "txt"
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple", "aesthetic_score")
# What the conditioner's config entries may carry besides target and params (training switches).
_ENTRY_KEYS = {"target", "params", "input_key", "is_trainable", "ucg_rate", "legacy_ucg_value"}


class GeneralConditioner(nn.Module):
    """sgm's `GeneralConditioner`: the embedders in config order (`embedders.N.*`), each fed by its `input_key`."""

    def __init__(self, emb_models):
        super().__init__()
        embedders = []
        for n, entry in enumerate(emb_models):
            extra = set(entry) - _ENTRY_KEYS
            if extra:
                raise ValueError(f"GeneralConditioner: embedder {n} has unknown entries {', '.join(sorted(extra))}")
            key = entry.get("input_key")
            if key not in (TEXT_KEY, *SIZE_KEYS):
                raise ValueError(f"GeneralConditioner: embedder {n} has input_key {key!r}; supported: "
                                 f"{', '.join((TEXT_KEY, *SIZE_KEYS))}")
            embedder = instantiate({"target": entry["target"], "params": entry.get("params") or {}})
            text = isinstance(embedder, (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2))
            if text != (key == TEXT_KEY):
                raise ValueError(f"GeneralConditioner: embedder {n} ({entry['target']}) cannot take {key!r}")
            embedder.input_key = key
            embedders.append(embedder)
        self.embedders = nn.ModuleList(embedders)
        pooled = [e for e in self.text_encoders if getattr(e, "return_pooled", False)]
        if not self.text_encoders or len(pooled) > 1:
            raise ValueError("GeneralConditioner: expected text embedders with at most one pooled output")

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [e for e in self.embedders if e.input_key == TEXT_KEY]

    @property
    def pooled_encoder(self):
        """The text embedder whose pooled output goes into y (bigG), or None."""
        return next((e for e in self.text_encoders if getattr(e, "return_pooled", False)), None)

    @property
    def size_keys(self) -> list[str]:
        return [e.input_key for e in self.embedders if e.input_key != TEXT_KEY]

    @property
    def tokenizer(self):
        return self.text_encoders[0].tokenizer

    def encode_ids(self, ids, vectors=None):
        """Framed token ids [n, 77] -> ([hidden states of each text encoder], pooled [n, P] or None).

        Each encoder gets its own padding after the end-of-text token (CLIP-L: eos; OpenCLIP: 0).
        `vectors`: per text encoder, its textual-inversion vectors [k, width] (or None) for the
        placeholder ids vocab_size + k."""
        vectors = list(vectors) if vectors is not None else [None] * len(self.text_encoders)
        after_eos = (ids == EOS).int().cumsum(-1) - (ids == EOS).int() > 0
        hidden, pooled = [], None
        for encoder, extra in zip(self.text_encoders, vectors):
            own = ids.masked_fill(after_eos, encoder.tokenizer.pad_token_id)
            if encoder is self.pooled_encoder:
                h, pooled = encoder.encode_with_pooled(own, extra)
            else:
                h = encoder.encode_ids(own, extra)
            hidden.append(h)
        return hidden, pooled

    def vector(self, pooled, sizes: dict):
        """y [B, adm]: pooled [B, P] ++ the embedding of each size input ({input_key: numbers}), in config order."""
        parts = [pooled]
        for e in self.embedders:
            if e.input_key != TEXT_KEY:
                value = torch.as_tensor(sizes[e.input_key], dtype=torch.float32, device=pooled.device)
                parts.append(e(value.reshape(1, -1).expand(pooled.shape[0], -1)).to(pooled.dtype))
        return torch.cat(parts, dim=1)


# ----------------------------------------------------------------------------- the engine


class DiffusionEngine(ScheduledModel):
    """SDXL: UNet (`model.diffusion_model`), conditioner, autoencoder (`first_stage_model`) and the schedule.

    Offers what the pipeline and the samplers use of `LatentDiffusion` (`apply_model`, the schedule
    buffers, `decode_first_stage`, `parameterization`, `channels`), with the vector conditioning y.
    """

    def __init__(self, network_config, denoiser_config, first_stage_config, conditioner_config, scale_factor=1.0,
                 channels=4):
        super().__init__()
        self.model = DiffusionWrapper(instantiate(network_config))
        self.denoiser = instantiate(denoiser_config)  # plain object: no state-dict entries
        self.conditioner = instantiate(conditioner_config)
        self.first_stage_model = instantiate(first_stage_config)
        unet = self.model.diffusion_model
        if unet.num_classes != "sequential":
            raise ValueError("DiffusionEngine: the UNet needs num_classes 'sequential' for SDXL's vector conditioning")
        self.parameterization = self.denoiser.scaling.parameterization
        self.channels = channels
        self.scale_factor = float(scale_factor)
        d = self.denoiser.discretization
        self.linear_start, self.linear_end, self.num_timesteps = d.linear_start, d.linear_end, d.num_timesteps
        # The refiner (aesthetic-score conditioned) uses the negative prompt's text even when empty;
        # the base zeroes the unconditional text embeddings of an empty negative prompt (diffusers'
        # force_zeros_for_empty_prompt, sgm's force_uc_zero_embeddings=["txt"]).
        self.force_zeros_for_empty_prompt = "aesthetic_score" not in self.conditioner.size_keys
        self.reset_schedule()

