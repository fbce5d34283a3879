"""BackendOptions: which fast paths `ldm.backends.optimize` puts into a model. An explicit object, passed
from the entry point; library code reads no environment variable and keeps no switch in a global."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class BackendOptions:
    """The levers of the backend pass, each on by default where it measured faster (bench/README.md).

    CPU float32, and bfloat16 where oneDNN computes it (AVX512-BF16 or AMX; `kernels.bf16_available`). Each
    needs `onednn`; a call in another dtype (float16; bfloat16 on a CPU without it), on another device,
    recording autograd or traced by torch.compile takes the reference computation:

    - `onednn`: every Linear runs oneDNN's matmul and every Conv2d a oneDNN convolution whose weight is
      reordered into oneDNN's layout once (at optimize time, see `prepack_latent_size`), not at every call.
      Off: nn.Linear and nn.Conv2d as they are, and none of the levers below that name oneDNN.
    - `epilogues`: residual sums (x + attn(...), x + ff(...), skip + out_layers, the transformer's
      residual), the ResBlock's timestep-embedding shift (folded into the bias when it is the same for
      every sample) and GEGLU's GELU and product computed in the epilogue of the product before them.
    - `fused_attention`: oneDNN Graph's fused attention kernel up to 1024 keys.
    - `blocked_attention`: attention over 256 keys or more (where the fused kernel does not apply) as two
      oneDNN matmuls per head and block of queries, in linear memory.
    - `fused_attention_blocks`: that blocked attention (where `blocked_attention` and, with AVX-512,
      `fused_attention` are on) as the fused kernel on blocks of queries instead of two matmuls and a
      softmax per head and block: the same speed on a quiet machine, about 2x faster beside other busy
      processes (one call for all heads: fewer waits at thread barriers).
    - `native_attention`: attention beyond 1024 keys (the 4096-token layers at 512x512), float32, heads of
      up to 64 channels, by our own C kernel (`ldm.backends.native`, compiled on first use; where it cannot
      be, the kernels below take its place), in AVX-512 where the kernels run it, else in AVX2: natively
      1.45 to 1.8x faster than the fused blocks on a guided layer of v1 at 512x512, 2.3 to 3.3x on the layer
      that runs once per latent; under AVX2 1.14 to 1.18x faster than SDPA's flash kernel (bench/README.md,
      "Attention of our own").
    - `sdpa_without_avx512`: where the CPU kernels lack AVX-512 (an AVX2 machine, or oneDNN capped with
      ONEDNN_MAX_CPU_ISA=AVX2: `kernels.avx512()`), attention that the fused kernel does not take (beyond
      1024 keys: the 4096-token layers at 512x512) runs SDPA's flash kernel instead of the blocked matmuls,
      1.1 to 1.4x faster there; with AVX-512 the blocks stay (SDPA is 1.4x slower there).
    - `phase_upsample`: each upsampler of the UNet and of the autoencoder's decoder (nearest 2x, then 3x3
      conv) as four 2x2 convolutions of the small map, one per output phase: 4/9 of the FLOPs, no
      upsampled copy (the v1 decoder's three at 512x512: 0.82 -> 0.48 s and 0.91 -> 0.62 s for the two
      largest, `bench/README.md`).
    - `token_chunks`: on the CPU, a feed-forward whose inner activations (4x the width, GEGLU's gate
      and product) would exceed 32 MB runs over blocks of tokens that keep them under it: glibc serves
      those blocks from its heap, reused step after step, where each larger one is a mapping of its own,
      faulted in and zeroed at every call (`ldm.backends.memory.set_heap_defaults`). At 512x512 the
      4096-token layers' [2, 4096, 1280] activations (42 MB): 2 blocks of 4096 rows; the up-projection
      then took 16-20 ms a call instead of 31 (bench/README.md).
    - `tiny_conv_gemm`: a convolution with at most 64 output positions (batch included) as one matmul.
    - `prepack_latent_size`: the latent size, a side or (height, width) (64: a 512x512 image), whose layer
      shapes the conv weights are packed for at optimize time. oneDNN's layout depends on the input
      shape, so a call at another size re-packs a weight once (the first step at that size pays for
      it). None: pack each weight at its first call instead.
    - `pack_max_positions`: a convolution whose output has more positions than this (batch x height x
      width), and whose weight is not a view of a mapped file, is not packed: it hands oneDNN its plain
      weight, reordered for that call only. On maps that large (16384 positions and more) the plain
      weight measured within 1 % of the packed one, while the packed copy would be a second copy of the
      weight in memory: a weight converted from a float16 file cannot be let go as a mapped one's pages
      are. `pack_max_positions_large`: the same for weights of 32 MiB or more (SDXL's 1280-channel
      layers, whose maps are 2048 positions at 1024x1024). With both, v1's UNet at 512x512 packs every
      weight (its largest maps are 8192 positions), and SDXL at 1024x1024 keeps 25 fewer copies: a
      peak 1.4 GB lower (bench/README.md, "SDXL at 1024x1024"). None: pack every convolution.

    bfloat16 on the CPU (`--precision bf16`: the model's weights are bfloat16): every lever above runs in
    bfloat16 on the same terms, its products accumulated in float32 by oneDNN, with these differences:
    the Linear weights are packed into oneDNN's layout too (once, at optimize time: a plain bfloat16
    weight would be reordered at every call); GroupNorm runs on the bfloat16 activations directly (the
    CPU kernel keeps its statistics in float32) instead of through a float32 copy; attention runs in
    bfloat16 through the same kernels, softmax included, whatever `fp32_attention` says (bfloat16 has
    float32's range: nothing overflows). Results are within bfloat16 rounding of float32 (about 2e-2 of
    the largest eps on the tests' tiny UNet; bench/README.md has the images).

    Any device:

    - `fan_out`: the optimized UNet takes B latents with k*B contexts (classifier-free guidance: k = 2,
      unconditional rows first) and denoises each latent under each context, running the layers before
      the first cross-attention once per latent instead of k times. Off: the latents are repeated.
    - `kv_reuse`: cross-attention keeps to_k(text) and to_v(text) from one step to the next while the
      context tensor and both weights are unchanged (never while autograd records, a graph is captured
      or torch.compile traces, nor for inference tensors, which have no version counter).
    - `fp32_attention`: half-precision attention computed in float32 (SD 2.x overflows float16 there);
      bfloat16 on the CPU's oneDNN path stays bfloat16 (see above).
    - `half_groupnorm`: on CUDA, a float16/bfloat16 GroupNorm without the float32 round trip of the
      reference (the CUDA kernel keeps its statistics in float32 anyway). Off by default: unmeasured.
    - `cuda_graphs`: the UNet replays each step from a CUDA graph captured once per input shape
      (`ldm.backends.cuda.CUDAGraphs`); a no-op off CUDA.
    - `compile`: torch.compile the UNet (falls back to eager, with a warning, if compiling fails).
    """

    onednn: bool = True
    epilogues: bool = True
    fused_attention: bool = True
    blocked_attention: bool = True
    sdpa_without_avx512: bool = True
    fused_attention_blocks: bool = True
    native_attention: bool = True
    phase_upsample: bool = True
    token_chunks: bool = True
    tiny_conv_gemm: bool = True
    prepack_latent_size: int | tuple[int, int] | None = 64
    pack_max_positions: int | None = 8192
    pack_max_positions_large: int = 1024
    fan_out: bool = True
    kv_reuse: bool = True
    fp32_attention: bool = True
    half_groupnorm: bool = False
    cuda_graphs: bool = False
    compile: bool = False

    LEVERS = ("onednn", "epilogues", "fused_attention", "blocked_attention", "sdpa_without_avx512",
              "fused_attention_blocks", "native_attention", "phase_upsample", "token_chunks",
              "tiny_conv_gemm", "fan_out", "kv_reuse", "fp32_attention", "half_groupnorm")

    @classmethod
    def from_env(cls, environ=None, **overrides) -> BackendOptions:
        """The defaults, with `LDM_ONEDNN=0` turning the oneDNN kernels off; for the entry point to call once."""
        environ = os.environ if environ is None else environ
        if environ.get("LDM_ONEDNN", "1") == "0":
            overrides.setdefault("onednn", False)
        return cls(**overrides)

    @classmethod
    def none(cls) -> BackendOptions:
        """Every lever off: the optimized model computes what the reference does (and accepts k*B contexts)."""
        return cls(**{name: False for name in cls.LEVERS})

    def replace(self, **changes) -> BackendOptions:
        return dataclasses.replace(self, **changes)
