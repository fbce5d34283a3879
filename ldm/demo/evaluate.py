"""End-to-end quality of a text-to-image model on the shapes world: generate, classify, score.

Prompts are `shapes.eval_prompts(n)`: the full caption form for the 18 (colour, shape,
background) triples held out from training, cycled. Image k starts from
`torch.randn([4, 8, 8], generator=torch.Generator("cpu").manual_seed(seed + k))`, so a figure
is reproducible and independent of the batch size; guidance is classifier-free with the empty
prompt as the unconditional branch. Each decoded image is read back by `shapes.classify`.
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import backends
from ..samplers import cfg_denoiser, get_sampler, sample
from . import shapes


@dataclass
class Result:
    sampler: str
    steps: int
    scale: float
    n: int
    colour_accuracy: float
    shape_accuracy: float
    background_accuracy: float
    prompt_accuracy: float  # colour, shape and background all right: the image shows the whole prompt
    seconds_per_image: float
    records: list = field(repr=False, default_factory=list)  # (prompt, expected, predicted) per image
    images: np.ndarray = field(repr=False, default=None)  # uint8 [n, 64, 64, 3]


def start_noise(n, seed, shape=(4, 8, 8)):
    """Per-image start noise: image k from its own generator seeded seed + k."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + k)) for k in range(n)])


@torch.no_grad()
def generate(model, prompts, sampler, steps, scale, seed=0, batch_size=32):
    """uint8 images [len(prompts), H, W, 3] for `prompts` (see the module docstring)."""
    get_sampler(sampler)  # fail early on an unknown name
    latent = (model.channels, shapes.RESOLUTION // 8, shapes.RESOLUTION // 8)  # f = 8
    dtype, vae_dtype = model.dtype, next(model.first_stage_model.parameters()).dtype
    x_all = start_noise(len(prompts), seed, latent).to(model.device)  # the sampler's state stays float32
    uncond = model.get_learned_conditioning([""])
    out = []

    def eps_model(x, t, c):  # the model in its own dtype (bfloat16, say), as the pipeline runs it
        return model.apply_model(x.to(dtype), t, c.to(dtype)).float()

    for i in range(0, len(prompts), batch_size):
        cond = model.get_learned_conditioning(list(prompts[i : i + batch_size]))
        eps_fn = cfg_denoiser(eps_model, cond, uncond, scale, fans_out=backends.fans_out(model))
        generator = torch.Generator("cpu").manual_seed(seed + i)  # only stochastic samplers draw from it
        z = sample(sampler, eps_fn, x_all[i : i + batch_size], model.alphas_cumprod, steps, generator=generator)
        out.append(shapes.to_uint8(model.decode_first_stage(z.to(vae_dtype)).float()))
    return np.concatenate(out)


def evaluate(model, sampler="dpm_solver", steps=20, scale=7.5, n=96, seed=0, batch_size=32):
    """Generate `n` images of held-out prompts and score them with the pixel classifier."""
    pairs = shapes.eval_prompts(n)
    prompts = [p for p, _ in pairs]
    start = time.perf_counter()
    images = generate(model, prompts, sampler, steps, scale, seed, batch_size)
    seconds = (time.perf_counter() - start) / n
    acc, got = score(images, [triple for _, triple in pairs])
    records = [(prompt, (shape, colour, background), g) for (prompt, (colour, shape, background)), g in zip(pairs, got)]
    return Result(sampler, steps, scale, len(images), *acc, seconds, records, images)


def score(images, expected):
    """Classify uint8 images [n, H, W, 3] against their (colour, shape, background) triples.

    Returns the accuracies (colour, shape, background, all three) and each image's
    (shape, colour, background) as read back.
    """
    got = [shapes.classify(image) for image in images]
    hits = np.array([[g[1] == c, g[0] == s, g[2] == b] for g, (c, s, b) in zip(got, expected)], dtype=bool)
    return (*hits.mean(axis=0).tolist(), hits.all(axis=1).mean().item()), got


def grid(images, columns=12):
    """uint8 [n, H, W, 3] -> one uint8 image of `columns` per row, with 2-pixel gaps."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    out = np.full((rows * (h + 2) + 2, columns * (w + 2) + 2, c), 255, dtype=np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, columns)
        out[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + q * (w + 2) : 2 + q * (w + 2) + w] = img
    return out
