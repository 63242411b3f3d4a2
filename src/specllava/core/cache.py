"""KV-cache bookkeeping. The cache changes through exactly two operations: `crop` to a length,
and `compact` to the accepted path. Nothing else in specllava mutates a cache.

Supports transformers' `DynamicCache` (full-attention `DynamicLayer`s: keys/values tensors of
shape [batch, heads, seq, head_dim]); anything else is refused with a clear error rather than
silently corrupted, since a cache that is not trimmed corrupts every later step.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


def new_cache(model) -> DynamicCache:
    config = model.config.get_text_config(decoder=True) if hasattr(model, "config") else None
    return DynamicCache(config=config)


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"unsupported cache type {type(cache).__name__}: expected a DynamicCache")
    for layer in layers:
        if type(layer) is not DynamicLayer:
            kind = "sliding-window" if isinstance(layer, DynamicSlidingWindowLayer) else type(layer).__name__
            raise TypeError(
                f"unsupported cache layer {kind}: specllava compacts full-attention DynamicLayer caches only"
            )
    return layers


def cache_length(cache) -> int:
    return int(cache.get_seq_length())


def crop(cache, length: int) -> None:
    """Drop every cached position >= length, in every layer (keys and values)."""
    for layer in _layers(cache):
        if layer.is_initialized and layer.keys.numel():
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def compact(cache, start: int, keep: torch.Tensor) -> None:
    """Keep cached positions start + keep[j] at start + j, then crop to start + len(keep).

    keep: [M] ascending offsets (relative to `start`) of the positions to keep, e.g. the tree
    nodes on the accepted path. Positions < start are untouched.

    Example: start=10, tree occupied 10..14, accepted nodes [0, 2, 3] -> positions 10, 12, 13
    move to 10, 11, 12 and the cache length becomes 13.
    """
    m = int(keep.numel())
    for layer in _layers(cache):
        if not (layer.is_initialized and layer.keys.numel()):
            continue
        src = keep.to(layer.keys.device) + start
        # index_select copies first, so the in-place write cannot read what it overwrote.
        layer.keys[..., start : start + m, :] = layer.keys.index_select(-2, src)
        layer.values[..., start : start + m, :] = layer.values.index_select(-2, src)
        layer.keys = layer.keys[..., : start + m, :]
        layer.values = layer.values[..., : start + m, :]
