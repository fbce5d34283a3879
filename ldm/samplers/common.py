"""Small pieces every sampler uses: the model's time argument and the sampler's noise."""

import torch


def time_tensor(t: float, x: torch.Tensor) -> torch.Tensor:
    """The model's time argument: t repeated over the batch, float32 (float64 for a float64 latent)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), float(t), dtype=dtype, device=x.device)


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn from `generator` on its own device in float32, then moved to x.

    Drawing in one fixed dtype on the generator's device makes a seed give the same noise whatever the
    latent's device and dtype; the global RNG is never touched.
    """
    if generator is None:
        raise ValueError("this sampler draws noise: pass an explicit torch.Generator")
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=x.device, dtype=x.dtype)

