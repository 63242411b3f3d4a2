"""The backend interface: how one model runs a decode step on top of its cache."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch


class Step(NamedTuple):
    logits: torch.Tensor  # [n or logits_to_keep, V or K]: column j is token vocab_ids[j] when reduced
    hidden: torch.Tensor | None  # [n, hidden]: final (normed) hidden states, when asked; else None


@runtime_checkable
class Backend(Protocol):
    """Runs a model on `tokens` at `positions` under an attention `bias`, on top of its cache.

    kind: a name for reports ("transformers", "decoder", "lean", "exact", "eagle-head").
    dtype: the dtype the caller builds `bias` in. device: where its inputs go.
    vocab_ids: None when logits cover the whole vocabulary; else logits column j is token
        vocab_ids[j] (a draft's reduced vocabulary).
    window: the attention window (positions) the caller's tree masks must honour, or None.
    """

    kind: str
    dtype: torch.dtype
    device: torch.device
    vocab_ids: torch.Tensor | None
    window: int | None

    def start(self, cache: Any = None) -> Any:
        """The cache decode steps run on: the prefill's DynamicCache taken over (kept, or copied
        into the backend's own buffer), or, for a model without a prefill (an EAGLE head), None:
        a new empty one."""

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor | None, cache: Any, *,
                features: torch.Tensor | None = None, logits_to_keep: int = 0, hidden: bool = False) -> Step:
        """tokens, positions: [n] long, on `device`. bias: [1, 1, n, cache_len + n] additive mask
        in `dtype` (None: causal). Batched (not the EAGLE head's): tokens, positions [B, n] on a
        cache of B rows, bias [B, 1, n, cache_len + n]; logits (and hidden) then [B, n, ...]. Appends the n positions to `cache`. features: [n, hidden], the
        input features of a backend that reads them (the EAGLE head's), else None.
        logits_to_keep: logits of the last k positions only (0: all). hidden: also return the
        final hidden states."""


def no_features(backend, features) -> None:
    if features is not None:
        raise TypeError(f"the {backend.kind} backend takes no input features")
