"""The device, the precision and the CPU threads a run uses.

The thread rule: a UNet step is hundreds of operators; with several OpenMP threads each operator
ends at a barrier where every thread waits for the others. On the demo model (1.1 M UNet
parameters, 8x8 latents) an operator is a few microseconds of work, so the barriers dominate,
and on a busy machine, where the other thread is often descheduled, a step at 2 threads took 10x
longer than at 1 (bench/README.md, "Threads"). The v1 UNet (860 M parameters) at 256x256 does
milliseconds of work per operator and scales to every core. The work of a step grows with the
UNet's parameters times the latent's pixels, so that product picks the count.
"""

from __future__ import annotations

import os

PRECISIONS = ("full", "autocast", "half", "bf16")

# UNet parameters x latent pixels below which a step runs on one thread. Measured on 2 cores beside a
# busy process, with libgomp not spinning (bench/README.md, "Threads"): the demo UNet (1.08e6 parameters)
# at 64x64 (7e7) is fastest on one thread; at 256x256 (1.1e9) one and two threads tie; at 512x512 (4.4e9)
# two threads are 1.7x faster. The v1 UNet (8.6e8) is 5.5e10 already at 64x64.
PARALLEL_WORK = 2e9


def choose_threads(unet_params: int, latent_pixels: int, cores: int) -> int:
    """The intra-op thread count for a UNet of `unet_params` parameters sampling latents of
    `latent_pixels` (h x w) on `cores` usable cores: 1 for small work, else every core."""
    cores = max(1, int(cores))
    if unet_params * latent_pixels < PARALLEL_WORK:
        return 1
    return cores


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def pick_device(name: str | None = None):
    """The named device, or the best available: cuda > mps > cpu."""
    import torch

    if name:
        from .checks import device as check_device

        device = torch.device(check_device(str(name)))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {name!r}: Apple MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(device, precision: str):
    """(weight dtype, use CUDA fp16 autocast, notice) for a device and a --precision choice.

    full: float32 everywhere. autocast: fp32 weights with torch.autocast(fp16) on CUDA; elsewhere
    it does not help, so it is float32 (a no-op). half: fp16 weights on a GPU (CUDA, MPS); on the
    CPU, where fp16 is slow or unsupported, it falls back to float32 with a notice. bf16: bfloat16
    weights, on a GPU or on a CPU whose oneDNN supports bfloat16 (refused elsewhere).
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "half":
        if device.type == "cpu":
            return torch.float32, False, "--precision half: fp16 weights need a GPU; running in full precision on the CPU"
        return torch.float16, False, None
    if precision == "bf16":
        if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            raise ValueError("--precision bf16 (--bf16): this CPU has no bfloat16 support in oneDNN; "
                             "use --precision full")
        return torch.bfloat16, False, None
    return torch.float32, precision == "autocast" and device.type == "cuda", None
