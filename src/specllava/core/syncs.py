"""Counting host syncs without a GPU: `HostSyncCounter`.

A *host sync* is a call that makes Python wait for the device: a read of a tensor's values on the
host (`.item()`, `.tolist()`, `bool(t)`, `int(t)`, `.cpu()`, ...), an operation whose output size
depends on the values (`nonzero`, a boolean-mask index, `unique`, ...), and an upload of host data
(`torch.tensor(a_list, device=...)`: on a GPU, a copy from pageable memory that waits for the
stream). On a GPU every one of them stalls the pipeline, so the decoding loop makes as few as the
algorithm needs and names each one in a comment ("host sync: ...").

`torch.cuda.set_sync_debug_mode` counts them on a GPU (tools/gpu_check.py). This counter sees the
same calls on any device, the CPU included, through a `TorchFunctionMode`: every torch call of the
kinds above made while it is active is recorded with the place in specllava (or transformers) that
made it, so a CPU test can bound the syncs of a decoding step (tests/core/test_host_syncs.py).
What a one-device run cannot see: `.to(device)` between two devices (on the CPU every tensor is
already where it goes), which the decoder does only for a target and a draft on different devices.

    with HostSyncCounter() as syncs:
        decoder.generate(..., on_step=syncs.mark)
    syncs.per_step()   # host syncs between consecutive verification steps
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

_T = torch.Tensor
# calls that read values back to the host (or whose output size depends on them)
_READS = {
    _T.item: "item", _T.tolist: "tolist", _T.__bool__: "bool", _T.__int__: "int", _T.__float__: "float",
    _T.__index__: "index", _T.numpy: "numpy", _T.cpu: "cpu", _T.nonzero: "nonzero", torch.nonzero: "nonzero",
    torch.argwhere: "nonzero", _T.masked_select: "masked_select", torch.masked_select: "masked_select",
    _T.unique: "unique", torch.unique: "unique", torch.unique_consecutive: "unique", torch.equal: "equal",
    _T.equal: "equal", torch.is_nonzero: "bool", torch.allclose: "allclose", _T.allclose: "allclose",
}
_UPLOADS = {torch.tensor: "upload", torch.as_tensor: "upload", _T.new_tensor: "upload"}
_INDEXING = {_T.__getitem__, _T.__setitem__, _T.index_put_, _T.index_put}
_REPEATS = {torch.repeat_interleave: "repeat_interleave", _T.repeat_interleave: "repeat_interleave"}
_HERE = os.path.abspath(__file__)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def _index_kind(index) -> str | None:
    """A boolean mask in an index reads the mask (its output size); a Python list of ints is
    uploaded as an index tensor."""
    items = index if isinstance(index, tuple) else (index,)
    if any(torch.is_tensor(i) and i.dtype == torch.bool and i.dim() > 0 for i in items):
        return "bool index"
    if any(isinstance(i, list) for i in items):
        return "list index (upload)"
    return None


def _kind(func, args, kwargs) -> str | None:
    """The kind of host sync `func(*args, **kwargs)` is, or None for a call that is not one."""
    if func in _READS:
        return _READS[func]
    if func in _UPLOADS:
        data = args[0] if args else kwargs.get("data")
        return None if torch.is_tensor(data) else _UPLOADS[func]  # a tensor is already on a device
    if func in _INDEXING:
        return _index_kind(args[1]) if len(args) > 1 else None
    if func in _REPEATS:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return _REPEATS[func] if torch.is_tensor(repeats) and kwargs.get("output_size") is None else None
    return None


def _caller() -> str:
    """file:line of the first frame outside torch and this module (where the sync was asked for)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _HERE and not path.startswith(_TORCH):
            parts = path.split(os.sep)
            short = os.sep.join(parts[parts.index("specllava"):]) if "specllava" in parts else os.sep.join(parts[-2:])
            return f"{short}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class HostSyncCounter(TorchFunctionMode):
    """Records every host sync (see the module docstring) made while active, with its kind and
    place: `events` is a list of (kind, "file:line"). `mark()` (an `on_step` callback) notes a
    step boundary; `per_step()` gives the syncs between consecutive marks. `pause()` stops
    counting (e.g. while a test inspects the tree inside its callback)."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self.marks: list[int] = []
        self.paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            kind = _kind(func, args, kwargs)
            if kind is not None:
                self.events.append((kind, _caller()))
        return func(*args, **kwargs)

    def mark(self, *_ignored) -> None:
        self.marks.append(len(self.events))

    def per_step(self) -> list[int]:
        """Host syncs between consecutive marks: one count per decoding step after the first
        (the first mark follows the prefill, which is not a step's work)."""
        return [b - a for a, b in zip(self.marks, self.marks[1:])]

    def step_events(self, step: int) -> Counter:
        """Where the syncs of step `step` (an index into `per_step()`) were made: {(kind, place): n}."""
        return Counter(self.events[self.marks[step]:self.marks[step + 1]])

    def pause(self):
        counter = self

        class _Paused:
            def __enter__(self):
                counter.paused += 1

            def __exit__(self, *exc):
                counter.paused -= 1

        return _Paused()


def count_generation(decoder, ids, new_tokens: int, **gen):
    """One `decoder.generate` under a `HostSyncCounter`, each step marked. Returns (the counter,
    the tree depth of every step after the first, the output): a step's depth is the levels its
    draft grew (that kept a node), or its verified tree's depth when deeper, since the node budget
    may drop the deepest level after the syncs that grew it."""
    from .drafting import Drafter

    depths, levels, syncs = [], [0], HostSyncCounter()

    def on_step(tree, verdict):
        syncs.mark()
        with syncs.pause():
            depths.append(max(int(tree.depth.max()), levels[-1]))
            levels.append(0)

    grow = Drafter.grow

    def counting_grow(self, logits):
        before = 1 if self.tokens is None else self.tokens.numel()  # the root is no level
        out = grow(self, logits)
        levels[-1] += self.tokens.numel() > before
        return out

    Drafter.grow = counting_grow
    try:
        with syncs:
            out = decoder.generate(ids, max_new_tokens=new_tokens, on_step=on_step, **gen)
    finally:
        Drafter.grow = grow
    return syncs, depths[1:], out
