"""End to end on synthetic drawings: valid LLaVA JSON, split by image, deterministic with the seed."""

import json

import pytest

pytest.importorskip("cairosvg")
pytest.importorskip("easy_vqa")
pytest.importorskip("skimage")

from specllava.data.build import BuildConfig, build, select_clipart_for_descriptions  # noqa: E402
from specllava.data.llava_format import load_json, validate_record  # noqa: E402

DESC = ("The image shows a ripe piece of fruit with a short stem and one green leaf. It is drawn "
        "with bold outlines and bright flat colours on a plain white background.")


def _build(out, clipart_root, seed=0):
    metas = select_clipart_for_descriptions(clipart_root, limit=None, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "descriptions.jsonl").open("w") as f:  # as the SmolLM2 job would have written
        for i, m in enumerate(metas):
            raw = DESC if i % 3 else "The image shows " + "a fruit and " * 20 + "a leaf."
            f.write(json.dumps({"id": m.id, "text": raw, "raw": raw, "ok": True}) + "\n")
    cfg = BuildConfig(out=out, clipart_root=clipart_root, limit_easyvqa=30, describe=False,
                      seed=seed, test_fraction=0.3)
    return build(cfg)


def test_build_writes_valid_split_llava_json(tmp_path, clipart_root):
    out = tmp_path / "data"
    summary = _build(out, clipart_root)
    train, test = load_json(out / "train.json"), load_json(out / "test.json")
    for rec in train + test + load_json(out / "photos.json"):
        validate_record(rec, out)  # images exist, relative paths, proper turns
    assert not {r["image"] for r in train} & {r["image"] for r in test}
    sources = {r["meta"]["source"] for r in train + test}
    assert sources == {"openclipart", "smollm2-description", "easy-vqa"}
    # blank and broken drawings are skipped; the 8-file icon set is renamed, not dropped
    ids = {r["id"] for r in train + test}
    assert "openclipart/misc/blank" not in ids and "openclipart/misc/broken" not in ids
    assert sum(i.startswith("openclipart/computer/icons/") for i in ids) == 8
    # degenerate descriptions (every third one here) are filtered out
    described = [r for r in train + test if r["meta"]["source"] == "smollm2-description"]
    rejected = summary["rejected_descriptions"]
    assert rejected["repetitive"] >= 3 and set(rejected) <= {"repetitive", "image did not render"}
    assert len(described) + sum(rejected.values()) == 11  # 10 fruits + the blank drawing
    assert all(r["conversations"][1]["value"] == DESC for r in described)
    test_desc = load_json(out / "test_descriptions.json")
    assert {r["id"] for r in test_desc} == {r["id"] for r in described if r in test}
    assert all(r["conversations"][-1]["from"] == "human" for r in load_json(out / "photos.json"))


def test_build_is_deterministic_with_the_seed(tmp_path, clipart_root):
    _build(tmp_path / "a", clipart_root, seed=5)
    _build(tmp_path / "b", clipart_root, seed=5)
    for name in ("train.json", "test.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    _build(tmp_path / "c", clipart_root, seed=6)
    assert (tmp_path / "a" / "test.json").read_text() != (tmp_path / "c" / "test.json").read_text()
