"""CPU time of the sampled verification rule inside real decoding: `verify_sampling` (p at the
visited nodes, the residual updates, the draft's q rows, the per-node loop) against
`reference_verify_sampling` (the same rule over full float64 vectors), same seeds, interleaved.

    .venv/bin/python tools/profile_sampling_rule.py [--max-new-tokens 48] [--seeds 4] [--rounds 2]

Default pair, bf16, the shipped example photo, dynamic tree at T=1. The rule runs on one thread
and is timed with the thread's CPU time (a shared machine's waits do not count); the rest of the
decoding uses 2 threads. Both rules must give the same sequences (checked).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import specllava.core.decoder as decoder_module
from specllava import SpeculativeDecoder
from specllava.core import verify
from specllava.models.hf import chat_inputs, load_pair, parse_dtype

EXAMPLE = Path(__file__).resolve().parents[1] / "src" / "specllava" / "assets" / "example.jpg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from PIL import Image

    target, draft, processor, _ = load_pair(None, None, parse_dtype("bfloat16"), True)
    inputs = chat_inputs(processor, "Describe this image in detail.", Image.open(EXAMPLE).convert("RGB"))
    dec = SpeculativeDecoder(target, draft, method="dynamic")
    outputs = {}
    for _ in range(args.rounds):
        for name, rule in (("verify_sampling", verify.verify_sampling),
                           ("reference_verify_sampling", verify.reference_verify_sampling)):
            times = []

            def timed(*a, **k):
                torch.set_num_threads(1)
                t = time.thread_time()
                out = rule(*a, **k)
                times.append(time.thread_time() - t)
                torch.set_num_threads(2)
                return out

            decoder_module.verify_sampling = timed
            seqs = []
            for seed in range(args.seeds):
                out = dec.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                   max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0, seed=seed)
                seqs.append(out.sequences[0].tolist())
            outputs.setdefault(name, seqs)
            print(f"{name}: {1e3 * statistics.median(times):.2f} ms median, {1e3 * statistics.mean(times):.2f} ms mean "
                  f"CPU time a step ({len(times)} steps)", flush=True)
    decoder_module.verify_sampling = verify.verify_sampling
    same = outputs["verify_sampling"] == outputs["reference_verify_sampling"]
    print("same sequences:", same)


if __name__ == "__main__":
    main()
