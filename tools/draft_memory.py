"""Peak training memory of `train-draft` for a LLaVA-1.5-7B target (or a model folder's config):
the target's parameters, the draft's own parameters, gradients and AdamW moments, counted on the
meta device (`specllava.training.memory`), for the default draft and both presets.

    PYTHONPATH=src python tools/draft_memory.py                      # llava-1.5-7b-hf shapes, bf16 target
    PYTHONPATH=src python tools/draft_memory.py --target DIR --dtype float16
"""

from __future__ import annotations

import argparse

from specllava.models.options import DTYPES
from specllava.training.memory import GB, llava_1_5_7b_config, memory_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="a model folder whose config.json to use (default: llava-1.5-7b shapes)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="the target's dtype (default: %(default)s)")
    args = parser.parse_args()
    if args.target is None:
        config = llava_1_5_7b_config()
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.target)
    print(f"| draft | trained parameters | target ({args.dtype}) | draft's own tensors | gradients | AdamW | total |")
    print("|---|---|---|---|---|---|---|")
    for r in memory_table(config, DTYPES[args.dtype]):
        print(f"| {r['draft']} | {r['trained_parameters'] / 1e6:.1f} M | {r['target_parameters'] / GB:.2f} GB | "
              f"{r['draft_parameters'] / GB:.2f} GB | {r['gradients'] / GB:.2f} GB | {r['optimizer'] / GB:.2f} GB | "
              f"**{r['total'] / GB:.2f} GB** |")


if __name__ == "__main__":
    main()
