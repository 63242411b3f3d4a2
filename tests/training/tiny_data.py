"""A tiny LLaVA-JSON dataset of random images for the training tests."""

import json
from pathlib import Path

import numpy as np
from PIL import Image


def make_dataset(folder: Path, n: int = 2, answered: bool = True, seed: int = 0) -> Path:
    """``folder/data.json`` with ``n`` records of random 224x224 images (paths relative to the file)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        conv = [{"from": "human", "value": "<image>\nDescribe this image."}]
        if answered:
            conv.append({"from": "gpt", "value": f"A picture number {i} with dots."})
        conv += [{"from": "human", "value": "What color?"}, {"from": "gpt", "value": "red"}] if answered and i % 2 else []
        records.append({"id": f"rec{i}", "image": f"images/{i}.png", "conversations": conv})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path
