"""tools/gpu_check.py on the CPU: its memory plan, its self-draft (the target's own first layers,
shared, a perfect draft once the upper layers are silenced), its exactness rule, and (slow) the
whole `--tiny` rehearsal writing its JSON and plots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import gpu_check  # noqa: E402

from specllava import SpeculativeDecoder  # noqa: E402


def test_the_plan_counts_the_7b_shaped_models_on_the_meta_device():
    plan = gpu_check.plan(torch.bfloat16, "full", 64, 2)
    assert 7.0e9 < plan["target_params"] < 7.1e9  # LLaVA-1.5-7B: Vicuna-7B + CLIP ViT-L/14 + projector
    assert plan["target_weights_gib"] == pytest.approx(plan["target_params"] * 2 / 2**30)
    assert plan["kv_positions"] == 1 + 576 + 24 + 64 + 128
    assert plan["total_gib"] < 16


@pytest.fixture(scope="module")
def tiny_target():
    text, vision, _ = gpu_check.SHAPES["tiny"]
    torch.manual_seed(0)
    return gpu_check.llava(text, vision, torch.float32, "cpu")


def test_the_self_draft_shares_the_targets_tensors(tiny_target):
    draft = gpu_check.self_draft(tiny_target, 1)
    assert draft.config.text_config.num_hidden_layers == 1 and tiny_target.config.text_config.num_hidden_layers == 4
    target_ptrs = {p.data_ptr() for p in tiny_target.parameters()}
    assert all(p.data_ptr() in target_ptrs for p in draft.parameters())
    assert gpu_check.params(draft) < gpu_check.params(tiny_target)


@torch.inference_mode()
def test_silenced_upper_layers_make_the_self_draft_always_right():
    text, vision, _ = gpu_check.SHAPES["tiny"]
    torch.manual_seed(0)
    target = gpu_check.llava(text, vision, torch.float32, "cpu")
    draft = gpu_check.self_draft(target, 1)
    inputs = gpu_check.prompt(target, 0, "cpu")
    before = target(**inputs).logits
    assert not torch.equal(before, draft(**inputs).logits)  # four layers are not one
    gpu_check.silence_upper_layers(target, 1, 0.0)
    assert torch.equal(target(**inputs).logits, draft(**inputs).logits)  # zeros added: bit for bit
    out = SpeculativeDecoder(target, draft, method="chain").generate(**inputs, max_new_tokens=16)
    ref = target.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert torch.equal(out.sequences, ref)
    assert out.stats["mean_accepted"] > 3  # every guess of the chain taken


@torch.inference_mode()
def test_the_exactness_rule_tells_a_near_tie_from_a_wrong_token(tiny_target):
    inputs = gpu_check.prompt(tiny_target, 1, "cpu")
    ref = tiny_target.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    assert gpu_check.near_tie(tiny_target, inputs, ref, ref, 4) == {"equal": True}
    logits = tiny_target(**inputs).logits[0, -1]
    worst = int(logits.argmin())  # the target's least likely token first: far from a tie
    verdict = gpu_check.near_tie(tiny_target, inputs, ref, [worst] + ref[1:], 4)
    assert verdict["position"] == 0 and not verdict["equal"] and not verdict["near_tie"]
    assert gpu_check.near_tie(tiny_target, inputs, ref, ref[:2], 4)["near_tie"] is False  # cut short


@pytest.mark.slow  # a minute or more: both parts' runs on tiny models
def test_the_tiny_rehearsal_writes_its_json_and_plots(tmp_path):
    done = subprocess.run([sys.executable, str(TOOLS / "gpu_check.py"), "--tiny", "--skip-tests", "--out", str(tmp_path),
                           "--new-tokens", "16", "--repeats", "1", "--dtype", "float32"],
                          capture_output=True, text=True, timeout=900, cwd=TOOLS.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(result["random_draft"]) == set(result["self_draft"]) == set(gpu_check.RUNS)
    assert result["exactness_failures"] == []
    assert result["self_draft"]["chain"]["mean_accepted"] > 2  # the self-draft is right
    # 16 tokens: enough steps for the calibrated tree to learn that this flat draft is always right (with 8,
    # whether its first trees go deep depends on the random target's tokens, which the thread count can flip)
    assert result["self_draft"]["dynamic"]["mean_accepted"] > 2 and result["self_draft"]["dynamic"]["tree_nodes_mean"] > 2
    for name in gpu_check.METHODS:
        assert result["self_draft"][name]["host_syncs_per_step"]["counted"] >= 1
    assert (tmp_path / "verify_cost.png").stat().st_size > 0 and (tmp_path / "methods.png").stat().st_size > 0
    for part in ("many_random_draft", "many_self_draft"):  # requests arriving together, c = 1 and 4
        summary = result[part]["summary"]
        assert set(summary) == {"hf", "ar", "dynamic"} and all(set(by_c) == {"1", "4"} for by_c in summary.values())
        assert all(x["tokens_per_s"] > 0 for by_c in summary.values() for x in by_c.values())
        assert result[part]["exactness_failures"] == []
        assert sum(e["equal"] is True for r in result[part]["runs"] for e in r["exactness"]) >= 4
        assert (tmp_path / f"{part}.png").stat().st_size > 0
