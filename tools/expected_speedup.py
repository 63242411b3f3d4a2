"""Expected speedup from a bench run's measured acceptance and costs, beside the measured one.

    .venv/bin/python tools/expected_speedup.py runs/bench/NAME/results.json [--methods dynamic,raw]

Per (set, temperature) section and method, against `hf` (decode time per token, median over
prompts, as `specllava bench` reports it):

  measured   the bench's speedup [95 % interval]
  tau        mean accepted length (tokens per target forward), median over prompts
  nodes, F   verified draft nodes and draft forwards per step (the draft's prefill excluded)
  path       the exact path's own gain, `ar` against `hf` (plain decoding through specllava's loop)
  free       tau x path: the speedup if drafting and verifying the tree's nodes cost nothing
  model      free / (1 + 0.03 nodes + 0.05 F): the calibrator's cost model (`core.calibration`,
             the default pair's relative costs on the 2-core CPU) applied to the measured tau
  step ms    draft + verify + loop time per step, measured, and what the model predicts for it
             from `ar`'s time per token

`measured` below `model` is overhead the model does not count (a loaded machine, Python work per
step); `model` below `free` is what the tree's nodes and draft forwards cost; `free` is bounded by
the acceptance the draft reaches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from specllava.bench.report import summarize  # noqa: E402
from specllava.core.calibration import CostModel  # noqa: E402


def rows(results: dict, methods: list[str] | None = None) -> list[dict]:
    cost = CostModel()
    out = []
    for name, section in results["sections"].items():
        summary = summarize(section)
        if "hf" not in summary or "ar" not in summary:
            raise SystemExit(f"{name}: the run needs the methods hf and ar")
        path = summary["ar"]["speedup"]
        ar_ms = 1e3 / summary["ar"]["tokens_per_s"]
        for m, s in summary.items():
            if m in ("hf", "hf-assisted", "ar") or (methods and m not in methods) or "tree_nodes_mean" not in s:
                continue
            nodes, forwards = s["tree_nodes_mean"], s["draft_forwards_per_step"]
            free = s["mean_accepted"] * path
            step_cost = cost.step(nodes, forwards)
            out.append({
                "section": name, "method": m, "measured": s["speedup"], "lo": s["speedup_lo"], "hi": s["speedup_hi"],
                "tau": s["mean_accepted"], "nodes": nodes, "forwards": forwards, "path": path, "free": free,
                "model": free / step_cost,
                "step_ms": s["draft_ms_per_step"] + s["verify_ms_per_step"] + s["other_ms_per_step"],
                "model_step_ms": ar_ms * step_cost,
            })
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a `specllava bench` results.json")
    ap.add_argument("--methods", default=None, help="comma list (default: every tree method and variant)")
    args = ap.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    table = rows(results, args.methods.split(",") if args.methods else None)
    print("| section | method | measured | tau | nodes | F | path (ar) | free | model | step ms (model) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['section']} | {r['method']} | {r['measured']:.2f}x [{r['lo']:.2f}-{r['hi']:.2f}] | {r['tau']:.2f} "
              f"| {r['nodes']:.1f} | {r['forwards']:.1f} | {r['path']:.2f}x | {r['free']:.2f}x | {r['model']:.2f}x "
              f"| {r['step_ms']:.1f} ({r['model_step_ms']:.1f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
