"""Out-of-domain real photos: scikit-image's data module (and scikit-learn's samples if installed).

The training data are drawings and synthetic shapes; these photos measure how the target and the
draft behave on images unlike them (the paper reports speedups on out-of-domain images too). Each
photo is centre-cropped to a square, resized to 224 px, saved as PNG and given the prompt
"Describe this image." in the LLaVA JSON format. ``meta.keywords`` is a short hand-written list of
what the photo shows, for keyword-recall scoring; no reference answer is given (there is none).

Only images bundled inside the scikit-image wheel are used: the others need a download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .llava_format import make_record

PROMPT = "Describe this image."

# name in skimage.data -> what it shows (keywords a good description would mention)
SKIMAGE_PHOTOS: dict[str, list[str]] = {
    "astronaut": ["astronaut", "woman", "flag", "suit", "space shuttle"],
    "coffee": ["coffee", "cup", "saucer", "spoon", "table"],
    "chelsea": ["cat", "fur", "whiskers", "eyes"],
    "rocket": ["rocket", "launch", "sky", "tower"],
    "camera": ["man", "camera", "tripod", "coat", "grass"],
    "coins": ["coins", "money", "metal"],
    "moon": ["moon", "craters", "surface"],
    "hubble_deep_field": ["galaxies", "stars", "space", "night sky"],
    "clock": ["clock", "wall", "hands", "numbers"],
    "immunohistochemistry": ["cells", "tissue", "microscope", "stain"],
    "retina": ["retina", "eye", "blood vessels"],
    "page": ["page", "text", "book", "letters"],
    "text": ["text", "letters", "words"],
    "brick": ["brick", "wall", "texture"],
    "grass": ["grass", "texture", "green"],
    "gravel": ["gravel", "stones", "texture"],
}
SKLEARN_PHOTOS: dict[str, list[str]] = {
    "china.jpg": ["temple", "building", "roof", "trees", "china"],
    "flower.jpg": ["flower", "petals", "bee", "garden"],
}


def square_rgb(array: np.ndarray, size: int = 224) -> Image.Image:
    """Centre-crop an image array (grey, RGB, RGBA or bool) to a square and resize it to ``size``."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    img = Image.fromarray(array).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)


def load_photos() -> dict[str, tuple[np.ndarray, list[str]]]:
    """{id: (pixels, keywords)} for every available photo (missing ones are skipped silently)."""
    import skimage.data

    photos = {}
    for name, keywords in SKIMAGE_PHOTOS.items():
        try:
            photos[f"skimage/{name}"] = (getattr(skimage.data, name)(), keywords)
        except (AttributeError, ImportError, OSError, ValueError):
            continue  # not bundled in this scikit-image version (it would need a download)
    try:
        from sklearn.datasets import load_sample_image
    except ImportError:
        return photos
    for name, keywords in SKLEARN_PHOTOS.items():
        photos[f"sklearn/{name.removesuffix('.jpg')}"] = (load_sample_image(name), keywords)
    return photos


def build_photos(out_dir: Path, size: int = 224) -> list[dict]:
    """Save the photos under ``out_dir/images/photos/`` and return their LLaVA records."""
    records = []
    for pid, (pixels, keywords) in load_photos().items():
        rel = f"images/photos/{pid.replace('/', '_')}.png"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        square_rgb(pixels, size).save(out_dir / rel, optimize=True)
        records.append(make_record(f"photos/{pid}", rel, [(PROMPT, None)],
                                   meta={"source": "photos", "keywords": keywords}))
    return records
