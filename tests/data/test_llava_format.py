import json

import pytest

from specllava.data.llava_format import (load_json, make_record, qa_pairs, save_json, split_of,
                                         split_records, validate_record)


def test_make_record_is_llava_format():
    rec = make_record("a/1", "images/a/1.png", [("What color?", "red"), ("And shape?", "circle")])
    assert rec["conversations"] == [
        {"from": "human", "value": "<image>\nWhat color?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And shape?"},
        {"from": "gpt", "value": "circle"},
    ]
    validate_record(rec)
    assert qa_pairs(rec) == [("What color?", "red"), ("And shape?", "circle")]


def test_open_question_allowed_only_at_the_end():
    rec = make_record("p", "images/p.png", [("Describe this image.", None)])
    validate_record(rec)
    assert qa_pairs(rec) == [("Describe this image.", None)]


@pytest.mark.parametrize("break_it, message", [
    (lambda r: r.pop("image"), "missing key"),
    (lambda r: r["conversations"].reverse(), "expected 'human'"),
    (lambda r: r["conversations"][1].update(value=" "), "empty value"),
    (lambda r: r["conversations"][0].update(value="no image token"), "<image>"),
    (lambda r: r["conversations"][1].update(value="<image> again"), "<image>"),
    (lambda r: r["conversations"][0].update(value="Q <image>"), "must start"),
    (lambda r: r.update(image="/abs/path.png"), "relative"),
])
def test_validate_rejects(break_it, message):
    rec = make_record("x", "images/x.png", [("Q", "A")])
    break_it(rec)
    with pytest.raises(ValueError, match=message):
        validate_record(rec)


def test_validate_checks_image_exists(tmp_path):
    rec = make_record("x", "images/x.png", [("Q", "A")])
    with pytest.raises(ValueError, match="not found"):
        validate_record(rec, tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(b"")
    validate_record(rec, tmp_path)


def _records(n_images=400, per_image=3):
    return [make_record(f"r{i}-{j}", f"images/{i}.png", [(f"Q{j}", "A")])
            for i in range(n_images) for j in range(per_image)]


def test_split_is_by_image_deterministic_and_seeded():
    recs = _records()
    train, test = split_records(recs, seed=0)
    train_images, test_images = {r["image"] for r in train}, {r["image"] for r in test}
    assert not train_images & test_images  # no test image ever appears in train
    assert len(train) + len(test) == len(recs)
    assert 0.05 < len(test_images) / 400 < 0.15  # ~10%
    assert split_records(recs, seed=0) == (train, test)  # same seed, same split
    assert {r["image"] for r in split_records(recs, seed=1)[1]} != test_images


def test_split_of_one_image_does_not_depend_on_the_others():
    recs = _records()
    _, test_all = split_records(recs, seed=3)
    _, test_half = split_records(recs[: len(recs) // 2], seed=3)
    assert {r["id"] for r in test_half} <= {r["id"] for r in test_all}
    assert split_of("images/7.png", 3) == split_of("images/7.png", 3)


def test_save_and_load_roundtrip(tmp_path):
    recs = _records(5, 1)
    save_json(recs, tmp_path / "d.json")
    assert load_json(tmp_path / "d.json") == recs
    assert isinstance(json.loads((tmp_path / "d.json").read_text()), list)
