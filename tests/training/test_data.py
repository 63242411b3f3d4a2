"""The LLaVA-JSON loader and tokenisation: assistant-only loss mask, <image> expansion, clear errors."""

import json

import pytest
from tiny_data import make_dataset

from specllava.training.common import encode_record, load_records, split_held_out


def test_loader_reads_records_and_their_image_folder(tmp_path):
    path = make_dataset(tmp_path, n=3)
    records, root = load_records(path)
    assert len(records) == 3 and root == tmp_path
    assert (root / records[0]["image"]).is_file()


@pytest.mark.parametrize("bad, message", [
    ({"image": "x.png", "conversations": [{"from": "gpt", "value": "hi"}]}, "turn 0 must be from 'human'"),
    ({"image": "x.png", "conversations": [{"from": "human", "value": "no image here"}]}, "has no <image>"),
    ({"conversations": [{"from": "human", "value": "<image>\nhi"}]}, "needs 'image'"),
])
def test_loader_names_the_problem(tmp_path, bad, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([bad]))
    with pytest.raises(ValueError, match=message):
        load_records(path)


def test_loss_mask_covers_exactly_the_assistant_turns(tmp_path, tiny_models):
    target, processor = tiny_models
    records, root = load_records(make_dataset(tmp_path, n=2))
    tok = processor.tokenizer
    ex = encode_record(records[1], tok, target.config.image_seq_length, root)  # two QA turns
    assert len(ex.input_ids) == len(ex.loss_mask)
    assert sum(t == target.config.image_token_id for t in ex.input_ids) == target.config.image_seq_length
    answer = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert answer == "A picture number 1 with dots.<|im_end|>\nred<|im_end|>\n"
    prompt = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if not m])
    assert "Describe this image." in prompt and "What color?" in prompt and "dots" not in prompt
    # the whole sequence is what the processor + chat template produce for the conversation
    full = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]},
         {"role": "assistant", "content": "A picture number 1 with dots."},
         {"role": "user", "content": [{"type": "text", "text": "What color?"}]},
         {"role": "assistant", "content": "red"}], tokenize=False)
    assert tok.decode(ex.input_ids) == full.replace("<image>", "<image>" * target.config.image_seq_length)


def test_unanswered_record_is_refused_with_a_hint(tmp_path, tiny_models):
    target, processor = tiny_models
    records, root = load_records(make_dataset(tmp_path, n=1, answered=False))
    with pytest.raises(ValueError, match="--regenerate"):
        encode_record(records[0], processor.tokenizer, target.config.image_seq_length, root)


def test_held_out_split_keeps_an_image_on_one_side():
    recs = [{"image": f"img{i % 7}.png", "id": str(i)} for i in range(70)]
    train, held = split_held_out(recs, 0.3, seed=1)
    assert {r["image"] for r in train}.isdisjoint({r["image"] for r in held})
    assert len(train) + len(held) == 70
