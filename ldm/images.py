"""Writing images: tensors to PIL, grids, the invisible watermark, PNG metadata and numbered file names.

File names are claimed atomically so that several runs writing into one folder never overwrite
each other: a name is taken with `os.open(O_CREAT | O_EXCL)` (an empty placeholder), the PNG is
written to a hidden temporary file in the same folder and `os.replace`d onto the placeholder, so a
partly written PNG never appears under a final name. A failed write removes both.

The metadata is a `parameters` text chunk in the format of the AUTOMATIC1111 web UI, which the
popular UIs and image viewers read:

    a painting of a fox
    Negative prompt: blurry
    Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

log = logging.getLogger(__name__)

DEFAULT_WATERMARK = "StableDiffusionV1"
WATERMARK_MIN_PIXELS = 256 * 256  # imwatermark's encoder refuses images of fewer pixels


# ----------------------------------------------------------------------------- tensors and grids


def to_pil(x) -> list[Image.Image]:
    """Images [B, 3, H, W] with values in [0, 1] -> RGB PIL images (rounded to 8 bits)."""
    arr = (x.detach().float().clamp(0, 1) * 255).round().to("cpu").numpy().astype(np.uint8)
    return [Image.fromarray(a.transpose(1, 2, 0)) for a in arr]  # (H, W, 3)


def make_grid(images: list[Image.Image], n_rows: int, padding: int = 2) -> Image.Image:
    """Images side by side, `n_rows` per row (the original's naming: images per row), with a
    `padding`-pixel black border around and between them, as torchvision's make_grid."""
    if not images:
        raise ValueError("make_grid: no images")
    w, h = images[0].size
    cols = max(1, min(n_rows, len(images)))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * (w + padding) + padding, rows * (h + padding) + padding))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(img, (padding + c * (w + padding), padding + r * (h + padding)))
    return grid


def make_strip(rows: list[list[Image.Image]], padding: int = 2) -> Image.Image:
    """Several rows of images of one size (e.g. x_t above predicted x_0) as one picture."""
    cols = max(len(r) for r in rows)
    w, h = rows[0][0].size
    strip = Image.new("RGB", (cols * (w + padding) + padding, len(rows) * (h + padding) + padding))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            strip.paste(img, (padding + c * (w + padding), padding + r * (h + padding)))
    return strip


# ----------------------------------------------------------------------------- watermark


def watermark_fits(img: Image.Image) -> bool:
    return img.size[0] * img.size[1] >= WATERMARK_MIN_PIXELS


def put_watermark(img: Image.Image, text: str = DEFAULT_WATERMARK) -> Image.Image:
    """Embed `text` with invisible-watermark's dwtDct method, as the original txt2img.

    The encoder works on OpenCV's BGR order, so RGB is converted around it. Raises ValueError
    for images below the library's 256x256-pixel minimum (see `watermark_fits`).
    """
    if not watermark_fits(img):
        raise ValueError(f"image of {img.size[0]}x{img.size[1]} is too small for the watermark (at least 256x256 pixels)")
    import cv2
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", text.encode("utf-8"))
    bgr = cv2.cvtColor(np.asarray(img.convert("RGB")), cv2.COLOR_RGB2BGR)
    bgr = encoder.encode(bgr, "dwtDct")
    return Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))


def read_watermark(img: Image.Image, n_bytes: int) -> bytes:
    """The first `n_bytes` of a dwtDct watermark."""
    import cv2
    from imwatermark import WatermarkDecoder

    bgr = cv2.cvtColor(np.asarray(img.convert("RGB")), cv2.COLOR_RGB2BGR)
    return WatermarkDecoder("bytes", 8 * n_bytes).decode(bgr, "dwtDct")


# ----------------------------------------------------------------------------- metadata


def format_parameters(meta: dict) -> str:
    """The web UI's `parameters` text: prompt, `Negative prompt: ...` (when there is one), then
    `Key: value` pairs in the order of `meta["settings"]`."""
    lines = [meta["prompt"]]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in meta["settings"].items()))
    return "\n".join(lines)


def _quote(value) -> str:
    text = str(value)
    if any(c in text for c in ',:"\n'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


_SETTING = re.compile(r'\s*([\w ./+-]+?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict:
    """Inverse of `format_parameters`: {"prompt", "negative_prompt", "settings": {key: str}}.

    The last line is the settings line when it parses as `Key: value` pairs holding `Steps`;
    everything before `Negative prompt:` is the prompt (which may span lines).
    """
    lines = text.split("\n")
    settings = {}
    if lines and "Steps:" in lines[-1]:
        for key, value in _SETTING.findall(lines.pop()):
            if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                value = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value[1:-1])
            settings[key.strip()] = value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative), "settings": settings}


def read_parameters(path) -> str:
    """The `parameters` text chunk of a PNG; ValueError when the file is not a PNG or has none."""
    try:
        with Image.open(path) as img:
            img.load()
            text = img.info.get("parameters")
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not text:
        raise ValueError(f"{path} holds no generation parameters (no 'parameters' PNG text chunk)")
    return text


def is_valid_png(path) -> bool:
    """Whether `path` is a complete, decodable PNG (a file cut short by a crash is not)."""
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                return False
            img.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def read_rgb(path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def png_info(parameters: str | None) -> PngImagePlugin.PngInfo | None:
    if parameters is None:
        return None
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)  # iTXt when it is not Latin-1, as the web UI
    return info


# ----------------------------------------------------------------------------- numbered files


class NumberedFiles:
    """Claims names `prefix + NNNNN + suffix` in a folder, numbered after those already there.

    Claims are atomic (`O_CREAT | O_EXCL`), so concurrent runs into one folder interleave
    their numbers and never overwrite each other.
    """

    def __init__(self, folder, digits: int, prefix: str = "", suffix: str = ".png"):
        self.folder = Path(folder)
        self.digits, self.prefix, self.suffix = digits, prefix, suffix
        self._pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + "$")
        self._next = None

    def name(self, number: int) -> Path:
        return self.folder / f"{self.prefix}{number:0{self.digits}d}{self.suffix}"

    def _first_free(self) -> int:
        numbers = [int(m.group(1)) for n in os.listdir(self.folder) if (m := self._pattern.match(n))]
        return max(numbers, default=-1) + 1

    def claim(self) -> Path:
        """Create an empty placeholder under the next free name and return its path."""
        if self._next is None:
            self._next = self._first_free()
        while True:
            path = self.name(self._next)
            self._next += 1
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return path
            except FileExistsError:
                continue


def save_png(img: Image.Image, path, parameters: str | None = None) -> Path:
    """Write `img` as PNG onto `path` (already claimed) through a temporary file in the same
    folder. On failure both the temporary file and the placeholder at `path` are removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG", pnginfo=png_info(parameters))
            f.flush()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        for leftover in (tmp, path):
            try:
                os.unlink(leftover)
            except OSError:
                pass
        if isinstance(e, OSError) and not e.filename:
            e.filename = str(path)
        raise
    return path


def save_numbered(img: Image.Image, files: NumberedFiles, parameters: str | None = None) -> Path:
    """Claim the next free name of `files` and write the PNG there."""
    return save_png(img, files.claim(), parameters)
