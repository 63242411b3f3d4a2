"""Overlay the loss curves of several `train-target` runs (training loss, 25-step mean, and the
held-out loss points), e.g. projector-only against LoRA on the same data:

    .venv/bin/python tools/plot_target_runs.py runs/target3a=projector runs/target3b="LoRA r8" \
        --out docs/img/training_target_lora.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="RUN_DIR=label")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--window", type=int, default=25)
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4))
    for spec in args.runs:
        run, _, label = spec.partition("=")
        hist = json.loads((Path(run) / "history.json").read_text())
        train = [h for h in hist if "loss" in h]
        steps = [h["step"] for h in train]
        loss = [h["loss"] for h in train]
        smooth = [sum(loss[max(0, i - args.window + 1): i + 1]) / len(loss[max(0, i - args.window + 1): i + 1])
                  for i in range(len(loss))]
        line, = ax.plot(steps, smooth, label=f"{label or run}: training loss (mean of {args.window})")
        ev = [(h["step"], h["eval_loss"]) for h in hist if h.get("eval_loss") is not None]
        if ev:
            ax.plot(*zip(*ev), "o--", color=line.get_color(), label=f"{label or run}: held-out loss")
    ax.set_xlabel("step (4 examples each)")
    ax.set_ylabel("cross-entropy per assistant token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
