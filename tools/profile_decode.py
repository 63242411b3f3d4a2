"""Profile one speculative decoding run: where a step's time goes, by model role and by torch op.

    .venv/bin/python tools/profile_decode.py [--method dynamic] [--dtype bfloat16] [--threads 1] \
        [--draft-vocab 8192] [--draft-quant auto] [--tree-option min_feed_mass=0.3] [--max-new-tokens 64] [--rows 15] \
        [--temperature 1]

Default pair and the shipped example image. Prints (1) the decoder's own time split per step
(draft, verify, rest), draft forwards per step and the mean accepted length, (2) one-forward costs
of target and draft (1 and 8 tokens on the same cached prompt; the target through transformers'
forward and through its exact lean path; the draft as given, with the reduced vocabulary, and
with the reduced vocabulary in int8, each through transformers' decoder and through the lean path
of `specllava.core.backends.lean`), (3) torch.profiler's op table
(self CPU time) over the whole decode. The run is repeated once untimed first (warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from specllava import SpeculativeDecoder
from specllava.cli import raw_tree_option
from specllava.core.cache import crop
from specllava.core.quant import QUANT_CHOICES, resolve_quant
from specllava.core.backends import draft_backend, exact_backend
from specllava.core.model_info import vocab_size
from specllava.core.runner import ModelRunner
from specllava.core.tree import attention_bias
from specllava.core.vocab import draft_ranking, draft_vocab_ids
from specllava.models.hf import chat_inputs, load_pair, parse_dtype

EXAMPLE = Path(__file__).resolve().parents[1] / "src" / "specllava" / "assets" / "example.jpg"


def forward_ms(runner: ModelRunner, n: int, repeats: int = 10) -> float:
    """Median ms of one forward of n causal tokens on the runner's cached prefix."""
    length = runner.length
    tokens = torch.randint(10, 8000, (n,))
    positions = torch.arange(length, length + n)
    bias = None if n == 1 else attention_bias(torch.ones(n, n, dtype=torch.bool).tril(), length, runner.dtype)
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        runner.forward(tokens, positions, bias)
        times.append(time.perf_counter() - t)
        crop(runner.cache, length)
    return 1e3 * statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="dynamic")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--draft-quant", choices=QUANT_CHOICES, default="auto")
    ap.add_argument("--tree-option", type=raw_tree_option, action="append", default=[])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="Describe this image in detail.")
    ap.add_argument("--image", type=Path, default=EXAMPLE)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling (seeded)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from PIL import Image

    target, draft, processor, _ = load_pair(None, None, parse_dtype(args.dtype), True)
    inputs = chat_inputs(processor, args.prompt, Image.open(args.image).convert("RGB"))
    kw = dict(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], max_new_tokens=args.max_new_tokens)
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature, seed=0)
    dec = SpeculativeDecoder(target, draft, method=args.method, draft_vocab=args.draft_vocab or None,
                             draft_quant=args.draft_quant, **dict(args.tree_option))
    with torch.inference_mode():
        dec.generate(**kw)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = dec.generate(**kw)
        s = out.stats
        steps = max(s["steps"], 1)
        print(f"{args.method}: {s['new_tokens']} tokens, {s['steps']} steps, mean accepted length {s['mean_accepted']:.2f}, "
              f"{(s['draft_forwards'] - 1) / steps:.2f} draft forwards per step, {s['tree_nodes_mean']:.1f} tree nodes")
        rest = s["time_decode_s"] - s["time_draft_s"] - s["time_verify_s"]
        print(f"per step (under the profiler): draft {1e3 * s['time_draft_s'] / steps:.1f} ms, "
              f"verify {1e3 * s['time_verify_s'] / steps:.1f} ms, rest {1e3 * rest / steps:.2f} ms")
        ids = inputs["input_ids"]
        vocab = draft_vocab_ids(args.draft_vocab, vocab_size(draft), draft_ranking(draft)) if args.draft_vocab else None
        runners = [("target, transformers' forward", ModelRunner(target))]
        exact = exact_backend(target)
        if exact is not None:
            runners.append(("target, exact lean path", ModelRunner(target, exact)))
        runners.append(("draft", ModelRunner(draft)))
        quants = [None] + (["int8"] if resolve_quant("auto", draft.device) else [])
        for quant in quants:
            if quant is None and vocab is None:
                continue
            for lean in (False, True):  # transformers' decoder, then the lean path
                label = ", ".join(x for x in ("draft", quant, f"draft_vocab {args.draft_vocab}" if vocab is not None else "",
                                              "lean path" if lean else "transformers' decoder") if x)
                runners.append((label, ModelRunner(draft, draft_backend(draft, vocab, quant, lean=lean))))
        for name, runner in runners:
            runner.prefill(torch.randint(10, 8000, ids.shape))  # text tokens: the cost depends on the length only
            print(f"one forward, {name}: 1 token {forward_ms(runner, 1):.1f} ms, 8 tokens {forward_ms(runner, 8):.1f} ms")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
