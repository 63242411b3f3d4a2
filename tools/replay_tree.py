"""Which dynamic-tree nodes pay for their verification? Replay recorded greedy steps under
stricter path-confidence floors, on the very same text (no bf16 divergence noise between settings).

    .venv/bin/python tools/replay_tree.py [--in-domain 12] [--photos 8] [--max-new-tokens 64] \
        [--floors 0.02 0.03 0.05 0.07 0.1 0.15] [--dtype bfloat16] [--threads 2]

Default pair, CLI defaults (dynamic tree, budget 32, ranked 2048-token draft vocabulary). Every
greedy step's tree (node path confidences) and accepted path are recorded through
`generate(on_step=...)`. Raising the floor `min_path_conf` to f keeps exactly the nodes of
confidence >= f (an ancestor-closed set: confidence only falls along a path), so a step would have
accepted the leading part of its recorded path that stays above f. Per floor it prints the replayed
mean accepted length (tau), the mean number of verified nodes, and the expected tokens/s: tau over
(t_verify(nodes + 1) + the step's other time), t_verify from this machine's verification cost
curve (`specllava.tuning.budget.verify_cost_curve`, cached) and the other time (drafting, loop)
as measured per step. Drafting is taken as unchanged (the floor prunes leaves mostly; it can also
stop a deeper expansion, which would only save drafting time).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from specllava import SpeculativeDecoder
from specllava.bench.harness import prepare_inputs
from specllava.bench.prompts import builtin_set
from specllava.core.vocab import default_draft_vocab
from specllava.models.hf import load_pair, parse_dtype
from specllava.tuning.budget import verify_cost_curve


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--in-domain", type=int, default=12)
    ap.add_argument("--photos", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--floors", type=float, nargs="+", default=[0.02, 0.03, 0.05, 0.07, 0.1, 0.15])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    target, draft, processor, _ = load_pair(None, None, parse_dtype(args.dtype), True)
    cost = verify_cost_curve(target)
    dec = SpeculativeDecoder(target, draft, method="dynamic", draft_vocab=default_draft_vocab(draft, 0.0))
    sets = {"in-domain": builtin_set("in-domain")[: args.in_domain],
            "out-of-domain": builtin_set("out-of-domain")[: args.photos]}
    for name, prompts in sets.items():
        steps, rest = [], []

        def record(tree, verdict):
            steps.append((tree.score[1:].tolist(), tree.score[torch.as_tensor(verdict.path[1:], dtype=torch.long)].tolist()))

        for prompt in prompts:
            inp = prepare_inputs(processor, prompt, target.dtype)
            out = dec.generate(input_ids=inp["input_ids"], pixel_values=inp["pixel_values"],
                               max_new_tokens=args.max_new_tokens, on_step=record)
            st = out.stats
            rest += [(st["time_decode_s"] - st["time_verify_s"]) / st["steps"]] * st["steps"]
        other = statistics.fmean(rest)
        print(f"{name}: {len(steps)} steps, other time {1e3 * other:.1f} ms a step")
        for floor in args.floors:
            taus, sizes = [], []
            for scores, path in steps:
                kept = 0
                for conf in path:  # accepted nodes, root to leaf: confidence only falls
                    if conf < floor:
                        break
                    kept += 1
                taus.append(kept + 1)
                sizes.append(sum(conf >= floor for conf in scores))
            step_s = statistics.fmean(cost.at(n + 1) for n in sizes) + other
            tau = statistics.fmean(taus)
            print(f"  min_path_conf {floor:<5g} tau {tau:.2f}  nodes {statistics.fmean(sizes):5.1f}  "
                  f"expected {tau / step_s:.1f} tok/s")


if __name__ == "__main__":
    main()
