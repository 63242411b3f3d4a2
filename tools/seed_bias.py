"""Measure how far one torch.multinomial draw per freshly seeded generator strays from a fixed
distribution, with consecutive seeds as given and after SplitMix64 mixing (docs/algorithms.md).

    .venv/bin/python tools/seed_bias.py [--runs 20000] [--base 50000]
"""

import argparse
import math

import torch

from specllava.core.sampling import mix_seed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20000)
    ap.add_argument("--base", type=int, default=50000)
    args = ap.parse_args()
    # the first-token distribution of the tiny target in tests/core/test_sampling_lossless.py (T=0.7, top-k 4)
    p = torch.tensor([0.0, 0.0, 0.048, 0.031, 0.688, 0.0, 0.0, 0.233])
    p = p / p.sum()
    exact = float(p[7])
    for name, f in (("consecutive", lambda s: s), ("splitmix64", mix_seed)):
        hits = sum(
            int(torch.multinomial(p, 1, generator=torch.Generator().manual_seed(f(args.base + i)))) == 7
            for i in range(args.runs)
        )
        freq = hits / args.runs
        z = (freq - exact) / math.sqrt(exact * (1 - exact) / args.runs)
        print(f"{name:12s} P(token 7) = {freq:.4f} (exact {exact:.4f}), {z:+.2f} sigma")


if __name__ == "__main__":
    main()
