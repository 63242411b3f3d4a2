"""The one training loop of `train-target`, `train-draft` and `train-eagle`.

Contract:

- `start_run(cfg, out)` prepares a run folder: torch threads and seed from ``cfg``, ``<out>/`` and
  ``<out>/config.json`` (every knob of the run, as JSON).
- `lr_at(step, base, warmup, total)`: the learning-rate schedule every trainer uses, a linear
  warm-up over ``warmup`` steps, then a cosine decay from ``base`` to 10 % of it at ``total``.
- `train_loop(...)` runs AdamW-style steps over seeded, length-bucketed batches of ``examples``
  (`specllava.training.common.batches`: the batch of step s depends only on the seed and s, so a
  resumed run sees the data a whole run would have; ``examples`` may be any sequence, e.g. records
  tokenized on demand, `specllava.training.common.Examples`): it sets every parameter group's learning rate
  from the schedule, calls ``loss_fn(batch)``, steps (gradient norm clipped to 1), appends
  ``{"step", **record, "time_s"}`` to the history, shows progress with tqdm, saves
  ``<out>/checkpoint.pt`` (`Checkpoint`) every ``checkpoint_every`` steps, at the end and when the
  ``max_minutes`` budget runs out (then it stops), and with ``resume`` continues from that file
  (trained tensors, optimizer, step, history and torch's RNG state) exactly where it stopped.
- Data parallel (`Processes`, from accelerate's `PartialState` under ``accelerate launch``): every
  process computes the same global batch of step s and takes its share (every count-th example);
  the gradients are averaged over all the loss terms of the global batch (each process's loss
  weighted by its number of terms), so N processes take the steps one process would, up to
  floating-point rounding. The main process alone logs, checkpoints and writes the history.
- `plot_losses(history, path, title, curves)`: the loss plot of a run (``<out>/loss.png``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from specllava.training.common import Checkpoint, batches, optimizer_step, plot_history, smooth


@dataclass
class Processes:
    """The data-parallel processes of a run: this one's ``index``, their ``count``, its ``device``.

    `Processes.start(device)` reads them from the environment `accelerate launch` (or torchrun)
    sets, joining the process group (NCCL on GPUs, gloo on CPUs); one process without it.
    """

    index: int = 0
    count: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.index == 0

    @classmethod
    def start(cls, device: str | None = None) -> "Processes":
        """Under a launcher: the process group joined, each process on its own device (``cuda:<local
        rank>`` for CUDA, ``device`` otherwise). Alone: ``device`` (default: cuda when available)."""
        import os
        from datetime import timedelta

        from specllava.models.options import default_device

        wanted = torch.device(device or default_device())
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(0, 1, wanted)
        from accelerate import PartialState
        from accelerate.utils import InitProcessGroupKwargs

        # a long timeout: the other processes wait at a barrier while the main one writes answers/reports
        state = PartialState(cpu=wanted.type == "cpu", **InitProcessGroupKwargs(timeout=timedelta(hours=12)).to_kwargs())
        return cls(state.process_index, state.num_processes, state.device if wanted.type == "cuda" else wanted)

    def barrier(self) -> None:
        if self.count > 1:
            torch.distributed.barrier()

    def finish(self) -> None:
        """Every process waits here, then leaves the process group together: one that exits while
        another still works (the main one saving and reporting) can abort in gloo's threads."""
        if self.count > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def gather(self, obj) -> list:
        """Every process's ``obj`` (small Python objects), in process order."""
        if self.count == 1:
            return [obj]
        out = [None] * self.count
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.count > 1:
            torch.distributed.all_reduce(tensor)
        return tensor


def start_run(cfg, out: Path, write: bool = True) -> Path:
    """Threads and seed from ``cfg``; ``out`` created, with ``out/config.json`` (``cfg`` as JSON)
    when ``write`` (the main process of a data-parallel run)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if write:
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
    lengths=None,
    processes: Processes | None = None,
    log=print,
) -> LoopResult:
    """The loop of the module docstring.

    loss_fn(batch) -> (loss, record) or (loss, record, terms): ``batch`` is a list of ``examples``;
        ``record`` (plain floats) goes into the step's history entry; ``terms``, the number of terms
        the loss averages (default: the batch size), weighs each process's loss and record in a
        data-parallel run. ``postfix`` names the record field shown, smoothed, on the progress bar.
    lengths: each example's (estimated) length for the batches' length buckets, or a function
        returning them now (examples that change during the run); default ``length(example)`` for
        every example, read at every step. The batches are those of the current lengths.
    processes: the data-parallel processes (`Processes`); default one.
    after_step(step, history): e.g. a held-out evaluation; it may append to the history, and runs
        before the step's checkpoint is written, so the checkpoint holds it.
    on_checkpoint(step): also save something else (e.g. the model file) with each checkpoint.
    grad_scaler: loss scaling for float16 autocast (`optimizer_step`); its scale is not part of the
        checkpoint, so a resumed run finds it again over its first steps.
    Each parameter group's base learning rate is its ``base_lr`` entry when it has one, else its
    ``lr`` when the loop starts.
    """
    base_lrs = [g.get("base_lr", g["lr"]) for g in optimizer.param_groups]  # read before a resume overwrites them
    procs = processes or Processes()
    quiet = (lambda *a, **k: None) if not procs.main else log
    ckpt = Checkpoint(out)
    step = ckpt.load(params, optimizer) if resume else 0
    if step:
        quiet(f"resumed from {ckpt.path} at step {step}")
    if lengths is None:
        lengths = lambda: [length(e) for e in examples]  # noqa: E731
    current = lengths if callable(lengths) else (lambda: lengths)
    start, stopped = time.time(), "steps"
    bar = tqdm(total=steps, initial=step, desc=desc, mininterval=15, disable=not procs.main)
    order = None  # (epoch, the lengths, their batches): computed again only when one changes
    while step < steps:
        now = np.asarray(current())
        epoch, k = divmod(step, math.ceil(len(now) / batch_size))
        if order is None or order[0] != epoch or not np.array_equal(order[1], now):
            order = (epoch, now, batches(now, batch_size, seed, epoch))
        idx = order[2][k]
        for g, base in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr_at(step, base, warmup, steps)
        if procs.count == 1:
            loss, record, *_ = loss_fn([examples[i] for i in idx])
            optimizer_step(loss, optimizer, params.values(), scaler=grad_scaler)
        else:
            record = _parallel_step(loss_fn, [examples[i] for i in idx[procs.index :: procs.count]], optimizer,
                                    params, grad_scaler, procs)
        step += 1
        over = max_minutes is not None and (time.time() - start) / 60 > max_minutes
        over = any(procs.gather(over))  # every process stops at the same step
        if not procs.main:
            if over:
                stopped = "time budget"
                break
            continue
        ckpt.history.append({"step": step, **record, "time_s": time.time() - start})
        bar.update()
        bar.set_postfix({postfix: f"{smooth([h[postfix] for h in ckpt.history if postfix in h])[-1]:.3f}"})
        if after_step is not None:
            after_step(step, ckpt.history)
        if step % checkpoint_every == 0 or step == steps or over:
            ckpt.save(step, params, optimizer)
            if on_checkpoint is not None:
                on_checkpoint(step)
        if over:
            stopped = "time budget"
            break
    bar.close()
    if procs.main:
        (Path(out) / "history.json").write_text(json.dumps(ckpt.history))
    return LoopResult(step, stopped, (time.time() - start) / 60, ckpt.history)


def _parallel_step(loss_fn, local: list, optimizer, params: dict, scaler, procs: Processes) -> dict:
    """One data-parallel step: this process's loss over its share ``local`` (possibly empty),
    gradients summed over the processes as the global batch's mean, one clipped step everywhere.
    Returns the step's record, each field the terms-weighted mean over the processes."""
    loss, record, terms = None, {}, 0
    if local:
        loss, record, *rest = loss_fn(local)
        terms = int(rest[0]) if rest else len(local)
    shares = procs.gather((terms, record))
    total = max(sum(t for t, _ in shares), 1)
    optimizer.zero_grad(set_to_none=True)
    if loss is not None:
        scaled = loss * (terms / total)  # this process's part of the global mean
        (scaled if scaler is None else scaler.scale(scaled)).backward()
    tensors = list(params.values())
    # one all-reduce of all gradients (a flat copy): the draft's forward is not its `forward`, so
    # DistributedDataParallel's hooks would not see it; the sum is what DDP computes. The last
    # len(tensors) entries count the processes that gave each tensor a gradient: one no process
    # reached (the projector in a batch without images) keeps no gradient, so the optimizer leaves
    # it alone as it does in one process.
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in tensors]
    reached = torch.tensor([float(p.grad is not None) for p in tensors], device=grads[0].device)
    flat = procs.sum_(torch.cat([*grads, reached]))
    offset = 0
    for p, hit in zip(tensors, flat[-len(tensors) :].tolist()):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype) if hit else None
        offset += n
    optimizer_step(None, optimizer, tensors, scaler=scaler)
    keys = {k for _, r in shares for k in r}
    return {k: sum(t * r[k] for t, r in shares if k in r) / max(sum(t for t, r in shares if k in r), 1) for k in sorted(keys)}


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
