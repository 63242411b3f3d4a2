"""Training an EAGLE head (`specllava.training.eagle`) on a tiny assembled LLaVA: the loss, the
command end to end, and the head it writes decoding losslessly."""

import json

import torch
from tiny_data import make_dataset

from specllava import SpeculativeDecoder
from specllava.core.eagle import EagleHead
from specllava.training.common import load_records
from specllava.training.eagle import Trainer, collate, extract_features


def test_training_steps_lower_the_loss(tmp_path, tiny_models):
    target, processor = tiny_models
    records, root = load_records(make_dataset(tmp_path, n=3))
    examples = extract_features(target, processor, [(r, root) for r in records], tmp_path / "features.pt")
    assert [e["feats"].shape[0] for e in examples] == [e["ids"].numel() for e in examples]
    torch.manual_seed(0)
    head = EagleHead.from_target(target)
    vocab = torch.arange(target.get_output_embeddings().weight.shape[0])
    trainer = Trainer(head, target, vocab, passes=2, reg_weight=0.0, noise=0.0)
    batch = collate(examples, head.shape.hidden)
    p = trainer.forward(batch)[2]  # the target's distributions: cross-entropy = their entropy + KL
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(12):
        loss, parts = trainer.loss(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert trainer.loss(batch)[0].item() - entropy < 0.7 * (first - entropy)
    assert set(parts) == {"ce1", "ce2"}


def test_train_eagle_cli_end_to_end(tmp_path, assembled_pair, tiny_models):
    from specllava.training.cli import main

    data = make_dataset(tmp_path / "d", n=3, answered=False)
    out = tmp_path / "run"
    rc = main(["train-eagle", "--target", str(assembled_pair.target_dir), "--data", str(data), "--out", str(out),
               "--regenerate", "--sampled-answers", "2", "--max-new-tokens", "6", "--steps", "3", "--batch-size", "2",
               "--eval-data", str(data), "--eval-prompts", "2", "--eval-max-new-tokens", "6", "--no-bf16",
               "--held-out-fraction", "0.4"])
    assert rc == 0
    assert len((out / "answers.jsonl").read_text().splitlines()) == 3
    assert len((out / "sampled_answers.jsonl").read_text().splitlines()) == 2
    report = json.loads((out / "report.json").read_text())
    assert len(report["after"]["top1_agreement"]) == 3 and report["steps"] == 3
    assert report["eval"]["data"]["prompts"] == 2 and report["eval"]["data"]["mean_accepted"] >= 1.0
    assert (out / "loss.png").is_file()
    head = EagleHead.load(out)
    assert head.token_ranking  # from the training answers: the default draft vocabulary
    # the head decodes losslessly with its target
    target, processor = tiny_models
    from PIL import Image

    rec = json.loads(data.read_text())[0]
    enc = processor(images=[Image.open(data.parent / rec["image"]).convert("RGB")], text=["<image>Describe."],
                    return_tensors="pt")
    with torch.inference_mode():
        ref = target.generate(**enc, max_new_tokens=12, do_sample=False)
    got = SpeculativeDecoder(target, head).generate(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"],
                                                    max_new_tokens=12)
    assert got.sequences.tolist() == ref.tolist()
