"""A miniature ``llava_v1_5_mix665k.json`` in the published format, for the training tests.

The records copy the structure of the real file's (LLaVA-Instruct on COCO, GQA, OCR-VQA, TextVQA,
Visual Genome region grounding, ShareGPT text-only conversations): ``id`` (a string, or an int as
for some of the real records), ``image`` relative to the image folder (``coco/train2017/...``,
``gqa/images/...``, ``ocr_vqa/images/...``, ``textvqa/train_images/...``, ``vg/VG_100K/...``,
``vg/VG_100K_2/...``) and ``conversations`` of ``{"from": "human" | "gpt", "value": ...}`` turns,
``<image>`` in the first human turn (mostly ``"<image>\\n"`` in front, once at its end). ShareGPT
records have no ``image`` (one starts with a "gpt" turn, which LLaVA's training drops), one is
unanswered, and the image of one record is missing, as OCR-VQA images often are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

RECORDS = [
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
    {"id": "i6IyJda_0", "model": "", "conversations": [
        {"from": "human", "value": "How to tell if a customer segment is well segmented? In 3 bullet points."},
        {"from": "gpt", "value": "1. Homogeneity: similar needs.\n2. Distinctiveness.\n3. Stability over time."}]},
    {"id": "2354786", "image": "gqa/images/2354786.jpg", "conversations": [
        {"from": "human", "value": "<image>\nIs the sky dark?\nAnswer the question using a single word or phrase."},
        {"from": "gpt", "value": "Yes"},
        {"from": "human", "value": "What is on the white wall?\nAnswer the question using a single word or phrase."},
        {"from": "gpt", "value": "Pipe"}]},
    {"id": "71030193", "image": "ocr_vqa/images/71030193.jpg", "conversations": [
        {"from": "human", "value": "Who wrote this book?\n<image>"},
        {"from": "gpt", "value": "Sandra Boynton"},
        {"from": "human", "value": "What is the title of this book?"},
        {"from": "gpt", "value": "Moo, Baa, La La La!"}]},
    {"id": "0054c91397f2fe05", "image": "textvqa/train_images/0054c91397f2fe05.jpg", "conversations": [
        {"from": "human", "value": "<image>\nwhat is the brand of this camera?\nReference OCR token: dakota, "
                                   "digital\nAnswer the question using a single word or phrase."},
        {"from": "gpt", "value": "Dakota"}]},
    {"id": 2, "image": "vg/VG_100K/2.jpg", "conversations": [
        {"from": "human", "value": "<image>\nPlease provide the bounding box coordinate of the region this "
                                   "sentence describes: a man in a red shirt."},
        {"from": "gpt", "value": "[0.46, 0.32, 0.64, 0.86]"}]},
    {"id": "wOyXvAq_12", "conversations": [
        {"from": "gpt", "value": "Sure, here is the rest of the story."},
        {"from": "human", "value": "Write a haiku about caf\u00e9s \u2615 in winter."},
        {"from": "gpt", "value": "Steam on the window\nstrangers share a quiet warmth\nsnow hums on the street"}]},
    {"id": 1, "image": "vg/VG_100K_2/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nProvide a short description for this region: [0.1, 0.2, 0.5, 0.6]."},
        {"from": "gpt", "value": "A tree with green leaves."}]},
    {"id": "ocr_missing", "image": "ocr_vqa/images/1558171990.jpg", "conversations": [
        {"from": "human", "value": "<image>\nIs this a comedy book?"}, {"from": "gpt", "value": "No"}]},
    {"id": "q8ZuGQN_0", "model": "", "conversations": [
        {"from": "human", "value": "Explain recursion to a child."},
        {"from": "gpt", "value": "It is when something is defined using a smaller copy of itself."},
        {"from": "human", "value": "Give an example."}]},
]
MISSING = "ocr_vqa/images/1558171990.jpg"


def make_mix665k(folder: Path, seed: int = 0, copies: int = 1) -> Path:
    """``folder/llava_v1_5_mix665k.json`` with `RECORDS` (``copies`` times, ids suffixed after the
    first copy) and their images (random pixels, several sizes) under ``folder``, except `MISSING`.
    Written as the published file is (``json.dump`` with non-ASCII text kept)."""
    rng = np.random.default_rng(seed)
    records = []
    for c in range(copies):
        for rec in RECORDS:
            rec = json.loads(json.dumps(rec))
            if c:
                rec["id"] = f"{rec['id']}_{c}" if isinstance(rec["id"], str) else rec["id"] + 1000 * c
            records.append(rec)
    for k, image in enumerate(sorted({r["image"] for r in RECORDS if "image" in r} - {MISSING})):
        path = folder / image
        path.parent.mkdir(parents=True, exist_ok=True)
        w, h = (48 + 8 * k, 40 + 4 * (k % 3))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
    path = folder / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    return path
