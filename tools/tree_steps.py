"""Step by step, chain against the dynamic tree on one benchmark prompt (T=0): per verification
step the tree's size and depth, the accepted length and the path confidence of the deepest accepted
node (the product of the draft's probabilities along its path; 1.0 when nothing was accepted).

    .venv/bin/python tools/tree_steps.py "openclipart/food/beverages/coffee_ganson#describe" \
        [--set in-domain] [--dtype bfloat16] [--threads 2] [--max-new-tokens 64] \
        [--tree-option score_temperature=0.5] [--draft runs/draft4/draft]

Default pair (or the default target with `--draft DIR`), draft vocabulary 2048 (the T=0 default). Tree options apply to the dynamic tree
only. Uses the decoder's public `generate(on_step=...)` hook.
"""

from __future__ import annotations

import argparse

import torch

from specllava import SpeculativeDecoder
from specllava.bench.harness import prepare_inputs
from specllava.bench.prompts import BUILTIN_SETS, builtin_set
from specllava.cli import raw_tree_option
from specllava.models.hf import load_model, load_pair, parse_dtype


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prompt_id", help="a prompt id of the set, e.g. openclipart/food/beverages/coffee_ganson#describe")
    ap.add_argument("--set", default="in-domain", choices=list(BUILTIN_SETS))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--draft", default=None, help="a draft model folder instead of the default draft")
    ap.add_argument("--draft-vocab", type=int, default=2048)
    ap.add_argument("--tree-option", type=raw_tree_option, action="append", default=[])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    dtype = parse_dtype(args.dtype)
    target, draft, processor, _ = load_pair(None, None, dtype, True)
    if args.draft is not None:
        draft = load_model(args.draft, dtype)
    prompts = {p.id: p for p in builtin_set(args.set)}
    if args.prompt_id not in prompts:
        raise SystemExit(f"no prompt {args.prompt_id!r} in the {args.set} set; ids: {', '.join(prompts)}")
    inp = prepare_inputs(processor, prompts[args.prompt_id], target.dtype)
    for method, options in (("chain", {}), ("dynamic", dict(args.tree_option))):
        dec = SpeculativeDecoder(target, draft, method=method, draft_vocab=args.draft_vocab, **options)
        rows = []

        def on_step(tree, verdict, rows=rows):
            last = verdict.path[-1]
            rows.append((len(tree) - 1, int(tree.depth.max()), len(verdict.path) - 1,
                         float(tree.score[last]) if last else 1.0))

        with torch.inference_mode():
            out = dec.generate(input_ids=inp["input_ids"], pixel_values=inp["pixel_values"],
                               max_new_tokens=args.max_new_tokens, on_step=on_step)
        s = out.stats
        print(f"{method}: mean accepted length {s['mean_accepted']:.2f}, {s['steps']} steps, "
              f"draft {1e3 * s['time_draft_s'] / s['steps']:.1f} ms / verify {1e3 * s['time_verify_s'] / s['steps']:.1f} ms per step")
        print("  nodes, depth, accepted, path confidence of the last accepted node:")
        for nodes, depth, acc, conf in rows:
            print(f"    {nodes:3d} {depth:2d} {acc:2d}  {conf:.4f}")


if __name__ == "__main__":
    main()
