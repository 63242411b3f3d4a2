"""The LLaVA-JSON loader (the published llava_v1_5_mix665k format), tokenisation (assistant-only loss mask,
<image> expansion, text-only records), batches with and without images, the disk feature cache; clear errors."""

import json

import pytest
import torch
from mix665k import MISSING, RECORDS, make_mix665k
from tiny_data import make_dataset

from specllava.training.common import (
    Examples,
    FeatureCache,
    Records,
    _scan_json_array,
    answer_logits,
    answered_records,
    collate,
    encode_record,
    load_records,
    split_held_out,
    with_images,
)


def test_loader_reads_records_and_their_image_folder(tmp_path):
    path = make_dataset(tmp_path, n=3)
    records, root = load_records(path)
    assert len(records) == 3 and root == tmp_path
    assert (root / records[0]["image"]).is_file()


@pytest.mark.parametrize("bad, message", [
    ({"image": "x.png", "conversations": [{"from": "gpt", "value": "hi"}]}, "has no human turn"),
    ({"image": "x.png", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
     "turn 1 must be from 'gpt'"),
    ({"image": "x.png", "conversations": [{"from": "human", "value": "no image here"}]}, "needs the one <image>"),
    ({"conversations": [{"from": "human", "value": "<image>\nhi"}]}, "has <image> but no 'image'"),
    ({"image": "x.png"}, "needs a non-empty 'conversations'"),
    ({"id": 7, "image": 3, "conversations": [{"from": "human", "value": "<image>"}]}, "record 7: 'image' must be a path"),
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


def test_not_a_list_and_a_truncated_file_are_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"id": 1}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_records(path)
    path.write_text('[{"id": 1, "conversations": [{"from": "human", "value": "hi"}]}, {"id": 2, "conv')
    with pytest.raises(ValueError, match="not valid JSON|not closed"):
        load_records(path)


def test_the_published_format_is_read_as_llava_reads_it(tmp_path):
    path = make_mix665k(tmp_path)
    records, root = load_records(path)
    assert isinstance(records, Records) and len(records) == len(RECORDS) and root == tmp_path
    published = json.loads(path.read_text(encoding="utf-8"))
    for i, rec in enumerate(published):  # each record read back on its own, from its byte span
        got = records[i]
        assert got["id"] == rec["id"] and got.get("image") == rec.get("image")
        want = rec["conversations"][1:] if rec["conversations"][0]["from"] == "gpt" else rec["conversations"]
        assert got["conversations"] == want  # a leading gpt turn is dropped, as LLaVA's training drops it
    assert sum(records.image(i) is None for i in range(len(records))) == 3  # ShareGPT: text-only
    # the spans hold for any read size, non-ASCII text included
    small = [(start, size) for start, size, _ in _scan_json_array(path, chunk_chars=37)]
    assert small == [tuple(map(int, span)) for span in records._spans]
    kept = with_images(records, root, log=(logged := []).append)
    assert len(kept) == len(RECORDS) - 1 and MISSING not in {kept.image(i) for i in range(len(kept))}
    assert logged == [f"skipping 1 of {len(RECORDS)} records whose image is missing under {root} (e.g. {MISSING})"]
    answered = answered_records(kept)
    assert len(answered) == len(kept) - 1 and "q8ZuGQN_0" not in [answered.id(i) for i in range(len(answered))]
    train, held = split_held_out(answered, 0.3, seed=0)
    assert isinstance(train, Records) and len(train) + len(held) == len(answered)


def test_text_only_and_image_records_tokenize_and_batch_together(tmp_path, tiny_models):
    """A mixed batch: the image rows get their features, the text rows none, and the cached-feature
    forward equals the stock model's for each row alone (from pixels, or text only)."""
    target, processor = tiny_models
    records, root = load_records(make_mix665k(tmp_path))
    records = answered_records(with_images(records, root, log=lambda *a: None))
    n_image = target.config.image_seq_length
    examples = Examples([(records, root)], processor.tokenizer, n_image)
    text = [e for e in examples if e.image is None]
    assert len(text) == 2 and all(target.config.image_token_id not in e.input_ids for e in text)
    assert processor.tokenizer.decode([t for t, m in zip(text[0].input_ids, text[0].loss_mask) if m]).startswith("1. Homogeneity")
    assert int(examples.lengths[1]) < int(examples.lengths[0])  # the text-only record has no image tokens
    batch = [examples[0], examples[1], examples[2]]  # image, text, image
    ids, att, feats, pos, labels = collate(batch, FeatureCache(target, processor), processor.tokenizer.pad_token_id)
    assert feats.shape[0] == 2
    with torch.no_grad():
        logits = answer_logits(target, ids, feats, att, pos)
        for b, e in enumerate(batch):
            row = pos[0] == b
            n = len(e.input_ids)
            kwargs = {"pixel_values": FeatureCache(target, processor).pixel_values(e.image)} if e.image else {}
            stock = target(input_ids=ids[b : b + 1, :n], **kwargs).logits[0, pos[1][row]]
            torch.testing.assert_close(logits[row], stock, atol=1e-4, rtol=1e-4)


def test_the_disk_feature_cache_stops_at_its_cap_and_equals_recomputing(tmp_path, tiny_models):
    target, processor = tiny_models
    records, root = load_records(make_mix665k(tmp_path / "d"))
    images = [root / records.image(i) for i in range(len(records)) if records.image(i) and records.image(i) != MISSING]
    plain = FeatureCache(target, processor).features(images)
    one = plain[0].numel() * plain[0].element_size()
    cache = FeatureCache(target, processor, tmp_path / "features", max_bytes=int(2.5 * one))
    assert cache.directory is not None and FeatureCache(target, processor, tmp_path / "none").directory is None
    got = cache.features(images)
    files = sorted((tmp_path / "features").glob("*.pt"))
    assert len(files) == 3 and cache.used >= 2.5 * one  # written until the cap was reached, then none
    again = FeatureCache(target, processor, tmp_path / "features", max_bytes=int(2.5 * one))
    for a, b, c in zip(plain, got, again.features(images)):  # cached entries equal recomputed ones exactly
        assert torch.equal(a, b) and torch.equal(a, c)
