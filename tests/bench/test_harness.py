"""`specllava bench` end to end on a tiny assembled pair, and the exact-match accounting."""

import json

import pytest
import torch

from random_models import llava_prompt, perturbed_copy, tiny_llava
from specllava.bench.harness import divergence, exact_match, method_order
from specllava.bench.methods import ALL_METHODS
from specllava.bench.prompts import BenchPrompt
from specllava.cli import main


def test_bench_runs_end_to_end_and_writes_json_markdown_and_plots(assembled_pair, llava_json, tmp_path):
    target, draft = assembled_pair.target_dir, assembled_pair.draft_dir
    out = tmp_path / "out"
    rc = main(["bench", "--dtype", "float32", "--target", str(target), "--draft", str(draft), "--data", str(llava_json),
               "--max-new-tokens", "10", "--temperature", "0", "1", "--threads", "1", "--repeats", "2",
               "--tree-option", "min_path_conf=0", "--draft-vocab", "64", "--out", str(out), "--no-progress",
               "--variant", "dyn-shallow=dynamic:max_depth=2,min_feed_mass=0.2,draft_vocab=32"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["sections"]) == {"set T=0", "set T=1"}
    assert res["machine"]["torch_threads"] == 1 and res["tree_options"] == {"min_path_conf": 0}
    methods = ALL_METHODS + ("dyn-shallow",)
    for name, sec in res["sections"].items():
        recs = sec["records"]
        assert len(recs) == 2 * 2 * len(methods)  # prompts x repeats x methods
        assert {r["method"] for r in recs} == set(methods)
        assert max(len(r["stats"]["accept_by_depth"]) for r in recs if r["method"] == "dyn-shallow") <= 2
        for r in recs:
            assert 1 <= r["new_tokens"] <= 10 and r["decode_s"] > 0 and r["e2e_s"] >= r["decode_s"]
            assert r["peak_rss_mb"] > 0
        summary = res["summary"][name]
        assert summary["hf"]["speedup"] == pytest.approx(1.0) and summary["hf"]["speedup_cpu"] == pytest.approx(1.0)
        assert summary["dynamic"]["tree_nodes_mean"] > 0
        assert summary["dyn-shallow"]["draft_forwards_per_step"] <= 2
    # float32, T=0: every specllava method (and HF's assisted generation) equals hf token for token
    greedy = res["sections"]["set T=0"]
    assert greedy["divergences"] == []
    assert all(greedy["exact_match"][m]["rate"] == 1.0 for m in methods)
    assert "exact_match" not in res["sections"]["set T=1"]  # not defined when sampling
    table = (out / "table.md").read_text()
    assert all(f"| {m} |" in table for m in methods) and "## set T=1" in table
    for png in ("bench_speedup.png", "bench_acceptance.png", "bench_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_method_takes_every_slot_equally_often():
    methods = ("a", "b", "c")
    orders = [method_order(methods, t) for t in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for slot in range(3):
        assert sorted(o[slot] for o in orders) == ["a", "b", "c"]


def _rec(method, tokens, pid="p", repeat=0):
    return {"method": method, "prompt_id": pid, "repeat": repeat, "tokens": tokens}


def test_exact_match_counts_per_run_and_explains_each_divergence():
    target = tiny_llava(0)
    ids, px = llava_prompt(1)
    inputs = {"input_ids": ids, "pixel_values": px, "attention_mask": torch.ones_like(ids)}
    ref = target.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    wrong = ref[:3] + [(ref[3] + 1) % 90 + 3] + ref[4:]
    records = [_rec("hf", ref), _rec("hf", ref, repeat=1),
               _rec("good", ref), _rec("good", ref, repeat=1),
               _rec("bad", ref), _rec("bad", wrong, repeat=1),
               _rec("short", ref[:4])]
    share, divs = exact_match(target, [inputs], [BenchPrompt("p", "x", None)], records)
    assert share["good"] == {"matched": 2, "runs": 2, "rate": 1.0}
    assert share["bad"] == {"matched": 1, "runs": 2, "rate": 0.5}
    assert share["short"]["rate"] == 0.0
    bad = [d for d in divs if d["method"] == "bad"]
    assert len(bad) == 1 and bad[0]["repeat"] == 1 and bad[0]["position"] == 3
    assert bad[0]["hf_token"] == ref[3] and bad[0]["method_token"] == wrong[3]
    # the margin is the target's own top-2 gap at that position, and its top-1 is hf's token
    full = torch.cat([ids, torch.tensor([ref[:3]])], dim=1)
    with torch.no_grad():
        logits = target(input_ids=full, pixel_values=px).logits[0, -1]
    top = logits.topk(2).values
    assert bad[0]["top1"] == ref[3]
    assert bad[0]["margin"] == pytest.approx(float(top[0] - top[1]), rel=1e-4)
    short = [d for d in divs if d["method"] == "short"][0]
    assert short["position"] == 4 and short["method_token"] is None


def test_divergence_of_an_early_stop_points_past_the_shorter_output():
    target = tiny_llava(0)
    ids, px = llava_prompt(2)
    d = divergence(target, {"input_ids": ids, "pixel_values": px}, [5, 6, 7], [5, 6])
    assert d["position"] == 2 and d["hf_token"] == 7 and d["method_token"] is None


def test_hf_assisted_runs_with_a_llava_draft_at_both_temperatures():
    from specllava.bench.methods import MethodRunner, Sampling

    target = tiny_llava(0)
    draft = perturbed_copy(target, 0.02, seed=1)
    ids, px = llava_prompt(3)
    inputs = {"input_ids": ids, "pixel_values": px, "attention_mask": torch.ones_like(ids)}
    hf = MethodRunner("hf", target, None)(inputs, 12, Sampling(0.0), seed=0)
    assisted = MethodRunner("hf-assisted", target, draft)(inputs, 12, Sampling(0.0), seed=0)
    assert assisted.tokens == hf.tokens
    sampled = MethodRunner("hf-assisted", target, draft)(inputs, 12, Sampling(1.0), seed=0)
    assert sampled.new_tokens == 12


def test_method_runner_passes_draft_quant_to_the_decoder():
    from specllava.bench.methods import MethodRunner

    target, draft = tiny_llava(0), tiny_llava(1)
    assert MethodRunner("dynamic", target, draft, {}, None, "none").decoder.draft_backend.kind == "transformers"
    assert MethodRunner("chain", target, draft, {}, 32, "none").decoder.draft_backend.quant is None
    assert MethodRunner("dynamic", target, draft, {}, None, "int8").decoder.draft_backend.quant == "int8"


def test_bench_measures_an_eagle_head_beside_the_draft(assembled_pair, llava_json, tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    from specllava.core.eagle import EagleHead

    target, draft = assembled_pair.target_dir, assembled_pair.draft_dir
    head = EagleHead.from_target(LlavaForConditionalGeneration.from_pretrained(target), token_ranking=list(range(50)))
    head_file = head.save(tmp_path / "head" / "eagle_head.safetensors")
    out = tmp_path / "out"
    rc = main(["bench", "--dtype", "float32", "--target", str(target), "--draft", str(draft), "--data", str(llava_json), "--methods",
               "hf,dynamic", "--max-new-tokens", "8", "--threads", "1", "--out", str(out), "--no-progress",
               "--eagle", str(head_file.parent), "--variant", "eagle=dynamic:draft=eagle"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    sec = res["sections"]["set T=0"]
    assert sec["exact_match"]["eagle"]["rate"] == 1.0 and res["models"]["eagle"] == str(head_file.parent)
    assert all(r["stats"]["draft_forwards"] > 0 for r in sec["records"] if r["method"] == "eagle")
    # the head as --draft serves every draft method, but cannot be transformers' assistant
    assert main(["bench", "--dtype", "float32", "--target", str(target), "--draft", str(head_file), "--data", str(llava_json), "--methods",
                 "hf,chain", "--max-new-tokens", "4", "--threads", "1", "--out", str(tmp_path / "o2"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["bench", "--dtype", "float32", "--target", str(target), "--draft", str(head_file), "--data", str(llava_json), "--methods",
                 "hf,hf-assisted", "--max-new-tokens", "4", "--out", str(tmp_path / "o3"), "--no-progress"]) == 2
    assert "an EAGLE head cannot be transformers' assistant" in capsys.readouterr().err
    assert main(["bench", "--dtype", "float32", "--target", str(target), "--draft", str(draft), "--data", str(llava_json), "--methods", "hf",
                 "--variant", "e=dynamic:draft=eagle", "--out", str(tmp_path / "o4"), "--no-progress"]) == 2
    assert "pass the head with --eagle" in capsys.readouterr().err


def test_bench_compares_a_second_draft_model_in_the_same_run(assembled_pair, llava_json, tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    target, draft = assembled_pair.target_dir, assembled_pair.draft_dir
    noisy = tmp_path / "noisy"  # a second draft: the target with heavy noise, so it is seldom right
    perturbed_copy(LlavaForConditionalGeneration.from_pretrained(target), 2.0, seed=5).save_pretrained(noisy)
    out = tmp_path / "out"
    rc = main(["bench", "--dtype", "float32", "--target", str(target), "--draft", str(draft), "--data", str(llava_json), "--methods",
               "hf,dynamic", "--max-new-tokens", "32", "--threads", "1", "--out", str(out), "--no-progress",
               "--other-draft", str(noisy), "--variant", "noisy=dynamic:draft=other,draft_quant=none",
               # random tiny models are unsure of everything: grow the trees anyway; the draft's own
               # confidences (calibrated, both drafts reach full-depth chains on this repetitive output)
               "--tree-option", "min_path_conf=0", "--tree-option", "min_feed_mass=0",
               "--tree-option", "calibrate=false"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    sec = res["sections"]["set T=0"]
    assert res["models"]["other_draft"] == str(noisy)
    assert sec["exact_match"]["noisy"]["rate"] == 1.0
    # the noisy copy is accepted less often than the pair's draft (built from the target's own layers)
    summary = res["summary"]["set T=0"]
    assert summary["noisy"]["mean_accepted"] < summary["dynamic"]["mean_accepted"]
    capsys.readouterr()
    assert main(["bench", "--dtype", "float32", "--target", str(target), "--draft", str(draft), "--data", str(llava_json), "--methods", "hf",
                 "--variant", "o=dynamic:draft=other", "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "--other-draft DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--variant", "o=dynamic:draft=mine", "--out", str(tmp_path / "o3")])
    assert "draft is eagle" in capsys.readouterr().err
