"""The plan of a run: its images as work items (prompt, negative prompt, index k, seed), in batches.

A run is planned up front, so its items can be split among processes and any image regenerated
alone: image k starts from `start_code(seed + k)` (with fixed_code, the seed of the same position
in the first batch).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkItem:
    """One image of a run: its prompts, its index k in the run (the order files are written) and
    its seed (seed + k, or with fixed_code the seed of the same position in the first batch)."""

    index: int
    prompt: str
    negative_prompt: str
    seed: int


def check_counts(n_samples, n_iter):
    for name, value in (("n_samples", n_samples), ("n_iter", n_iter)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"--{name} must be a positive integer, got {value}")


def prompt_batches(prompts, negative_prompts, n_samples: int, repeat: bool) -> list[list[tuple[str, str]]]:
    """The (prompt, negative) pairs of one iteration, in batches of at most n_samples.

    repeat=True (a single --prompt): one batch of n_samples copies of each prompt. repeat=False
    (--from-file): the prompts in order, n_samples per batch, the last batch possibly smaller.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if negative_prompts is None or isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts or ""] * len(prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    if not prompts:
        raise ValueError("no prompts")
    pairs = list(zip(prompts, negative_prompts))
    if repeat:
        return [[pair] * n_samples for pair in pairs]
    return [pairs[i:i + n_samples] for i in range(0, len(pairs), n_samples)]


def plan_work(batches: list[list[tuple[str, str]]], n_iter: int, seed: int,
              fixed_code: bool = False) -> list[list[WorkItem]]:
    """All work items of a run, batch by batch: n_iter passes over `batches`, image index k counting
    up in that order. With fixed_code, position i of every batch gets the seed of position i of
    the first batch (the original reused one start code tensor for all batches)."""
    plan, k = [], 0
    for _ in range(n_iter):
        for batch in batches:
            items = []
            for i, (prompt, negative) in enumerate(batch):
                items.append(WorkItem(k, prompt, negative, seed + (i if fixed_code else k)))
                k += 1
            plan.append(items)
    return plan


def start_code(item_seed: int, shape):
    """The start noise of one image: [C, H/f, W/f] from a CPU generator seeded with item_seed."""
    import torch

    return torch.randn(list(shape), generator=torch.Generator("cpu").manual_seed(item_seed))
