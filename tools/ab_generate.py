"""Interleaved before/after timing of `SpeculativeDecoder.generate` at batch 1, for two source
trees of specllava (e.g. a commit checked out into /tmp and the working tree), in one run.

    git archive <commit> src | tar -x -C /tmp/old
    .venv/bin/python tools/ab_generate.py --old-src /tmp/old/src --new-src src \
        --set out-of-domain --limit 8 --max-new-tokens 64 --method dynamic --threads 2 --rounds 2

Each tree runs in its own worker process (its own `import specllava`, the default pair loaded
once, the prompts prepared once, one untimed warm-up generate); the parent asks them in turn, per
prompt and round, for one timed generate (order alternating), so drifts of a shared machine hit
both alike. Prints per-run times, the median new/old time ratio over (prompt, round) pairs, and
whether both emitted the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from transformers.utils import logging; logging.set_verbosity_error()
from specllava import SpeculativeDecoder
from specllava.bench.harness import prepare_inputs
from specllava.bench.prompts import builtin_set
from specllava.models.hf import load_pair
method, max_new, set_name, limit = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
target, draft, processor, _ = load_pair(None, None, "auto", method != "ar")
dec = SpeculativeDecoder(target, None if method == "ar" else draft, method=method)
inputs = [prepare_inputs(processor, p, target.dtype) for p in builtin_set(set_name, limit=limit)]
dec.generate(**inputs[0], max_new_tokens=16)
print(json.dumps({"ready": len(inputs)}), flush=True)
for line in sys.stdin:
    i = int(line)
    t0 = time.perf_counter()
    out = dec.generate(**inputs[i], max_new_tokens=max_new)
    dt = time.perf_counter() - t0
    n = inputs[i]["input_ids"].shape[1]
    print(json.dumps({"i": i, "s": dt, "tokens": out.sequences[0, n:].tolist()}), flush=True)
"""


def start(src: str, args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(args.threads), args.method, str(args.max_new_tokens),
                             args.set, str(args.limit)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    json.loads(proc.stdout.readline())  # ready
    return proc


def ask(proc: subprocess.Popen, i: int) -> dict:
    proc.stdin.write(f"{i}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-src", required=True)
    ap.add_argument("--new-src", required=True)
    ap.add_argument("--method", default="dynamic")
    ap.add_argument("--set", default="out-of-domain")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    workers = {"old": start(args.old_src, args), "new": start(args.new_src, args)}
    ratios, same = [], 0
    for r in range(args.rounds):
        for i in range(args.limit):
            order = ("old", "new") if (r + i) % 2 == 0 else ("new", "old")
            got = {name: ask(workers[name], i) for name in order}
            ratios.append(got["new"]["s"] / got["old"]["s"])
            same += got["new"]["tokens"] == got["old"]["tokens"]
            print(f"round {r} prompt {i}: old {got['old']['s']:.3f} s, new {got['new']['s']:.3f} s, "
                  f"new/old {ratios[-1]:.3f}, same tokens {got['new']['tokens'] == got['old']['tokens']}", flush=True)
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    print(f"median new/old time ratio over {len(ratios)} runs: {statistics.median(ratios):.3f} "
          f"(quartiles {statistics.quantiles(ratios, n=4)[0]:.3f}..{statistics.quantiles(ratios, n=4)[2]:.3f}); "
          f"same tokens in {same}/{len(ratios)}")


if __name__ == "__main__":
    main()
