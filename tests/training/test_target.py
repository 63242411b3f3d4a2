"""Target training on a tiny assembled LLaVA: LoRA export merges exactly; a short run trains and exports."""

import json

import torch
from tiny_data import make_dataset
from transformers import LlavaForConditionalGeneration

from specllava.models.shipped import apply_target_weights
from specllava.training.target import TargetTrainConfig, add_lora, export_weights, keyword_recall, train_target


def test_lora_export_merges_into_the_same_model(assembled_pair):
    torch.manual_seed(0)
    wrapped = LlavaForConditionalGeneration.from_pretrained(assembled_pair.target_dir).eval()
    lora = add_lora(wrapped, rank=2, alpha=4.0)
    with torch.no_grad():
        for m in lora.values():
            m.lora_B.normal_(0, 0.05)
    tensors, meta = export_weights(wrapped, lora, alpha=4.0, rank=2)
    merged = LlavaForConditionalGeneration.from_pretrained(assembled_pair.target_dir).eval()
    from safetensors.torch import save_file

    save_file(tensors, str(assembled_pair.target_dir.parent / "lora.safetensors"), metadata=meta)
    apply_target_weights(merged, assembled_pair.target_dir.parent / "lora.safetensors")
    ids = torch.randint(5, 200, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, wrapped(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_short_training_run_writes_shippable_weights(tmp_path, assembled_pair):
    data = make_dataset(tmp_path / "d", n=4)
    out = tmp_path / "run"
    cfg = TargetTrainConfig(data=data, eval_data=data, out=out, init=assembled_pair.target_dir, steps=3, batch_size=2,
                            lora_rank=2, warmup=1, eval_every=3, eval_examples=2, bf16=False, threads=1)
    summary = train_target(cfg, log=lambda *a: None)
    assert summary["steps"] == 3 and summary["final_eval_loss"] is not None
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    model = LlavaForConditionalGeneration.from_pretrained(assembled_pair.target_dir).eval()
    before = model.model.multi_modal_projector.linear_1.weight.clone()
    apply_target_weights(model, out / "target.safetensors")
    assert not torch.equal(before, model.model.multi_modal_projector.linear_1.weight)
    assert (out / "loss.png").is_file()


def test_keyword_recall_matches_words_and_plurals():
    assert keyword_recall("Two red cats sit on a mat.", ["cat", "red", "dog"]) == 2 / 3
    assert keyword_recall("A tiger in the jungle", ["jungle tiger", "lion"]) == 0.5
