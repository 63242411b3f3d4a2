"""Overlay the curves of several `train-draft` runs: the TVD (1 - sum min(p, q) on the training
batches, what acceptance rewards) and the KL, 25-step means, against the step, with each run's
wall time in its label:

    .venv/bin/python tools/plot_draft_runs.py runs/draft_kl=KL runs/draft_tvd=TVD \
        --out docs/img/training_draft_objectives.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def smooth(values: list[float], k: int) -> list[float]:
    return [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]


def wall_minutes(history: list[dict]) -> float:
    """Training minutes over all legs of a run (each resumed leg's clock restarts at 0)."""
    total, last = 0.0, 0.0
    for h in history:
        if h["time_s"] < last:
            total += last
        last = h["time_s"]
    return (total + last) / 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="RUN_DIR=label")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--window", type=int, default=25)
    args = ap.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for spec in args.runs:
        run, _, label = spec.partition("=")
        hist = [h for h in json.loads((Path(run) / "history.json").read_text()) if "tvd" in h]
        steps = [h["step"] for h in hist]
        name = f"{label or run} ({wall_minutes(hist):.0f} min)"
        for ax, key in zip(axes, ("tvd", "kl")):
            ax.plot(steps, smooth([h[key] for h in hist], args.window), label=name)
    axes[0].set_ylabel(f"TVD = 1 - sum min(p, q), mean of {args.window} steps")
    axes[1].set_ylabel(f"KL(p || q), mean of {args.window} steps")
    for ax in axes:
        ax.set_xlabel("step (4 answers each)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
