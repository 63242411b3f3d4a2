"""tools/serve_load.py: its arithmetic (aggregate tokens/s, percentiles, latency against alone) on
made-up runs, and a short sweep against a live server on the tiny pair (not timed: only what it
counts and writes is checked); slow: the same through a `specllava serve` process it starts."""

import json
import sys
from pathlib import Path

import pytest

from serve_helpers import running_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import serve_load  # noqa: E402


def test_percentiles_match_numpys_linear_rule():
    assert serve_load.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert serve_load.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert serve_load.percentile([7.0], 95) == 7.0


def _run(n, latencies, texts, tokens_per_s):
    rows = [{"request": i, "latency_s": lat, "text": t} for i, (lat, t) in enumerate(zip(latencies, texts))]
    return {"concurrency": n, "requests": rows, "tokens_per_s": tokens_per_s,
            "latency_p50_s": serve_load.percentile(latencies, 50), "latency_p95_s": serve_load.percentile(latencies, 95)}


def test_summary_is_the_median_over_repeats_against_alone():
    runs = [_run(1, [1.0, 2.0], ["a", "b"], 10.0), _run(4, [2.0, 8.0], ["a", "B"], 30.0),
            _run(1, [3.0, 2.0], ["a", "b"], 14.0), _run(4, [4.0, 4.0], ["a", "b"], 40.0),
            _run(1, [2.0, 2.0], ["a", "b"], 12.0), _run(4, [3.0, 6.0], ["a", "b"], 50.0)]
    one, four = serve_load.summarize(runs)["levels"]
    assert (one["concurrency"], one["repeats"], one["tokens_per_s"]) == (1, 3, 12.0)
    assert four["tokens_per_s"] == 40.0 and four["tokens_per_s_x_alone"] == pytest.approx(40 / 12)
    # request 0: median 3.0 against 2.0 alone; request 1: median 6.0 against 2.0 alone
    assert four["latency_x_alone_median"] == pytest.approx(2.25) and four["latency_x_alone_max"] == pytest.approx(3.0)
    assert four["answers_differing_from_alone"] == 1 and one["answers_differing_from_alone"] == 0


def test_sweep_against_a_live_server(served_models, tmp_path):
    with running_server(*served_models, max_batch=2) as (url, engine, _):
        report = serve_load.main(["--url", url, "--concurrency", "1", "2", "--requests", "3", "--max-tokens", "6",
                                  "--repeat", "1", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "serve_load.json").read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / "serve_load.png").stat().st_size > 0
    (server,) = report["servers"]
    assert server["health"]["max_batch"] == 2
    assert [lv["concurrency"] for lv in server["levels"]] == [1, 2]
    prompts = serve_load.photo_messages()
    for run in server["runs"]:
        assert [r["prompt"] for r in run["requests"]] == [prompts[i][0] for i in range(3)]
        assert run["completion_tokens"] == sum(r["completion_tokens"] for r in run["requests"]) > 0
        assert all(1 <= r["completion_tokens"] <= 6 for r in run["requests"])
        assert run["tokens_per_s"] == pytest.approx(run["completion_tokens"] / run["wall_s"])
        assert run["server_cpu_s"] > 0 and run["tokens_per_cpu_s"] == pytest.approx(
            run["completion_tokens"] / run["server_cpu_s"])  # this process's CPU: the server runs in it
        assert run["latency_p50_s"] <= run["latency_p95_s"] <= max(r["latency_s"] for r in run["requests"])
    # at temperature 0 (float32) a request answers the same with another in flight
    assert server["levels"][1]["answers_differing_from_alone"] == 0
    again = serve_load.main(["--summarize", str(tmp_path / "serve_load.json")])  # the summary of a saved sweep
    assert again["servers"][0]["levels"] == json.loads(json.dumps(server["levels"]))


@pytest.mark.slow  # a `specllava serve` process importing torch and transformers: 10-20 s here
def test_sweep_on_a_server_it_starts(tiny_paths, tmp_path):
    args = f"--target {tiny_paths.target_dir} --draft {tiny_paths.draft_dir} --dtype float32 --max-batch 2"
    report = serve_load.main(["--server", args, "--concurrency", "2", "--requests", "2", "--max-tokens", "4",
                              "--repeat", "1", "--out", str(tmp_path)])
    (server,) = report["servers"]
    assert server["name"] == f"serve {args}" and server["health"]["max_batch"] == 2
    assert server["levels"][0]["concurrency"] == 2 and server["runs"][0]["completion_tokens"] > 0
    assert "ready at" in (tmp_path / "server0.log").read_text()
