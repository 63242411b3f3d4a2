"""Host syncs per greedy decoding step, counted on any device with `core.syncs.HostSyncCounter`.

    PYTHONPATH=src python tools/host_syncs.py                 # a 32-layer tiny target on the CPU, seconds
    PYTHONPATH=src python tools/host_syncs.py --layers 2 --where

Every method with a draft model and with an EAGLE head, the target on its exact lean path: per
method the levels d each step drafted (the tree's depth, unless the node budget then drops the
deepest levels), host syncs per step (min and max) and the bound 2 d + 4 that
tests/core/test_host_syncs.py enforces; `--where` lists where each sync is made. The target and
draft are tiny random Llamas (the draft a perturbed copy of the target, so trees grow deep): the
count depends on the levels drafted, not on the models' size or device.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from specllava import SpeculativeDecoder  # noqa: E402
from specllava.core.eagle import EagleHead  # noqa: E402
from specllava.core.syncs import count_generation  # noqa: E402

DEEP = dict(max_depth=6, min_feed_mass=0.0, min_path_conf=0.0)
CASES = [("ar", {}), ("chain", {}), ("static", {}), ("dynamic", {}), ("dynamic", DEEP)]


def tiny_target(layers: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.15, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def perturbed(model, scale: float = 0.02, seed: int = 1):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    return out


def count(decoder, ids, new_tokens: int, **gen) -> dict:
    """Syncs per step (steps after the first), the steps' tree depths, and where they were made."""
    syncs, depths, out = count_generation(decoder, ids, new_tokens, **gen)
    per_step = syncs.per_step()
    where = Counter()
    for i in range(len(per_step)):
        where.update(f"{kind} at {place}" for kind, place in syncs.step_events(i).elements())
    return {"steps": len(per_step), "syncs_min": min(per_step), "syncs_max": max(per_step),
            "depth_min": min(depths), "depth_max": max(depths), "mean_accepted": out.stats["mean_accepted"],
            "excess_over_bound": max(n - (2 * d + 4) for n, d in zip(per_step, depths)),
            "where_per_step": {k: v / len(per_step) for k, v in where.most_common()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32, help="target layers (default 32, LLaVA-1.5-7B's)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--where", action="store_true", help="list where each step's syncs are made")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    target = tiny_target(args.layers)
    torch.manual_seed(5)
    drafts = {"draft model": perturbed(target), "eagle head": EagleHead.from_target(target)}
    ids = torch.tensor([[1, *range(10, 21)]])
    rows = []
    print(f"target: tiny Llama, {args.layers} layers; greedy; bound 2 d + 4 per step (d: levels drafted)")
    print(f"{'draft':12s} {'method':13s} {'steps':>5s} {'depth d':>8s} {'syncs':>6s} {'max - bound':>11s} {'tau':>5s}")
    for draft_kind, draft in drafts.items():
        for method, options in CASES:
            if method == "ar" and draft_kind != "draft model":
                continue
            name = method + ("-deep" if options else "")
            dec = SpeculativeDecoder(target, None if method == "ar" else draft, method=method, **options)
            r = {"draft": "-" if method == "ar" else draft_kind, "method": name, **count(dec, ids, args.new_tokens)}
            rows.append(r)
            depth = f"{r['depth_min']}-{r['depth_max']}" if r["depth_min"] != r["depth_max"] else str(r["depth_min"])
            syncs = f"{r['syncs_min']}-{r['syncs_max']}" if r["syncs_min"] != r["syncs_max"] else str(r["syncs_min"])
            print(f"{r['draft']:12s} {name:13s} {r['steps']:5d} {depth:>8s} {syncs:>6s} {r['excess_over_bound']:11d} "
                  f"{r['mean_accepted']:5.2f}")
            if args.where:
                for place, n in r["where_per_step"].items():
                    print(f"{'':14s}{n:5.2f} x {place}")
    if args.json:
        args.json.write_text(json.dumps({"layers": args.layers, "rows": rows}, indent=1))
    return 1 if any(r["excess_over_bound"] > 0 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
