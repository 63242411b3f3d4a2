"""The one training loop of `train-target`, `train-draft` and `train-eagle`.

Contract:

- `start_run(cfg, out)` prepares a run folder: torch threads and seed from ``cfg``, ``<out>/`` and
  ``<out>/config.json`` (every knob of the run, as JSON).
- `lr_at(step, base, warmup, total)`: the learning-rate schedule every trainer uses, a linear
  warm-up over ``warmup`` steps, then a cosine decay from ``base`` to 10 % of it at ``total``.
- `train_loop(...)` runs AdamW-style steps over seeded, length-bucketed batches of ``examples``
  (`specllava.training.common.batches`: the batch of step s depends only on the seed and s, so a
  resumed run sees the data a whole run would have): it sets every parameter group's learning rate
  from the schedule, calls ``loss_fn(batch)``, steps (gradient norm clipped to 1), appends
  ``{"step", **record, "time_s"}`` to the history, shows progress with tqdm, saves
  ``<out>/checkpoint.pt`` (`Checkpoint`) every ``checkpoint_every`` steps, at the end and when the
  ``max_minutes`` budget runs out (then it stops), and with ``resume`` continues from that file
  (trained tensors, optimizer, step, history and torch's RNG state) exactly where it stopped.
- `plot_losses(history, path, title, curves)`: the loss plot of a run (``<out>/loss.png``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from specllava.training.common import Checkpoint, batches, optimizer_step, plot_history, smooth


def start_run(cfg, out: Path) -> Path:
    """Threads and seed from ``cfg``; ``out`` created, with ``out/config.json`` (``cfg`` as JSON)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
    return out


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then cosine decay to ``0.1 * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min((step - warmup) / max(total - warmup, 1), 1.0)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class LoopResult:
    """What a run did: the last step, why it stopped ("steps" or "time budget"), its minutes, and the
    whole history (one dict per step, plus whatever `after_step` appended)."""

    steps: int
    stopped_by: str
    minutes: float
    history: list = field(default_factory=list)


def train_loop(
    examples: list,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[list], tuple[torch.Tensor, dict]],
    out: Path,
    *,
    steps: int,
    batch_size: int,
    warmup: int,
    seed: int,
    checkpoint_every: int,
    max_minutes: float | None = None,
    resume: bool = False,
    desc: str = "train",
    postfix: str = "loss",
    length: Callable = lambda e: len(e.input_ids),
    after_step: Callable[[int, list], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    log=print,
) -> LoopResult:
    """The loop of the module docstring.

    loss_fn(batch) -> (loss, record): ``batch`` is a list of ``examples``; ``record`` (plain floats)
        goes into the step's history entry. ``postfix`` names the record field shown, smoothed, on
        the progress bar.
    after_step(step, history): e.g. a held-out evaluation; it may append to the history, and runs
        before the step's checkpoint is written, so the checkpoint holds it.
    on_checkpoint(step): also save something else (e.g. the model file) with each checkpoint.
    grad_scaler: loss scaling for float16 autocast (`optimizer_step`); its scale is not part of the
        checkpoint, so a resumed run finds it again over its first steps.
    Each parameter group's base learning rate is its ``base_lr`` entry when it has one, else its
    ``lr`` when the loop starts.
    """
    base_lrs = [g.get("base_lr", g["lr"]) for g in optimizer.param_groups]  # read before a resume overwrites them
    ckpt = Checkpoint(out)
    step = ckpt.load(params, optimizer) if resume else 0
    if step:
        log(f"resumed from {ckpt.path} at step {step}")
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    start, stopped = time.time(), "steps"
    bar = tqdm(total=steps, initial=step, desc=desc, mininterval=15)
    while step < steps:
        epoch, k = divmod(step, steps_per_epoch)
        idx = batches(examples, batch_size, seed, epoch, length=length)[k]
        for g, base in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr_at(step, base, warmup, steps)
        loss, record = loss_fn([examples[i] for i in idx])
        optimizer_step(loss, optimizer, params.values(), scaler=grad_scaler)
        step += 1
        ckpt.history.append({"step": step, **record, "time_s": time.time() - start})
        bar.update()
        bar.set_postfix({postfix: f"{smooth([h[postfix] for h in ckpt.history if postfix in h])[-1]:.3f}"})
        if after_step is not None:
            after_step(step, ckpt.history)
        over = max_minutes is not None and (time.time() - start) / 60 > max_minutes
        if step % checkpoint_every == 0 or step == steps or over:
            ckpt.save(step, params, optimizer)
            if on_checkpoint is not None:
                on_checkpoint(step)
        if over:
            stopped = "time budget"
            break
    bar.close()
    (Path(out) / "history.json").write_text(json.dumps(ckpt.history))
    return LoopResult(step, stopped, (time.time() - start) / 60, ckpt.history)


def plot_losses(history: list[dict], path: Path, title: str, curves: dict[str, str], raw: bool = True,
                markers: dict[str, str] | None = None, k: int = 25) -> None:
    """Each history field of ``curves`` (field -> label) against step, as its running mean over
    ``k`` steps ("<label> (mean of k)") and, with ``raw``, its per-step values ("<label> per step",
    drawn faint); each field of ``markers`` (e.g. a held-out loss) as points."""
    points: dict[int, dict] = {}
    keys: list[str] = []
    for key, label in curves.items():
        rows = [h for h in history if key in h]
        for h, mean in zip(rows, smooth([h[key] for h in rows], k)):
            point = points.setdefault(h["step"], {"step": h["step"]})
            if raw:
                point[f"{label} per step"] = h[key]
            point[f"{label} (mean of {k})"] = mean
        keys += ([f"{label} per step"] if raw else []) + [f"{label} (mean of {k})"]
    marked = [{"step": h["step"], label: h[key]} for key, label in (markers or {}).items() for h in history if key in h]
    plot_history(list(points.values()) + marked, path, title, (*keys, *(markers or {}).values()))
