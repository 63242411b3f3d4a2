import json

import pytest

from specllava.data.describe import clean_output, degenerate_reason, prompt_messages, read_done
from specllava.data.openclipart import ClipartMeta

GOOD = ("The image shows a red apple with a short brown stem and a single green leaf. "
        "The apple is drawn with bold black outlines on a white background.")


def test_good_description_passes():
    assert degenerate_reason(GOOD) is None


@pytest.mark.parametrize("text, reason", [
    ("The image shows an apple.", "too short"),
    ("The image shows " + "a red apple and " * 10 + "a leaf.", "repetitive"),
    ("The image shows a big red apple on a table. " * 3, "repetitive"),
    ("The image shows a red apple with a stem and a leaf on it, drawn in a simple style, and "
     "it sits on", "unfinished"),
    (GOOD + " The keywords suggest fruit and food in general.", "talks about the request"),
    ("The image shows:\n- a red apple with a brown stem\n- a green leaf on the top of it.\n"
     "- a white background.", "not prose"),
    ("The apple is red. " + GOOD + " It has a leaf and a stem on top. The apple is red.",
     "repeated sentence"),
    (" ".join(["word"] * 5 + [f"w{i}" for i in range(130)]) + ".", "too long"),
])
def test_degenerate_outputs_are_caught(text, reason):
    assert degenerate_reason(text) == reason


def test_clean_output_cuts_unfinished_and_meta_sentences():
    raw = GOOD + " The text describes the apple without any formatting. It is also"
    assert clean_output(raw) == GOOD
    assert degenerate_reason(clean_output(raw)) is None


def test_prompt_holds_the_metadata():
    meta = ClipartMeta(id="openclipart/food/apple", path="food/apple.svg", title="Apple",
                       description="A ripe apple", keywords=["food", "fruit"], category="food")
    msgs = prompt_messages(meta)
    assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "user"
    for part in ("Title: Apple", "Keywords: food, fruit", "Description: A ripe apple", "2 to 4 sentences"):
        assert part in msgs[-1]["content"]


def test_read_done_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "a", "text": GOOD, "ok": True}) + "\n" + '{"id": "b", "te')
    assert list(read_done(path)) == ["a"]
