"""Turning benchmark records into numbers, a markdown table, PNG plots and a JSON file.

Definitions (all per prompt first, then the median over prompts; repeats of one prompt are
combined by their median first):
  decode time per token  decode_s / decode tokens, where decode tokens are those emitted after
                         the first streamer put (the prefill's output)
  speedup                hf's decode time per token / the method's, on the same prompt. At T=0
                         every exact-matching method emits hf's tokens, so this is the ratio of
                         decode times; at T>0 the samples (and their lengths) differ, and the
                         per-token rate is the fair comparison.
  speedup (e2e)          the same ratio for end-to-end time per emitted token
  speedup (decode CPU)   the decode ratio in process CPU time instead of wall time (robust to
                         other jobs on a shared machine; with several threads it also counts
                         their spin-waiting)
  tokens/s               decode tokens / decode_s
  mean accepted length   tokens emitted per target forward, prefill included (hf: 1)
  acceptance by depth    share of verification steps whose accepted path reached depth d
  95% interval           percentile bootstrap of the median over prompts (prompts resampled
                         with replacement, 2000 times, fixed seed): how far the median could
                         move with another draw of prompts like these; it does not cover the
                         machine's drift between runs. Not given for fewer than 3 prompts
                         ("n too small"): resampling 1 or 2 values says nothing
  head to head           `dynamic` (the default method) against each other method, prompt by
                         prompt: the median of the other method's decode time per token over
                         dynamic's, its 95% interval, and on how many prompts dynamic was faster
"""

from __future__ import annotations

import json
import random
import statistics
from collections import defaultdict
from pathlib import Path

from .methods import HF_METHODS


def _decode_tokens(rec: dict) -> int:
    # for ours and hf the prefill emits one token; HF's assisted generation verifies candidates
    # inside its prefill forward and may emit several there
    return max(rec["decode_tokens"], 1)


def _median(xs):
    return statistics.median(xs) if xs else None


def median_interval(xs: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of `xs` (resampled with replacement)."""
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (None, None)
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    lo = meds[int((1 - level) / 2 * resamples)]
    hi = meds[min(int((1 + level) / 2 * resamples), resamples - 1)]
    return lo, hi


HEAD_TO_HEAD_SUBJECT = "dynamic"
MIN_INTERVAL_PROMPTS = 3  # fewer prompts: no 95% interval in tables and plots ("n too small")


def _interval(xs: list[float]) -> tuple[float | None, float | None]:
    return median_interval(xs) if len(xs) >= MIN_INTERVAL_PROMPTS else (None, None)


def head_to_head(dec: dict[str, dict], subject: str = HEAD_TO_HEAD_SUBJECT) -> dict:
    """{other method: ratio stats} for `subject` against every other method, prompt by prompt.

    dec: method -> prompt -> decode seconds per token. ratio = other's time / subject's on the
    same prompt, so > 1 means the subject was faster there."""
    out = {}
    for other, times in dec.items():
        if other == subject:
            continue
        ratios = [times[p] / dec[subject][p] for p in dec[subject] if p in times and dec[subject][p] > 0]
        if not ratios:
            continue
        lo, hi = _interval(ratios)
        out[other] = {"ratio": statistics.median(ratios), "ratio_lo": lo, "ratio_hi": hi,
                      "faster_on": sum(r > 1 for r in ratios), "prompts": len(ratios)}
    return out


def summarize(result: dict, subjects: tuple[str, ...] = (HEAD_TO_HEAD_SUBJECT,)) -> dict:
    """{method: metrics} for one (set, temperature) result of `run_benchmark`; each method in
    `subjects` also gets its head-to-head against every other method."""
    recs = result["records"]
    methods = result["settings"]["methods"]
    per = defaultdict(lambda: defaultdict(list))  # method -> prompt -> [records]
    for r in recs:
        per[r["method"]][r["prompt_id"]].append(r)

    def per_prompt(method, fn):
        return {pid: _median([fn(r) for r in rs]) for pid, rs in per[method].items()}

    dec = {m: per_prompt(m, lambda r: r["decode_s"] / _decode_tokens(r)) for m in methods}
    e2e = {m: per_prompt(m, lambda r: r["e2e_s"] / max(r["new_tokens"], 1)) for m in methods}
    cpu = {m: per_prompt(m, lambda r: r["decode_cpu_s"] / _decode_tokens(r)) for m in methods}
    out = {}
    for m in methods:
        rs = [r for r in recs if r["method"] == m]
        row = {
            "runs": len(rs),
            "new_tokens_median": _median([r["new_tokens"] for r in rs]),
            "decode_s_median": _median(list(per_prompt(m, lambda r: r["decode_s"]).values())),
            "prefill_s_median": _median(list(per_prompt(m, lambda r: r["prefill_s"]).values())),
            "e2e_s_median": _median(list(per_prompt(m, lambda r: r["e2e_s"]).values())),
            "tokens_per_s": _median([1 / v for v in dec[m].values()]),
            "mean_accepted": _median(list(per_prompt(m, lambda r: r["mean_accepted"]).values())),
            "peak_rss_mb": _median([r["peak_rss_mb"] for r in rs]),
        }
        if "hf" in methods:
            sp = [dec["hf"][p] / dec[m][p] for p in dec[m] if p in dec["hf"]]
            sp_e2e = [e2e["hf"][p] / e2e[m][p] for p in e2e[m] if p in e2e["hf"]]
            sp_cpu = [cpu["hf"][p] / max(cpu[m][p], 1e-12) for p in cpu[m] if p in cpu["hf"]]
            lo, hi = _interval(sp)
            row.update(speedup=_median(sp), speedup_min=min(sp), speedup_max=max(sp), speedup_lo=lo, speedup_hi=hi,
                       speedup_e2e=_median(sp_e2e), speedup_cpu=_median(sp_cpu),
                       speedup_per_prompt=dict(zip(dec[m], sp)))
        if m not in HF_METHODS:
            row.update(_our_metrics(rs))
        if "exact_match" in result:
            row["exact_match"] = result["exact_match"][m]["rate"]
        if m in subjects and len(methods) > 1:
            row["head_to_head"] = head_to_head(dec, m)
        out[m] = row
    return out


def _our_metrics(rs: list[dict]) -> dict:
    """Acceptance by depth, tree size and the time split, from specllava's own stats."""
    steps = sum(r["stats"]["steps"] for r in rs)
    depth = max((len(r["stats"]["accept_by_depth"]) for r in rs), default=0)
    by_depth = [sum(r["stats"]["accept_by_depth"][d] for r in rs if d < len(r["stats"]["accept_by_depth"])) / max(steps, 1)
                for d in range(depth)]
    draft = sum(r["stats"]["time_draft_s"] for r in rs)
    verify = sum(r["stats"]["time_verify_s"] for r in rs)
    decode = sum(r["stats"]["time_decode_s"] for r in rs)
    return {
        "accept_by_depth": by_depth,
        "tree_nodes_mean": sum(r["stats"]["tree_nodes_mean"] * r["stats"]["steps"] for r in rs) / max(steps, 1),
        "draft_share": draft / max(decode, 1e-12),
        "verify_share": verify / max(decode, 1e-12),
        "draft_ms_per_step": 1e3 * draft / max(steps, 1),
        # draft forwards per step, the draft's prefill excluded
        "draft_forwards_per_step": sum(max(r["stats"]["draft_forwards"] - 1, 0) for r in rs) / max(steps, 1),
        "verify_ms_per_step": 1e3 * verify / max(steps, 1),
        "other_ms_per_step": 1e3 * (decode - draft - verify) / max(steps, 1),
    }


# ---------------------------------------------------------------------------------------------
# markdown


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


def markdown_table(summary: dict) -> str:
    head = ("| method | exact match | speedup (decode), 95% interval, range | speedup (e2e) | speedup (decode CPU) | decode tok/s | mean accepted length "
            "| tree nodes | draft forwards per step | draft / verify / other ms per step | prefill s | peak RSS MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m, row in summary.items():
        split = "–"
        if "draft_ms_per_step" in row:
            split = f"{row['draft_ms_per_step']:.1f} / {row['verify_ms_per_step']:.1f} / {row['other_ms_per_step']:.1f}"
        speed = _f(row.get("speedup"), "{:.2f}x")
        if row.get("speedup") is not None:
            if row.get("speedup_lo") is not None:
                speed += f" [{row['speedup_lo']:.2f}-{row['speedup_hi']:.2f}]"
            else:
                speed += " [n too small]"
            speed += f" ({row['speedup_min']:.2f}-{row['speedup_max']:.2f})"
        lines.append(
            f"| {m} | {_f(row.get('exact_match'), '{:.0%}')} | {speed} | {_f(row.get('speedup_e2e'), '{:.2f}x')} "
            f"| {_f(row.get('speedup_cpu'), '{:.2f}x')} "
            f"| {_f(row['tokens_per_s'], '{:.1f}')} | {_f(row['mean_accepted'])} | {_f(row.get('tree_nodes_mean'), '{:.1f}')} "
            f"| {_f(row.get('draft_forwards_per_step'), '{:.1f}')} "
            f"| {split} | {_f(row['prefill_s_median'], '{:.3f}')} | {_f(row['peak_rss_mb'], '{:.0f}')} |"
        )
    return "\n".join(lines) + "\n"


def head_to_head_table(summary: dict, subject: str = HEAD_TO_HEAD_SUBJECT) -> str:
    """`subject` against each other method, prompt by prompt ("" when the section has no such rows)."""
    rows = (summary.get(subject) or {}).get("head_to_head")
    if not rows:
        return ""
    lines = [f"| {subject} against | other's time / {subject}'s, median [95% interval] | {subject} faster on |",
             "|---|---|---|"]
    for other, r in rows.items():
        interval = "n too small" if r["ratio_lo"] is None else f"{r['ratio_lo']:.2f}-{r['ratio_hi']:.2f}"
        lines.append(f"| {other} | {r['ratio']:.2f} [{interval}] | {r['faster_on']} of {r['prompts']} prompts |")
    return "\n".join(lines) + "\n"


def divergence_table(divergences: list[dict]) -> str:
    if not divergences:
        return "No divergences from `hf`.\n"
    lines = ["| method | prompt | repeat | position | hf token | method token | target top-2 margin (logits) |",
             "|---|---|---|---|---|---|---|"]
    for d in divergences:
        lines.append(f"| {d['method']} | {d['prompt_id']} | {d['repeat']} | {d['position']} | {d['hf_token']} "
                     f"| {d['method_token']} | {d['margin']:.4g} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# plots


def plot_all(summaries: dict[str, dict], out_dir: Path, prefix: str = "bench_") -> list[Path]:
    """Three PNGs over every (set, temperature) section: speedup, acceptance by depth, time split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    sections = list(summaries)

    fig, axes = _figure(plt, len(sections), 3.6)
    for ax, sec in zip(axes[0], sections):
        s = summaries[sec]
        ms = [m for m in s if s[m].get("speedup") is not None]
        ax.bar(ms, [s[m]["speedup"] for m in ms], color="tab:blue", alpha=0.8)
        if ms and all(s[m].get("speedup_lo") is not None for m in ms):  # 95% bootstrap interval of the median
            err = [[s[m]["speedup"] - s[m]["speedup_lo"] for m in ms], [s[m]["speedup_hi"] - s[m]["speedup"] for m in ms]]
            ax.errorbar(range(len(ms)), [s[m]["speedup"] for m in ms], yerr=err, fmt="none", ecolor="tab:red", capsize=3, zorder=4)
        elif ms:
            ax.set_xlabel(f"95% interval: n too small (< {MIN_INTERVAL_PROMPTS} prompts)", fontsize=7, color="tab:red")
        for x, m in enumerate(ms):
            pts = list(s[m]["speedup_per_prompt"].values())
            ax.scatter([x] * len(pts), pts, s=8, color="black", zorder=3)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(sec, fontsize=9)
        ax.set_ylabel("decode speedup vs hf", fontsize=8)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    _suptitle(fig, "bars: median over prompts; red: its 95% interval; dots: single prompts")
    paths.append(_save(fig, out_dir / f"{prefix}speedup.png"))

    fig, axes = _figure(plt, len(sections), 3.4)
    for ax, sec in zip(axes[0], sections):
        for m, row in summaries[sec].items():
            acc = row.get("accept_by_depth")
            if acc:
                ax.plot(range(1, len(acc) + 1), acc, marker="o", ms=3, label=m)
        depth = max((len(r.get("accept_by_depth") or []) for r in summaries[sec].values()), default=0)
        ax.set_xlim(0.5, max(depth, 1) + 0.5)
        ax.set_xticks(range(1, max(depth, 1) + 1))
        ax.set_title(sec, fontsize=9)
        ax.set_xlabel("tree depth d")
        ax.set_ylabel("share of steps accepting >= d draft tokens", fontsize=8)
        ax.set_ylim(0, 1)
        if ax.get_lines():
            ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / f"{prefix}acceptance.png"))

    fig, axes = _figure(plt, len(sections), 3.6)
    for ax, sec in zip(axes[0], sections):
        s = summaries[sec]
        ms = list(s)
        dec = [s[m]["decode_s_median"] for m in ms]
        prefill = [s[m]["prefill_s_median"] for m in ms]
        draft = [s[m].get("draft_share", 0) * d for m, d in zip(ms, dec)]
        verify = [s[m].get("verify_share", 0) * d for m, d in zip(ms, dec)]
        unsplit = [d if m in HF_METHODS else 0.0 for m, d in zip(ms, dec)]
        other = [d - a - b - c for d, a, b, c in zip(dec, draft, verify, unsplit)]
        bottom = [0.0] * len(ms)
        parts = ((prefill, "prefill"), (unsplit, "decode (transformers, not split)"), (draft, "draft"),
                 (verify, "verify + accept + compact"), (other, "loop overhead"))
        for vals, name in parts:
            ax.bar(ms, vals, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(sec, fontsize=9)
        ax.set_ylabel("seconds per generation (median)", fontsize=8)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    _top_legend(fig, handles, labels)
    paths.append(_save(fig, out_dir / f"{prefix}time.png"))

    versus = {sec: summaries[sec].get(HEAD_TO_HEAD_SUBJECT, {}).get("head_to_head") for sec in sections}
    versus = {sec: rows for sec, rows in versus.items() if rows}
    if versus:
        fig, axes = _figure(plt, len(versus), 3.2)
        for ax, (sec, rows) in zip(axes[0], versus.items()):
            names = list(rows)
            y = range(len(names))
            ratio = [rows[m]["ratio"] for m in names]
            lo = [rows[m]["ratio_lo"] if rows[m]["ratio_lo"] is not None else r for m, r in zip(names, ratio)]
            hi = [rows[m]["ratio_hi"] if rows[m]["ratio_hi"] is not None else r for m, r in zip(names, ratio)]
            ax.errorbar(ratio, y, xerr=[[r - a for r, a in zip(ratio, lo)], [b - r for r, b in zip(ratio, hi)]],
                        fmt="o", color="tab:blue", ecolor="tab:red", capsize=3)
            for yi, m, b in zip(y, names, hi):
                ax.annotate(f"{rows[m]['faster_on']}/{rows[m]['prompts']}", (b, yi),
                            xytext=(4, -3), textcoords="offset points", fontsize=7)
            if any(rows[m]["ratio_lo"] is None for m in names):
                ax.text(0.02, 0.5, f"95% interval: n too small\n(< {MIN_INTERVAL_PROMPTS} prompts)", transform=ax.transAxes,
                        fontsize=7, va="center", color="tab:red")
            ax.axvline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_yticks(list(y), names, fontsize=8)
            ax.set_xlim(min(1.0, *lo) * 0.95, max(1.0, *hi) * 1.15)
            ax.set_title(sec, fontsize=9)
            ax.set_xlabel(f"other's time / {HEAD_TO_HEAD_SUBJECT}'s (> 1: {HEAD_TO_HEAD_SUBJECT} faster)", fontsize=8)
        _suptitle(fig, f"{HEAD_TO_HEAD_SUBJECT} against each method, prompt by prompt: median, 95% interval, "
                       f"prompts where {HEAD_TO_HEAD_SUBJECT} was faster")
        paths.append(_save(fig, out_dir / f"{prefix}head_to_head.png"))
    return paths


def _figure(plt, panels: int, height: float):
    """One row of `panels` plots, laid out by matplotlib's constrained layout, which makes room for
    the titles, a figure legend placed "outside" and the suptitle whatever the number of panels."""
    return plt.subplots(1, panels, figsize=(4.2 * panels, height), squeeze=False, layout="constrained")


def _top_legend(fig, handles, labels) -> None:
    """A legend above the plots in as many columns as the figure's width holds."""
    renderer = fig.canvas.get_renderer()
    for ncol in range(len(labels), 0, -1):
        legend = fig.legend(handles, labels, loc="outside upper center", ncol=ncol, fontsize=8, frameon=False)
        if ncol == 1 or legend.get_window_extent(renderer).width <= 0.98 * fig.bbox.width:
            return
        legend.remove()


def _suptitle(fig, text: str) -> None:
    """A figure title wrapped to the figure's width (a one-panel figure is narrow)."""
    import textwrap

    fig.suptitle(textwrap.fill(text, width=int(fig.get_figwidth() * 15)), fontsize=8)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_json(obj: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    return path


def render(result: dict, out_dir: Path, prefix: str = "bench_", subjects: tuple[str, ...] = (HEAD_TO_HEAD_SUBJECT,)) -> str:
    """table.md text and the PNGs for a results.json (as `specllava bench` writes them); a
    head-to-head table for each method in `subjects` that has one."""
    md = []
    for name, summary in result["summary"].items():
        md += [f"## {name}\n", markdown_table(summary)]
        for subject in subjects:
            versus = head_to_head_table(summary, subject)
            if versus:
                md.append(versus)
        if "divergences" in result["sections"][name]:
            md.append(divergence_table(result["sections"][name]["divergences"]))
    plot_all(result["summary"], Path(out_dir), prefix)
    return "\n".join(md)


def main(argv: list[str] | None = None) -> None:
    """Re-render the table and plots of a finished run: python -m specllava.bench.report RESULTS.json"""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: beside RESULTS.json)")
    parser.add_argument("--prefix", default="bench_", help="PNG file name prefix (default: bench_)")
    parser.add_argument("--versus", action="append", default=[], metavar="METHOD",
                        help=f"also compare this method (a variant's name, say) with every other one, prompt by "
                        f"prompt, as {HEAD_TO_HEAD_SUBJECT} is; repeatable")
    args = parser.parse_args(argv)
    result = json.loads(args.results.read_text())
    # summaries from the records, so that a run made before a metric existed gets it too
    subjects = (HEAD_TO_HEAD_SUBJECT, *args.versus)
    result["summary"] = {name: summarize(section, subjects) for name, section in result["sections"].items()}
    print(render(result, args.out or args.results.parent, args.prefix, subjects))


if __name__ == "__main__":
    main()
