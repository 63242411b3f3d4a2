"""Mean accepted length of several drafts and decoder settings on the same prompts (T=0, dynamic).

    .venv/bin/python tools/compare_drafts.py --draft runs/draft2/draft --draft runs/draft3/draft \
        --eval-data runs/data/recipe2/eval_descriptions.json --prompts 16 --max-new-tokens 96 \
        --setting int8=draft_quant=int8 --setting none=draft_quant=none

Acceptance only (no timing: it can run on a busy machine). The target is the assembled default
one in float32 unless --target is given; each draft is loaded from its folder and rounded to bf16,
as `ship-default` ships it. A setting is NAME=opt=val[,opt=val] of `SpeculativeDecoder` options
(tree options, draft_quant, draft_vocab). Prints one line per (draft, setting) and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from specllava.cli import raw_tree_option
from specllava.training.common import load_records
from specllava.training.common import image_records, with_images
from specllava.training.distill import measure_acceptance


def _setting(text: str) -> tuple[str, dict]:
    name, _, opts = text.partition("=")
    return name, dict(raw_tree_option(o) for o in opts.split(",") if o.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None, help="target folder (default: the assembled default target)")
    ap.add_argument("--draft", action="append", required=True, help="draft model folder, repeatable")
    ap.add_argument("--eval-data", required=True, type=Path, help="LLaVA JSON prompts (first human turn)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--setting", type=_setting, action="append", default=[], metavar="NAME=opt=val,...")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the summary JSON here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from specllava import load_default_models

    if args.target is None:
        m = load_default_models(dtype=torch.float32)
        target, processor = m.target, m.processor
    else:
        target = LlavaForConditionalGeneration.from_pretrained(args.target, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(args.target)
    records, root = load_records(args.eval_data)
    records = image_records(with_images(records, root, print))  # the prompts are image prompts
    settings = args.setting or [("default", {})]
    summary = {}
    for path in args.draft:
        draft = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).float().eval()
        for name, opts in settings:
            r = measure_acceptance(target, draft, processor, records, root, args.prompts, args.max_new_tokens,
                                   desc=f"{path} {name}", **opts)
            summary[f"{path} {name}"] = {k: r[k] for k in ("mean_accepted", "new_tokens", "target_forwards",
                                                           "draft_forwards_per_step")}
            print(f"{path:<28} {name:<12} tau {r['mean_accepted']:.3f} ({r['new_tokens']} tokens / "
                  f"{r['target_forwards']} target forwards), {r['draft_forwards_per_step']:.2f} draft forwards per step",
                  flush=True)
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
