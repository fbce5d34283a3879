"""The demo model's world: procedural captioned images of one coloured shape, and a classifier.

Every image is 64x64 RGB: one shape (circle, square, upright triangle) in one of six colours,
at a random position and size, on a plain background of one of three colours, drawn with 4x4
supersampled anti-aliasing. Nothing is read from disk: `make_dataset(n, seed)` draws the same
images and captions for the same seed.

Held out from training: one background per (colour, shape) pair, a Latin square
(`(colour + shape) % 3 == background`), so 18 of the 54 (colour, shape, background) triples
never appear in training and their full caption "a red circle on a black background" is never
seen. Evaluation prompts use exactly those triples: every word is known, the combination is new.

`classify(image)` reads back (shape, colour, background) from pixel statistics alone; it is
deterministic and needs no training.
"""

from dataclasses import dataclass

import cv2
import numpy as np
import torch

RESOLUTION = 64
SUPERSAMPLE = 4

# Chosen far apart in RGB, and every shape colour far from every background colour.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)

MIN_SIZE, MAX_SIZE = 20, 44  # side (square, triangle) or diameter (circle), in pixels
MARGIN = 2  # pixels kept free between the shape and the image border

# Caption forms used in training, with their probabilities; {a} "a" or "an", {c} colour,
# {s} shape, {b} background.
TRAIN_TEMPLATES = (
    ("{a} {c} {s} on a {b} background", 0.5),
    ("{c} {s} on {b}", 0.1),
    ("{a} {c} {s}", 0.2),
    ("{c} {s}", 0.2),
)
EVAL_TEMPLATE = "{a} {c} {s} on a {b} background"


def caption(template, colour, shape, background):
    return template.format(a="an" if colour[0] in "aeiou" else "a", c=colour, s=shape, b=background)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float  # centre, pixels
    cy: float
    size: float  # side or diameter, pixels


def is_held_out(colour, shape, background):
    """True for the 18 (colour, shape, background) triples never shown in training."""
    return (COLOUR_NAMES.index(colour) + SHAPES.index(shape)) % 3 == BACKGROUND_NAMES.index(background)


def train_triples():
    return [(c, s, b) for c in COLOUR_NAMES for s in SHAPES for b in BACKGROUND_NAMES if not is_held_out(c, s, b)]


def held_out_triples():
    return [(c, s, b) for c in COLOUR_NAMES for s in SHAPES for b in BACKGROUND_NAMES if is_held_out(c, s, b)]


def eval_prompts(n):
    """`n` evaluation (prompt, (colour, shape, background)) pairs cycling over the held-out triples."""
    triples = held_out_triples()
    out = []
    for k in range(n):
        c, s, b = triples[k % len(triples)]
        out.append((caption(EVAL_TEMPLATE, c, s, b), (c, s, b)))
    return out


# ----------------------------------------------------------------------------- drawing


def coverage(scene, resolution=RESOLUTION, supersample=SUPERSAMPLE):
    """Fraction of each pixel the shape covers, [resolution, resolution] float32 in [0, 1]."""
    n = resolution * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / supersample  # sub-pixel centres, in pixels
    x, y = coords[None, :], coords[:, None]
    half = scene.size / 2
    dx, dy = x - scene.cx, y - scene.cy
    if scene.shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif scene.shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif scene.shape == "triangle":  # apex up, base = height = size
        depth = (dy + half) / scene.size  # 0 at the apex, 1 at the base
        inside = (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth * half)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    inside = inside.astype(np.float32).reshape(resolution, supersample, resolution, supersample)
    return inside.mean(axis=(1, 3))


def render(scene, resolution=RESOLUTION):
    """The scene as an RGB uint8 array [resolution, resolution, 3]."""
    a = coverage(scene, resolution)[..., None]
    fg = np.array(COLOURS[scene.colour], dtype=np.float32)
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    return np.round(bg * (1 - a) + fg * a).astype(np.uint8)


def random_scene(rng, triple):
    colour, shape, background = triple
    size = rng.uniform(MIN_SIZE, MAX_SIZE)
    lo, hi = MARGIN + size / 2, RESOLUTION - MARGIN - size / 2
    return Scene(shape, colour, background, rng.uniform(lo, hi), rng.uniform(lo, hi), size)


def random_caption(rng, scene):
    templates, weights = zip(*TRAIN_TEMPLATES)
    template = templates[rng.choice(len(templates), p=np.array(weights) / sum(weights))]
    return caption(template, scene.colour, scene.shape, scene.background)


def make_dataset(n, seed, held_out=False):
    """`n` training images (or, with held_out=True, images of the held-out triples).

    Returns (images uint8 [n, 64, 64, 3], captions [n], scenes [n]); the same seed gives the
    same data on every machine (numpy's PCG64 stream and float32 arithmetic).
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    triples = held_out_triples() if held_out else train_triples()
    images = np.empty((n, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    captions, scenes = [], []
    for i in range(n):
        scene = random_scene(rng, triples[rng.integers(len(triples))])
        images[i] = render(scene)
        captions.append(random_caption(rng, scene))
        scenes.append(scene)
    return images, captions, scenes


def to_tensor(images):
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W] in [-1, 1], the autoencoder's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x):
    """float [n, 3, H, W] in about [-1, 1] -> uint8 [n, H, W, 3]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------- classifier

MASK_DISTANCE = 50.0  # RGB distance from the background that counts as shape at first; the
#                       closest shape/background pair (purple on gray) is ~103 apart
PROFILE_AT = 0.15  # where the width profile is read: 15% and 85% down the shape's rows
TRIANGLE_RATIO = 0.6  # width near the top / width near the bottom: 0.18 for the upright
#                       triangle, 1 for circle and square
SQUARE_WIDTH = 0.87  # narrower of the two widths / widest row: 2 sqrt(0.15 * 0.85) = 0.71 for
#                      the circle, 1 for the square


def _nearest(rgb, palette):
    names = list(palette)
    table = np.array([palette[k] for k in names], dtype=np.float32)
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def _largest_component(mask):
    """The largest 8-connected region of a boolean mask (specks and stray pixels dropped)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def classify(image):
    """(shape, colour, background) of one RGB uint8 image [H, W, 3], from pixel statistics.

    Background: the median colour of the border pixels, snapped to the nearest background
    colour. Shape region: the largest connected region of pixels farther than MASK_DISTANCE
    from it (a stray speck elsewhere is not the shape). Colour: that region's median, snapped
    to the nearest shape colour. Shape mask: the largest region of pixels more than halfway
    from the background to that colour (the half-way contour keeps its place when a decoder
    blurs the edges). Shape: from the mask's row widths 15% and 85% of the way down its rows,
    relative to its widest row: an upright triangle is narrow at the top, a circle narrower
    than a square at both. Returns shape None when the shape is missing (under 16 pixels or
    2 rows).
    """
    img = np.asarray(image, dtype=np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    dist = np.sqrt(((img - bg_rgb) ** 2).sum(axis=-1))
    region = _largest_component(dist > MASK_DISTANCE)
    if region.sum() < 16:
        return None, None, background
    fg_rgb = np.median(img[region], axis=0)
    colour = _nearest(fg_rgb, COLOURS)
    mask = _largest_component(dist > max(0.5 * float(np.sqrt(((fg_rgb - bg_rgb) ** 2).sum())), MASK_DISTANCE / 2))
    widths = mask.sum(axis=1).astype(np.float32)  # (H,) shape pixels per row
    rows = np.nonzero(widths >= 2)[0]
    if len(rows) < 2:
        return None, colour, background
    top, bottom = rows[0], rows[-1]
    near_top = widths[int(round(top + PROFILE_AT * (bottom - top)))] / widths.max()
    near_bottom = widths[int(round(bottom - PROFILE_AT * (bottom - top)))] / widths.max()
    if near_top < TRIANGLE_RATIO * near_bottom:
        shape = "triangle"
    elif min(near_top, near_bottom) < SQUARE_WIDTH:
        shape = "circle"
    else:
        shape = "square"
    return shape, colour, background
