"""`specllava bench --throughput` end to end on the tiny assembled pair: every (method,
concurrency) cell measured, specllava's batched rows equal to hf's alone-decoded rows (float32),
the table and the plot written."""

import json

import pytest

from specllava.bench.throughput import batch_inputs, markdown, summarize
from specllava.cli import main


@pytest.mark.parametrize("load_aware", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["plain", "load-aware"])  # the load-aware run calibrates the cost model first
def test_throughput_mode_end_to_end(assembled_pair, llava_json, tmp_path, capsys, monkeypatch, load_aware):
    import specllava.tuning.budget as budget

    monkeypatch.setattr(budget, "CACHE_DIR", tmp_path / "calibration")
    out = tmp_path / "tp"
    extra = ["--fixed-budgets", "2", "--load-aware", "--calibration-prompts", "1"] if load_aware else []
    code = main(["bench", "--throughput", "--target", str(assembled_pair.target_dir), "--draft",
                 str(assembled_pair.draft_dir), "--dtype", "float32", "--data", str(llava_json), "--concurrency", "1", "2",
                 "--max-new-tokens", "6", "--warmup", "0", "--no-progress", "--out", str(out), *extra])
    assert code == 0
    result = json.loads((out / "throughput.json").read_text())
    summary = result["summary"]
    assert set(summary) == {"hf", "ar", "dynamic"} | ({"dynamic-b2", "dynamic-load"} if load_aware else set())
    if load_aware:
        assert set(result["load_aware"]["batch_budgets"]) == {"1", "2"}
        assert set(result["load_aware"]["rest_ms_by_batch"]) == {"1", "2"}  # each batch size's drafting time
        assert all(ms > 0 for ms in result["load_aware"]["rest_ms_by_batch"].values())
    for method in summary:
        assert set(summary[method]) == {"1", "2"}
        assert summary[method]["1"]["requests"] == 2 and summary[method]["2"]["requests"] == 2
        assert summary[method]["1"]["speedup_vs_c1"] == 1.0
    for method in set(summary) - {"hf"}:  # at c=1 hf decodes each prompt alone: the same tokens
        assert summary[method]["1"]["match_hf"] == "2/2"
    assert (out / "bench_throughput.png").stat().st_size > 0
    assert "| dynamic | 2 |" in (out / "throughput.md").read_text()
    assert "tokens/s" in capsys.readouterr().out


def test_batch_inputs_left_pads_and_stacks_images():
    import torch

    rows = [{"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "pixel_values": torch.zeros(1, 3, 4, 4)},
            {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}]
    batch = batch_inputs(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["pixel_values"].shape[0] == 1


def test_summary_tokens_per_second_and_latency_percentiles():
    runs = [{"method": "ar", "concurrency": 1, "wall_s": 1.0, "latency_s": [1.0], "tokens": [[1] * 10]},
            {"method": "ar", "concurrency": 1, "wall_s": 3.0, "latency_s": [3.0], "tokens": [[1] * 10]},
            {"method": "ar", "concurrency": 2, "wall_s": 2.0, "latency_s": [1.5, 2.0], "tokens": [[1] * 10, [1] * 10]}]
    s = summarize(runs)["ar"]
    assert s[1]["tokens_per_s"] == 5.0 and s[2]["tokens_per_s"] == 10.0
    assert s[2]["speedup_vs_c1"] == 2.0
    assert s[1]["p50_latency_s"] == 2.0 and abs(s[1]["p95_latency_s"] - 2.9) < 1e-9


def test_summary_latency_against_the_same_request_alone():
    runs = [{"method": "ar", "concurrency": 1, "prompts": ["a"], "wall_s": 1.0, "latency_s": [1.0], "tokens": [[1]]},
            {"method": "ar", "concurrency": 1, "prompts": ["b"], "wall_s": 2.0, "latency_s": [2.0], "tokens": [[1]]},
            {"method": "ar", "concurrency": 2, "prompts": ["a", "b"], "wall_s": 3.0, "latency_s": [3.0, 3.0],
             "tokens": [[1], [1]]}]
    s = summarize(runs)["ar"]
    assert s[1]["latency_vs_alone_max"] == 1.0
    assert s[2]["latency_vs_alone_max"] == 3.0 and s[2]["latency_vs_alone_p50"] == 2.25
    assert "| ar | 2 |" in markdown({"ar": s}) and "2.25, 3.00" in markdown({"ar": s})
