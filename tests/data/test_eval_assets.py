"""The small evaluation subset shipped in the package (benchmarks run without rebuilding data)."""

from pathlib import Path

from PIL import Image

import specllava
from specllava.data.llava_format import load_json, validate_record

ASSETS = Path(specllava.__file__).resolve().parent / "assets"


def test_shipped_eval_sets_are_valid_llava_json_with_their_images():
    eval_dir = ASSETS / "eval"
    sets = {name: load_json(eval_dir / f"{name}.json") for name in ("descriptions", "photos", "easyvqa")}
    assert len(sets["descriptions"]) >= 20 and len(sets["photos"]) >= 8 and len(sets["easyvqa"]) >= 4
    for records in sets.values():
        for rec in records:
            validate_record(rec, eval_dir)
            with Image.open(eval_dir / rec["image"]) as im:
                assert im.size == (224, 224) and im.mode == "RGB"
    for rec in sets["descriptions"]:
        assert rec["meta"]["source"] == "smollm2-description" and rec["conversations"][-1]["from"] == "gpt"
    for rec in sets["photos"]:
        assert rec["conversations"][-1]["from"] == "human"  # a prompt, no reference answer


def test_shipped_assets_stay_small():
    total = sum(p.stat().st_size for p in (ASSETS / "eval").rglob("*") if p.is_file())
    assert total < 3_000_000
    with Image.open(ASSETS / "example.jpg") as im:
        assert im.format == "JPEG" and 224 <= min(im.size) <= 512
