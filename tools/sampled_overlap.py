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
other drafts for the default target (a draft folder, e.g. runs/draft5/draft from `train-draft`, or
an EAGLE head from `train-eagle`, e.g. runs/eagle), measured on the same sampled answers. A head's
q here is its first-level prediction (it reads the target's features of the same text), the one a
tree's root children are drawn from; a draft model's q likewise reads the true text.
"""

from __future__ import annotations

import argparse

import torch

from specllava.bench.harness import prepare_inputs
from specllava.bench.prompts import builtin_set
from specllava.core.eagle import EagleHead
from specllava.core.model_info import vocab_size
from specllava.core.vocab import draft_ranking, draft_vocab_ids
from specllava.models import load_default_models
from specllava.models.hf import load_model


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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    m = load_default_models(dtype=torch.float32)
    target = m.target
    drafts = {"default draft": m.draft,
              **{d: EagleHead.load(d) if EagleHead.is_head_file(d) else load_model(d, torch.float32) for d in args.draft}}
    size = vocab_size(m.draft)
    prompts = builtin_set("in-domain")[: args.in_domain] + builtin_set("out-of-domain")[: args.photos]
    overlap = {(name, tau): [] for name in drafts for tau in args.draft_temperature}
    full = {name: [] for name in drafts}
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
                full[name].append(torch.minimum(p, d.softmax(-1)).sum(-1))
    n = sum(x.numel() for x in full["default draft"])
    print(f"{len(prompts)} prompts, {n} sampled answer positions; draft vocabulary {args.draft_vocab or size} (ranked)")
    for name in drafts:
        for tau in args.draft_temperature:
            print(f"{name}, draft temperature {tau:g}: mean sum min(p, q) = {torch.cat(overlap[name, tau]).mean():.3f}")
        print(f"{name}, full vocabulary, draft temperature 1: {torch.cat(full[name]).mean():.3f}")


if __name__ == "__main__":
    main()
