"""The LLaVA conversation JSON loader and the built-in set lookup."""

import json

import pytest

from specllava.bench.prompts import builtin_set, load_llava_json


def test_loads_prompts_and_resolves_images_against_the_file_folder(llava_json):
    prompts = load_llava_json(llava_json)
    assert [p.id for p in prompts] == ["rec0", "rec1"]
    assert prompts[0].prompt == "Describe picture 0."  # <image>\n removed
    assert prompts[1].image == llava_json.parent / "imgs" / "1.png" and prompts[1].image.is_file()


def test_image_root_and_lenient_records(tmp_path, llava_json):
    recs = [
        {"id": "after", "image": "1.png", "conversations": [{"from": "human", "value": "What is it?\n<image>"}]},
        {"conversations": [{"from": "human", "value": "A text-only question."}]},
    ]
    path = tmp_path / "x.json"
    path.write_text(json.dumps(recs))
    prompts = load_llava_json(path, image_root=llava_json.parent / "imgs")
    assert prompts[0].prompt == "What is it?" and prompts[0].image.name == "1.png"
    assert prompts[1].id == "1" and prompts[1].image is None


@pytest.mark.parametrize("content, message", [
    ({"not": "a list"}, "expected a JSON list"),
    ([{"id": "a", "image": "x.png"}], "no 'conversations' list"),
    ([{"id": "a", "conversations": [{"from": "gpt", "value": "hi"}]}], "first turn must be"),
    ([{"id": "a", "conversations": [{"from": "human", "value": "<image>"}]}], "no text besides"),
    ([{"id": "a", "image": "missing.png", "conversations": [{"from": "human", "value": "Hi"}]}], "--image-root"),
    ([], "holds no records"),
])
def test_bad_files_are_named_with_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_llava_json(path)


def test_limit_reads_only_the_first_records(tmp_path, llava_json):
    import json as _json

    recs = _json.loads(llava_json.read_text())
    recs.append({"id": "broken", "image": "gone.png", "conversations": [{"from": "human", "value": "Hi"}]})
    path = llava_json.parent / "with_broken.json"
    path.write_text(_json.dumps(recs))
    assert [p.id for p in load_llava_json(path, limit=2)] == ["rec0", "rec1"]
    with pytest.raises(ValueError, match="gone.png"):
        load_llava_json(path)


def test_missing_file_and_unknown_or_missing_set(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_llava_json(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="unknown evaluation set"):
        builtin_set("coco")
    with pytest.raises(ValueError, match="eval_assets"):
        builtin_set("in-domain", eval_dir=tmp_path)
