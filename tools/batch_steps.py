"""Where a batch's time goes: c requests that arrive together, stepped together
(`SpeculativeDecoder.start` / `step`), step by step for `ar` (plain batched decoding) and the
default `dynamic` tree, interleaved over `--repeats` rounds.

    .venv/bin/python tools/batch_steps.py [--set out-of-domain] [--concurrency 8] \
        [--max-new-tokens 64] [--repeats 3] [--threads 2] [--steps] [--json out.json]

Per method it prints decode time per emitted token (prefills excluded), split by the number of
rows still decoding at each step and by whether the step drafted a tree for some row ("drafted")
or verified every row's root alone ("plain"), with the share of the decode time spent while fewer
than half the rows were left (the tail: rows that accept more finish sooner, so a speculative
batch thins out before a plain one does). `--steps` also prints every step of the last round:
rows, milliseconds (drafting included), tree sizes and tokens emitted per row. Default pair, bf16
where the CPU has it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from specllava import SpeculativeDecoder
from specllava.bench.harness import method_order, prepare_inputs
from specllava.bench.prompts import BUILTIN_SETS, builtin_set
from specllava.core.model_info import input_device
from specllava.models.hf import load_pair

METHODS = ("ar", "dynamic")


def run_group(decoder: SpeculativeDecoder, rows: list[dict], max_new_tokens: int) -> list[dict]:
    """Decode one group together; per step: live rows, seconds, tree sizes, tokens per row."""
    seqs = [decoder.start(**r, max_new_tokens=max_new_tokens) for r in rows]
    steps = []
    while not all(s.finished for s in seqs):
        live = [s for s in seqs if not s.finished]
        d0 = live[0].stats.t_draft  # every row of a batched step is charged the step's drafting time
        t0 = time.perf_counter()
        results = decoder.step(live)
        steps.append({"rows": len(live), "seconds": time.perf_counter() - t0,
                      "draft_seconds": live[0].stats.t_draft - d0,
                      "sizes": [len(r.tree) for r in results], "tokens": [len(r.tokens) for r in results]})
    return steps


def summarize(steps: list[dict], n_rows: int) -> dict:
    """ms per token overall, by live rows, drafted against plain, and the tail's share of the time."""
    def cell(sel):
        t = sum(s["seconds"] for s in sel)
        n = sum(sum(s["tokens"]) for s in sel)
        return {"steps": len(sel), "seconds": t, "tokens": n, "ms_per_token": 1e3 * t / n if n else None,
                "ms_per_step": 1e3 * t / len(sel) if sel else None,
                "draft_ms_per_step": 1e3 * sum(s["draft_seconds"] for s in sel) / len(sel) if sel else None}

    by_rows = defaultdict(list)
    for s in steps:
        by_rows[s["rows"]].append(s)
    total = cell(steps)
    tail = cell([s for s in steps if 2 * s["rows"] < n_rows])
    return {**total,
            "drafted": cell([s for s in steps if max(s["sizes"]) > 1]),
            "plain": cell([s for s in steps if max(s["sizes"]) == 1]),
            "by_rows": {b: cell(sel) for b, sel in sorted(by_rows.items(), reverse=True)},
            "tail_share_of_time": tail["seconds"] / total["seconds"] if total["seconds"] else 0.0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="out-of-domain", choices=list(BUILTIN_SETS))
    ap.add_argument("--concurrency", type=int, default=8, help="requests per group (the first c prompts)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="auto: bf16 where the CPU has it")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", action="store_true", help="print every step of the last round")
    ap.add_argument("--json", default=None, help="also write every step and the summary here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    target, draft, processor, _ = load_pair(None, None, args.dtype, True)
    prompts = builtin_set(args.set)[: args.concurrency]
    if len(prompts) < args.concurrency:
        raise SystemExit(f"--concurrency {args.concurrency}: the {args.set} set has {len(prompts)} prompts")
    rows = [prepare_inputs(processor, p, target.dtype, input_device(target)) for p in prompts]
    decoders = {m: SpeculativeDecoder(target, None if m == "ar" else draft, method=m) for m in METHODS}
    for m in METHODS:  # warm-up, untimed
        run_group(decoders[m], rows, 8)
    steps = {m: [] for m in METHODS}
    last = {}
    for turn in range(args.repeats):
        for m in method_order(METHODS, turn):
            last[m] = run_group(decoders[m], rows, args.max_new_tokens)
            steps[m] += last[m]
    summary = {m: summarize(steps[m], args.concurrency) for m in METHODS}
    print(f"{args.concurrency} requests together, {args.set}, {args.max_new_tokens} new tokens, "
          f"{args.repeats} rounds, {args.threads} threads, {str(target.dtype).removeprefix('torch.')}")
    for m in METHODS:
        s = summary[m]
        print(f"\n{m}: {s['ms_per_token']:.2f} ms per token over {s['steps']} steps; "
              f"{100 * s['tail_share_of_time']:.0f}% of the decode time with fewer than half the rows left")
        for kind in ("drafted", "plain"):
            k = s[kind]
            if k["steps"]:
                print(f"  {kind:7s} steps: {k['steps']:4d}, {k['tokens']:5d} tokens, {k['ms_per_token']:.2f} ms per token, "
                      f"{k['ms_per_step']:.1f} ms per step of which {k['draft_ms_per_step']:.1f} drafting")
        print("  rows  steps  tokens  ms/token")
        for b, k in s["by_rows"].items():
            print(f"  {b:4d}  {k['steps']:5d}  {k['tokens']:6d}  {k['ms_per_token']:8.2f}")
    if args.steps:
        for m in METHODS:
            print(f"\n{m}, last round:")
            for s in last[m]:
                print(f"  rows {s['rows']}: {1e3 * s['seconds']:6.1f} ms ({1e3 * s['draft_seconds']:.1f} drafting), tree sizes {s['sizes']}, tokens {s['tokens']}")
    ratio = summary["ar"]["ms_per_token"] / summary["dynamic"]["ms_per_token"]
    print(f"\ndynamic's speed over ar's (decode time per token): {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "steps": steps}, f, indent=1)


if __name__ == "__main__":
    main()
