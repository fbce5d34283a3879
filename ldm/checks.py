"""Checks of the command line's values before anything slow runs: pure functions, one ValueError line each.

`check_flags(args)` applies `RULES` to every flag the parsed arguments carry (a flag added later gets
its rule here); the library's `Options.validate` and `pick_device` use the same checks.
"""

from __future__ import annotations

import math
import numbers
import re

DEVICE_FORMS = "cpu, cuda, cuda:N (N = 0, 1, ...), mps"
MAX_SIDE = 16384  # pixels; far beyond what an SD v1 UNet can sample in any memory
SEED_LIMIT = 2**64  # torch generators take seeds below 2**64; image k uses seed + k
MAX_IMAGES = 10**6  # a run's plan is a list of its images: beyond this, a typo, not a job


def device(name: str) -> str:
    """`name` when it is cpu, cuda, cuda:N or mps; a ValueError listing the valid forms otherwise."""
    if not isinstance(name, str) or not re.fullmatch(r"cpu|(cuda|mps)(:[0-9]+)?", name):
        raise ValueError(f"--device {name!r} is not a device; valid forms: {DEVICE_FORMS}")
    return name


def number(flag: str, value, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite real number within [minimum, maximum] (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"--{flag} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"--{flag} must " + ("not be negative" if minimum == 0 else f"be at least {minimum}")
                         + f", got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"--{flag} must be at most {maximum}, got {value}")
    return value


def integer(flag: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer within [minimum, maximum]; the message says "positive" for the usual minimum of 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"--{flag} must be an integer, got {value!r}")
    if value < minimum:
        kind = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"at least {minimum}")
        raise ValueError(f"--{flag} must be {kind}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"--{flag} must be at most {maximum}, got {value}")
    return value


# dest -> check of its value; None values (a flag's "use the default") are not checked.
RULES = {
    "scale": lambda v: number("scale", v),
    "ddim_eta": lambda v: number("ddim_eta", v, minimum=0),
    "strength": lambda v: number("strength", v, minimum=0, maximum=1),
    "hr_scale": lambda v: number("hr_scale", v, minimum=1),
    "hr_strength": lambda v: number("hr_strength", v, minimum=0, maximum=1),
    "hr_steps": lambda v: integer("hr_steps", v),
    "mask_blur": lambda v: integer("mask_blur", v, minimum=0, maximum=1024),
    "ddim_steps": lambda v: integer("ddim_steps", v),  # the upper bound is the model's: Options.validate
    "n_samples": lambda v: integer("n_samples", v, maximum=MAX_IMAGES),
    "n_iter": lambda v: integer("n_iter", v, maximum=MAX_IMAGES),
    "n_rows": lambda v: integer("n_rows", v, minimum=0),
    "H": lambda v: integer("H", v, maximum=MAX_SIDE),
    "W": lambda v: integer("W", v, maximum=MAX_SIDE),
    "C": lambda v: integer("C", v, maximum=1024),
    "f": lambda v: integer("f", v, maximum=1024),
    "seed": lambda v: integer("seed", v, minimum=0, maximum=SEED_LIMIT - 1),
    "aesthetic_score": lambda v: number("aesthetic_score", v, minimum=0, maximum=10),
    "refiner_switch": lambda v: number("refiner_switch", v, minimum=0, maximum=1),
    "device": device,
}


def check_flags(args) -> None:
    """Apply RULES to the attributes of `args` (an argparse Namespace) that it has and that are set, and
    bound the images of a run (--n_samples x --n_iter; with --from-file, --n_samples is a batch size)."""
    for dest, rule in RULES.items():
        value = getattr(args, dest, None)
        if value is not None:
            rule(value)
    n_samples, n_iter = getattr(args, "n_samples", None), getattr(args, "n_iter", None)
    if n_samples and n_iter and not getattr(args, "from_file", None) and n_samples * n_iter > MAX_IMAGES:
        raise ValueError(f"--n_samples {n_samples} x --n_iter {n_iter} is more than {MAX_IMAGES} images in one run")


def seeds_fit(seed: int, n_images: int) -> None:
    """Every image's seed, seed + k for k < n_images, must be a valid generator seed."""
    if seed + n_images - 1 >= SEED_LIMIT:
        raise ValueError(f"--seed {seed}: image {n_images - 1} would get seed {seed + n_images - 1}, "
                         f"beyond the largest seed {SEED_LIMIT - 1}")
