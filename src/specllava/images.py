"""One image loader for the commands and the server: an image file (or an opened PIL image) to the
8-bit RGB image the processor gets, the same way everywhere (`generate --image`, bench's prompts,
the server's `image_url`).

- EXIF orientation is applied, as transformers' `load_image` does: a phone photo stored sideways
  with an orientation tag arrives upright.
- High bit depths are scaled, not clipped: PIL's `convert("RGB")` clips 16-bit greyscale (mode
  `I;16`, `I`) at 255, so a 16-bit PNG arrives nearly white, and truncates floating-point pixels
  (mode `F`, e.g. a float32 TIFF in [0, 1]) to 0, so it arrives black. Integers are scaled by the
  range of their bit depth (8, 16 or 32 bits, the smallest that holds the image's largest value,
  since mode `I` does not say which), floats in [0, 1] by 255 (floats beyond 1 as integers);
  non-finite pixels become 0.
- Transparency is composited on white, as transformers' `convert_rgb` does.

Cheap to import (PIL and numpy only).
"""

from __future__ import annotations

import os

from PIL import Image, ImageOps

HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def open_image(path: str | os.PathLike) -> Image.Image:
    """The image file at `path` as 8-bit RGB (see the module docstring), fully decoded."""
    with Image.open(path) as img:
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened PIL image as 8-bit RGB, upright (EXIF), high bit depths scaled, transparency on white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in HIGH_DEPTH_MODES:
        img = _to_8bit(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """A one-channel image of more than 8 bits (integer or float) as mode L, scaled to 0..255."""
    import numpy as np

    x = np.asarray(img, dtype=np.float64)  # [H, W]
    x = np.where(np.isfinite(x), x, 0.0)
    top = float(x.max()) if x.size else 0.0
    if img.mode == "F" and top <= 1.0:
        scale = 255.0
    elif img.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    else:  # mode I (and floats beyond 1): the smallest of 8, 16 or 32 bits that holds the largest value
        bits = next(b for b in (8, 16, 32, 64) if top <= 2.0**b - 1)
        scale = 255.0 / (2.0**bits - 1)
    return Image.fromarray(np.clip(np.rint(x * scale), 0, 255).astype(np.uint8))  # mode L
