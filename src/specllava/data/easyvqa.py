"""easy-vqa (PyPI ``easy-vqa==1.0``) as short-answer LLaVA conversations.

easy-vqa ships 5,000 synthetic 64x64 images (one coloured shape on a background) with ~48k
question/answer pairs ("what color is the shape?" -> "blue"). Each image becomes one multi-turn
record, the way LLaVA-1.5 packs VQAv2: every question gets LLaVA-1.5's short-answer instruction and
the answer is the dataset's word. The images are upscaled to the vision tower's 224 px (bicubic).

easy-vqa's own train/test folders are pooled; the dataset-wide split by image (see
:mod:`llava_format`) decides which side each image is on, like every other source.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from PIL import Image

from .llava_format import make_record

SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5's VQA prompt


def _require():
    try:
        import easy_vqa
    except ImportError as e:
        raise ImportError("easy-vqa is not installed: `pip install easy-vqa==1.0`") from e
    return easy_vqa


def build_easyvqa(out_dir: Path, size: int = 224, limit: int | None = None) -> list[dict]:
    """Write easy-vqa images as PNG under ``out_dir/images/easy-vqa/`` and return their records."""
    ev = _require()
    records = []
    for part, questions, paths in (
        ("train", ev.get_train_questions(), ev.get_train_image_paths()),
        ("test", ev.get_test_questions(), ev.get_test_image_paths()),
    ):
        by_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for text, answer, image_id in zip(*questions):
            by_image[image_id].append((f"{text[0].upper()}{text[1:]}\n{SHORT_ANSWER}", answer))
        for image_id in sorted(by_image):
            rel = f"images/easy-vqa/{part}_{image_id}.png"
            dst = out_dir / rel
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(paths[image_id]) as im:
                    im.convert("RGB").resize((size, size), Image.BICUBIC).save(dst, optimize=True)
            records.append(make_record(f"easy-vqa/{part}/{image_id}", rel, by_image[image_id],
                                       meta={"source": "easy-vqa"}))
            if limit is not None and len(records) >= limit:
                return records
    return records
