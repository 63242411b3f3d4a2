"""The draft is built on its training device without copies, and the memory its training holds is
counted on the meta device as a real run holds it; train-draft runs on the published 665K format."""

import pytest
import torch
from mix665k import make_mix665k

from specllava.training.distill import DistillConfig, make_draft, trainable_parameters, train_draft
from specllava.training.memory import llava_1_5_7b_config, training_memory


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_the_draft_shares_the_targets_frozen_tensors_and_trains_fresh_float32_ones(tiny_models):
    target, _ = tiny_models
    target = target.to(torch.bfloat16)
    theirs = {_storage(p) for p in target.parameters()}
    for cfg in (DistillConfig(data=None, draft_layers=1), DistillConfig(data=None, draft_preset="llava-68m")):
        draft, frozen = make_draft(target, cfg, device="cpu")
        trained = trainable_parameters(draft, frozen)
        for name, p in draft.named_parameters():
            if name in trained:  # a fresh float32 tensor: training never writes into the target
                assert p.dtype == torch.float32 and _storage(p) not in theirs, name
            else:  # tower (and the target's embedding and head): the target's own storage, its dtype
                assert _storage(p) in theirs and p.dtype == torch.bfloat16, name
        assert not any(t.is_meta for t in draft.state_dict().values())
    # the draft's first layer starts as the target's, and rotary buffers are the target's
    draft, _ = make_draft(target, DistillConfig(data=None, draft_layers=1), device="cpu")
    a, b = draft.model.language_model.layers[0].mlp.up_proj.weight, target.model.language_model.layers[0].mlp.up_proj.weight
    assert torch.equal(a, b.float())
    with torch.no_grad():
        a.add_(1.0)
    assert not torch.equal(a, b.float())  # trained in place: the target is untouched


def test_memory_counted_on_meta_is_what_a_real_run_holds(tiny_models):
    target, _ = tiny_models
    for cfg in (DistillConfig(data=None, draft_layers=1), DistillConfig(data=None, draft_preset="llava-68m")):
        counted = training_memory(target.config, cfg, dtype=torch.float32)
        draft, frozen = make_draft(target, cfg, device="cpu")
        theirs = {_storage(p) for p in target.parameters()}
        params = trainable_parameters(draft, frozen)
        opt = torch.optim.AdamW(params.values())
        for p in params.values():
            p.grad = torch.zeros_like(p)
        opt.step()
        moments = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
        own = {_storage(p): p.numel() * p.element_size() for p in draft.parameters() if _storage(p) not in theirs}
        assert counted["target_parameters"] == sum(p.numel() * p.element_size() for p in target.parameters())
        assert counted["draft_parameters"] == sum(own.values())
        assert counted["gradients"] == sum(p.numel() * 4 for p in params.values())
        assert counted["optimizer"] == moments


def test_llava_1_5_7b_memory_with_the_presets():
    """The numbers docs/training.md gives (tools/draft_memory.py prints them)."""
    config = llava_1_5_7b_config()
    small = training_memory(config, DistillConfig(data=None, draft_preset="llava-68m"))
    assert small["target_parameters"] == 2 * 7_063_427_072  # llava-1.5-7b-hf's parameter count, bf16
    assert round(small["total"] / 1e9, 2) == 15.24
    assert round(training_memory(config, DistillConfig(data=None, draft_preset="llava-160m"))["total"] / 1e9, 2) == 16.75


def test_train_draft_on_the_published_format(tmp_path, assembled_pair):
    data = make_mix665k(tmp_path / "d")
    lines = []
    cfg = DistillConfig(target=assembled_pair.target_dir, data=data, out=tmp_path / "run", draft_layers=1, steps=2,
                        batch_size=4, warmup=1, eval_prompts=1, eval_max_new_tokens=3, held_out_fraction=0.2,
                        bf16=False, feature_cache_gb=1.0)
    report = train_draft(cfg, log=lines.append)
    assert report["steps"] == 2
    text = "\n".join(lines)
    assert "records whose image is missing" in text and "text-only (trained without an image)" in text
    assert any((tmp_path / "run" / "features").glob("*.pt"))  # the disk cache, capped at 1 GB
    assert all(r["prompts"] == 1 for r in report["eval"].values())  # held-out prompts with an image


def test_train_eagle_and_train_target_take_the_load_flags_and_the_published_format(tmp_path, assembled_pair):
    import json

    from specllava.training.cli import main

    data = make_mix665k(tmp_path / "d")  # text-only records and a missing image included
    load = ["--dtype", "float32", "--device", "cpu", "--attn-implementation", "eager"]
    out = tmp_path / "eagle"
    assert main(["train-eagle", "--target", str(assembled_pair.target_dir), "--data", str(data), "--out", str(out),
                 "--steps", "2", "--batch-size", "2", "--held-out-fraction", "0.3", *load]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["dtype"], config["device"], config["attn_implementation"]) == ("float32", "cpu", "eager")
    examples = torch.load(out / "features.pt", weights_only=False)["examples"]
    assert sum(e["image"] is None for e in examples) == 2 and len(examples) == 8  # answered, image found or none
    out = tmp_path / "target"
    assert main(["train-target", "--init", str(assembled_pair.target_dir), "--data", str(data), "--eval-data", str(data),
                 "--out", str(out), "--steps", "2", "--batch-size", "2", "--eval-every", "2", *load,
                 "--feature-cache-gb", "0.5"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert (out / "target.safetensors").is_file() and any((out / "features").glob("*.pt"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is visible)")
def test_the_draft_is_built_on_the_gpu_with_no_memory_but_its_trained_tensors(tiny_models):
    target = tiny_models[0].to("cuda", torch.bfloat16)
    theirs = {_storage(p) for p in target.parameters()}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    draft, frozen = make_draft(target, DistillConfig(data=None, draft_preset="llava-68m"), device="cuda")
    torch.cuda.synchronize()
    trained = trainable_parameters(draft, frozen)
    assert all(p.device.type == "cuda" for p in draft.parameters())
    assert all(_storage(p) in theirs for n, p in draft.named_parameters() if n not in trained)
    own = sum(p.numel() * 4 for p in trained.values()) + sum(b.numel() * b.element_size() for b in draft.buffers())
    assert torch.cuda.memory_allocated() - before <= own * 1.01 + 2**20  # the trained tensors, no tower copy
