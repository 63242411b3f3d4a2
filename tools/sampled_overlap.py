"""How often can a sampled draft token be accepted at all? sum_x min(p(x), q(x)) on the target's own
sampled text: the probability that speculative sampling accepts a single draft candidate, per
position (tree drafting adds candidates, but not beyond what q and p share).

    .venv/bin/python tools/sampled_overlap.py [--in-domain 6] [--photos 4] [--max-new-tokens 64] \
        [--draft-vocab 4096] [--draft-temperature 0.5 0.8 1.0 1.2] [--threads 2] [--draft DIR ...]

Default pair in float32. Each prompt is answered by `target.generate(do_sample=True, temperature=1)`
(seeded per prompt); one forward of the target and of the draft over the whole answer gives p (T=1)
and q at every answer position. q is the draft's softmax at each `--draft-temperature`, over the
ranked `--draft-vocab` ids (`specllava.core.vocab`; 0 = the full vocabulary). Prints the mean
overlap per draft temperature, and the full-vocabulary overlap at temperature 1. `--draft` adds
other drafts for the default target (a draft folder, e.g. runs/draft_tvd/draft from `train-draft`,
a draft.safetensors in the shipped format, or an EAGLE head from `train-eagle`, e.g. runs/eagle),
measured on the same sampled answers. A head's
q here is its first-level prediction (it reads the target's features of the same text), the one a
tree's root children are drawn from; a draft model's q likewise reads the true text.

Per level: with a = sum min(p, q) at each position (draft temperature 1), level k's chain
acceptance is the mean over start positions t of a_t * ... * a_{t+k-1} (positions of one answer),
the probability that k single draft samples in a row are all accepted, estimated along the
target's sampled text; "conditional" divides by level k-1's. Each draft is also compared with the
`--baseline` draft (default: the default draft) prompt by prompt (mean difference of the per-prompt mean overlaps and its standard
error over prompts), and its confidence is set against the target's: the mean probability of the
draft's top token under the draft and under the target (a draft above the target is
overconfident). `--out FILE` writes all of it as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from specllava.bench.harness import prepare_inputs
from specllava.bench.prompts import builtin_set
from specllava.core.eagle import EagleHead
from specllava.core.model_info import vocab_size
from specllava.core.vocab import draft_ranking, draft_vocab_ids
from specllava.models import load_default_models
from specllava.models.hf import load_model
from specllava.models.shipped import load_draft


def _load_draft(path: str, target):
    """An EAGLE head file, a draft.safetensors in the shipped format, or a draft model folder."""
    if EagleHead.is_head_file(path):
        return EagleHead.load(path)
    if path.endswith(".safetensors"):
        return load_draft(target, path).float().eval()
    return load_model(path, torch.float32)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--in-domain", type=int, default=6, help="prompts from the in-domain set")
    ap.add_argument("--photos", type=int, default=4, help="prompts from the out-of-domain set")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--draft-vocab", type=int, default=4096)
    ap.add_argument("--draft-temperature", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft", nargs="+", action="extend", default=[],
                    help="other draft folders (or EAGLE heads) to measure against the default target; repeatable")
    ap.add_argument("--baseline", default="default draft",
                    help="the draft each other one is compared with prompt by prompt: one of the --draft paths "
                    "(default: the default draft)")
    ap.add_argument("--levels", type=int, default=5, help="chain depths reported (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.baseline not in ["default draft", *args.draft]:
        ap.error(f"--baseline {args.baseline!r} is not one of the --draft paths")
    torch.set_num_threads(args.threads)

    m = load_default_models(dtype=torch.float32)
    target = m.target
    drafts = {"default draft": m.draft,
              **{d: _load_draft(d, target) for d in args.draft}}
    size = vocab_size(m.draft)
    prompts = builtin_set("in-domain")[: args.in_domain] + builtin_set("out-of-domain")[: args.photos]
    overlap = {(name, tau): [] for name in drafts for tau in args.draft_temperature}
    full = {name: [] for name in drafts}
    confidence = {name: [] for name in drafts}
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            inp = prepare_inputs(m.processor, prompt, target.dtype)
            torch.manual_seed(i)
            out = target.generate(input_ids=inp["input_ids"], pixel_values=inp["pixel_values"],
                                  max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
            start = inp["input_ids"].shape[1] - 1  # logits at start predict the first answer token
            full_out = target(input_ids=out, pixel_values=inp["pixel_values"], output_hidden_states=True)
            p = full_out.logits[0, start:-1].softmax(-1)
            for name, draft in drafts.items():
                ids = draft_vocab_ids(args.draft_vocab, size, draft_ranking(draft)) if args.draft_vocab else torch.arange(size)
                if isinstance(draft, EagleHead):
                    pred = draft.teacher_forced(target, out, full_out.hidden_states[-1])[0]
                    d = (pred @ target.get_output_embeddings().weight.float().T)[0, start:-1]
                else:
                    d = draft(input_ids=out, pixel_values=inp["pixel_values"]).logits[0, start:-1]
                for tau in args.draft_temperature:
                    q = torch.zeros_like(p)
                    q[:, ids] = (d[:, ids] / tau).softmax(-1)
                    overlap[name, tau].append(torch.minimum(p, q).sum(-1))
                    if tau == 1.0:  # the draft's confidence in its top token against the target's
                        top_q, top = q.max(-1)
                        confidence[name].append(torch.stack([top_q, p.gather(-1, top[:, None])[:, 0]], -1))
                full[name].append(torch.minimum(p, d.softmax(-1)).sum(-1))
    n = sum(x.numel() for x in full["default draft"])
    print(f"{len(prompts)} prompts, {n} sampled answer positions; draft vocabulary {args.draft_vocab or size} (ranked)")
    result = {"prompts": len(prompts), "positions": n, "draft_vocab": args.draft_vocab or size, "drafts": {}}
    for name in drafts:
        row = result["drafts"][name] = {"overlap": {}, "full_vocabulary": torch.cat(full[name]).mean().item()}
        for tau in args.draft_temperature:
            row["overlap"][f"{tau:g}"] = torch.cat(overlap[name, tau]).mean().item()
            print(f"{name}, draft temperature {tau:g}: mean sum min(p, q) = {row['overlap'][f'{tau:g}']:.3f}")
        print(f"{name}, full vocabulary, draft temperature 1: {row['full_vocabulary']:.3f}")
        if confidence[name]:
            qp = torch.cat(confidence[name]).mean(0)
            row["top_token"] = {"draft_probability": qp[0].item(), "target_probability": qp[1].item()}
            print(f"{name}, the draft's top token at draft temperature 1: mean probability {qp[0]:.3f} under the "
                  f"draft, {qp[1]:.3f} under the target")
        if 1.0 in args.draft_temperature:  # the drawings (in-domain) and the photos apart
            sets = {"in-domain": overlap[name, 1.0][: args.in_domain], "out-of-domain": overlap[name, 1.0][args.in_domain:]}
            row["per_set"] = {k: torch.cat(v).mean().item() for k, v in sets.items() if v}
            print(f"{name}, draft temperature 1, per set: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in row["per_set"].items()))
        if name != args.baseline and 1.0 in args.draft_temperature:
            diff = torch.tensor([(a.mean() - b.mean()).item() for a, b in zip(overlap[name, 1.0], overlap[args.baseline, 1.0])])
            row["minus_baseline"] = {"baseline": args.baseline, "mean": diff.mean().item(),
                                     "standard_error": (diff.std() / len(diff) ** 0.5).item()}
            print(f"{name} minus {args.baseline}, draft temperature 1, per prompt: {diff.mean():+.4f} "
                  f"(standard error {row['minus_baseline']['standard_error']:.4f} over {len(diff)} prompts)")
        if 1.0 in args.draft_temperature:
            chain = chain_acceptance(overlap[name, 1.0], args.levels)
            row["chain"] = chain
            print(f"{name}, per level (draft temperature 1): chain acceptance "
                  + " ".join(f"{c:.3f}" for c in chain["all_accepted"]) + "; conditional "
                  + " ".join(f"{c:.3f}" for c in chain["conditional"]))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def chain_acceptance(per_answer: list[torch.Tensor], levels: int) -> dict:
    """For k = 1..levels: the mean over start positions of the product of k consecutive overlaps of one
    answer ("all_accepted"), and its ratio to level k-1's ("conditional"; level 1: the mean overlap)."""
    all_accepted = []
    for k in range(1, levels + 1):
        prods = [a.unfold(0, k, 1).prod(-1) for a in per_answer if a.numel() >= k]
        all_accepted.append(torch.cat(prods).mean().item() if prods else float("nan"))
    conditional = [all_accepted[0]] + [b / a if a else float("nan") for a, b in zip(all_accepted, all_accepted[1:])]
    return {"all_accepted": all_accepted, "conditional": conditional}


if __name__ == "__main__":
    main()
