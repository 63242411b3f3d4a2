"""Report statistics on hand-made records: the bootstrap interval and the head-to-head table."""

import json

import pytest

from specllava.bench.report import head_to_head_table, main, markdown_table, median_interval, summarize


def _record(method: str, prompt: str, decode_s: float) -> dict:
    rec = {"method": method, "prompt_id": prompt, "decode_s": decode_s, "decode_tokens": 10, "e2e_s": decode_s + 0.1,
           "new_tokens": 11, "decode_cpu_s": decode_s, "prefill_s": 0.1, "mean_accepted": 1.0, "peak_rss_mb": 100.0}
    if method != "hf":
        rec["stats"] = {"steps": 4, "accept_by_depth": [2, 1], "time_draft_s": 0.1 * decode_s,
                        "time_verify_s": 0.8 * decode_s, "time_decode_s": decode_s, "tree_nodes_mean": 3.0,
                        "draft_forwards": 9}
    return rec


def _result(chain_over_dynamic: list[float]) -> dict:
    """hf takes 1 s a prompt, dynamic 0.4 s; chain takes dynamic's time times the given ratio."""
    recs = []
    for i, ratio in enumerate(chain_over_dynamic):
        recs += [_record("hf", f"p{i}", 1.0), _record("chain", f"p{i}", 0.4 * ratio), _record("dynamic", f"p{i}", 0.4)]
    return {"settings": {"methods": ["hf", "chain", "dynamic"]}, "records": recs}


def test_median_interval_brackets_the_median_and_narrows_with_more_prompts():
    xs = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    lo, hi = median_interval(xs)
    assert lo <= 2.5 <= hi and lo >= 1.0 and hi <= 4.0 and hi > lo
    lo4, hi4 = median_interval(xs * 4)  # the same spread over four times the prompts
    assert hi4 - lo4 < hi - lo
    assert median_interval([2.0] * 5) == (2.0, 2.0)
    assert median_interval([3.0]) == (3.0, 3.0) and median_interval([]) == (None, None)
    assert median_interval(xs) == median_interval(xs)  # seeded: the same report for the same records


def test_head_to_head_compares_dynamic_with_each_method_prompt_by_prompt():
    summary = summarize(_result([1.2, 1.2, 1.2, 0.9, 1.3]))
    versus = summary["dynamic"]["head_to_head"]
    assert set(versus) == {"hf", "chain"}
    chain = versus["chain"]
    assert chain["ratio"] == pytest.approx(1.2) and chain["faster_on"] == 4 and chain["prompts"] == 5
    assert chain["ratio_lo"] <= 1.2 <= chain["ratio_hi"]
    assert versus["hf"]["ratio"] == pytest.approx(2.5) and versus["hf"]["faster_on"] == 5
    assert summary["dynamic"]["speedup"] == pytest.approx(2.5)
    assert summary["chain"]["speedup_lo"] <= summary["chain"]["speedup"] <= summary["chain"]["speedup_hi"]
    table = head_to_head_table(summary)
    assert "| chain | 1.20 [" in table and "| 4 of 5 prompts |" in table
    # a chain that is faster on every prompt shows as a ratio below 1, dynamic faster on none
    slow = summarize(_result([0.8, 0.9, 0.7]))["dynamic"]["head_to_head"]["chain"]
    assert slow["ratio"] == pytest.approx(0.8) and slow["faster_on"] == 0 and slow["ratio_hi"] < 1


def test_no_head_to_head_without_dynamic():
    res = _result([1.0, 1.0])
    res["records"] = [r for r in res["records"] if r["method"] != "dynamic"]
    res["settings"]["methods"] = ["hf", "chain"]
    assert head_to_head_table(summarize(res)) == ""


def test_rerendering_an_older_results_file_recomputes_the_summary(tmp_path, capsys):
    section = _result([1.1, 1.3, 1.2])
    stale = {name: {k: v for k, v in row.items() if k != "head_to_head"} for name, row in summarize(section).items()}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"sections": {"set T=0": section}, "summary": {"set T=0": stale}}))
    main([str(path)])
    out = capsys.readouterr().out
    assert "| dynamic against |" in out and "| chain | 1.20 [" in out
    for png in ("bench_speedup.png", "bench_head_to_head.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_versus_adds_a_head_to_head_for_another_method(tmp_path, capsys):
    section = _result([1.1, 1.3, 1.2])  # chain takes 1.1-1.3 times dynamic's time
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"sections": {"set T=0": section}, "summary": {}}))
    main([str(path), "--versus", "chain"])
    out = capsys.readouterr().out
    assert "| chain against |" in out and "| dynamic | 0.83 [" in out  # dynamic's time / chain's = 1 / 1.2


def _inside(fig) -> list[str]:
    """The figure-level texts and legends (and axes titles) that stick out of the saved figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    artists = [*fig.legends, *fig.texts, *(a for ax in fig.axes for a in (ax.title, ax.get_legend()) if a is not None)]
    out = []
    for a in artists:
        if not a.get_visible() or (hasattr(a, "get_text") and not a.get_text()):
            continue
        e = a.get_window_extent(renderer)
        if e.x0 < box.x0 - 1 or e.x1 > box.x1 + 1 or e.y0 < box.y0 - 1 or e.y1 > box.y1 + 1:
            out.append(str(a))
    return out


@pytest.mark.parametrize("prompts", [2, 5])
def test_one_section_plots_fit_and_say_when_n_is_too_small(tmp_path, monkeypatch, prompts):
    """A one-section run (the narrowest figures): nothing cut off; with 2 prompts no 95% interval is drawn."""
    from specllava.bench import report

    kept = []
    monkeypatch.setattr(report, "_save", lambda fig, path: kept.append((path.name, fig)) or path)
    summary = summarize(_result([1.2, 1.1, 1.3, 0.9, 1.2][:prompts]))
    report.plot_all({"in-domain T=0": summary}, tmp_path)
    figs = dict(kept)
    assert set(figs) == {"bench_speedup.png", "bench_acceptance.png", "bench_time.png", "bench_head_to_head.png"}
    for name, fig in figs.items():
        assert _inside(fig) == [], name
    texts = [ax.get_xlabel() for ax in figs["bench_speedup.png"].axes]
    h2h = [t.get_text() for ax in figs["bench_head_to_head.png"].axes for t in ax.texts]
    table = markdown_table(summary) + head_to_head_table(summary)
    if prompts < 3:
        assert summary["chain"]["speedup_lo"] is None and summary["dynamic"]["head_to_head"]["chain"]["ratio_lo"] is None
        assert any("n too small" in t for t in texts) and any("n too small" in t for t in h2h)
        assert "[n too small]" in table
    else:
        assert not any("n too small" in t for t in texts + h2h) and "n too small" not in table
