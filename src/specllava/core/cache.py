"""KV-cache bookkeeping. The cache changes through exactly two operations: `crop` to a length,
and `compact` to the accepted path (plus a forward's append). Nothing else in specllava mutates a
cache.

Supports transformers' `DynamicCache` (full-attention `DynamicLayer`s: keys/values tensors of
shape [batch, heads, seq, head_dim]); anything else is refused with a clear error rather than
silently corrupted, since a cache that is not trimmed corrupts every later step. `KVBuffer` is the
cache of the lean paths (`core.backends.lean`, the draft's and the target's): preallocated per layer,
appended in place.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


def new_cache(model) -> DynamicCache:
    """An empty cache of full-attention layers for `model`. A sliding-window model (Mistral) gets
    full layers too: every key is kept and the window is applied by the attention mask (the
    model's own, or `tree.attention_bias(window=...)`), as transformers does for a cache that holds
    more than the window; so compaction stays a gather, and positions stay cache indices."""
    config = model.config.get_text_config(decoder=True) if hasattr(model, "config") else None
    if config is not None and _sliding(config):
        return DynamicCache()  # lazily one DynamicLayer per layer
    return DynamicCache(config=config)


def _sliding(config) -> bool:
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return any(kind != "full_attention" for kind in kinds)
    return getattr(config, "sliding_window", None) is not None


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


class KVBuffer:
    """Keys and values of every layer in preallocated [1, kv_heads, capacity, head_dim] tensors,
    valid up to `length`. A forward writes its n new positions in place (`write`, then `advance`
    once all layers have), instead of concatenating a new tensor per layer and step; the capacity
    doubles when it runs out. For the lean paths (the draft's and the target's) and the EAGLE head."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int):
        self.keys, self.values, self.length = keys, values, int(length)

    @classmethod
    def from_cache(cls, cache, dtype: torch.dtype, room: int = 512) -> KVBuffer:
        """A copy of a DynamicCache (e.g. after a prefill through the model) with `room` free positions."""
        layers = _layers(cache)
        length = cache_length(cache)
        keys, values = [], []
        for layer in layers:
            k, v = layer.keys, layer.values
            shape = (k.shape[0], k.shape[1], length + room, k.shape[3])
            keys.append(torch.empty(shape, dtype=dtype, device=k.device))
            values.append(torch.empty(shape, dtype=dtype, device=v.device))
            keys[-1][:, :, :length] = k
            values[-1][:, :, :length] = v
        return cls(keys, values, length)

    def get_seq_length(self) -> int:
        return self.length

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `layer`'s n new keys/values [1, kv_heads, n, head_dim] after `length`;
        returns that layer's keys and values up to length + n (views)."""
        end = self.length + k.shape[-2]
        if end > self.keys[layer].shape[-2]:
            self._grow(end)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def _grow(self, need: int) -> None:
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                bigger = t.new_empty(t.shape[:2] + (max(2 * t.shape[2], need + 256),) + t.shape[3:])
                bigger[:, :, : self.length] = t[:, :, : self.length]
                store[i] = bigger


def cache_length(cache) -> int:
    return int(cache.get_seq_length())


def crop(cache, length: int) -> None:
    """Drop every cached position >= length, in every layer (keys and values)."""
    if isinstance(cache, KVBuffer):
        cache.length = min(cache.length, int(length))
        return
    for layer in _layers(cache):
        if layer.is_initialized and layer.keys.numel():
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def compact(cache, start: int, keep: list[int] | torch.Tensor, index: torch.Tensor | None = None) -> None:
    """Keep cached positions start + keep[j] at start + j, then crop to start + len(keep).

    keep: [M] ascending offsets (relative to `start`) of the positions to keep, e.g. the tree
    nodes on the accepted path: a list of ints (as the loop reads the path back) or a LongTensor.
    index: optional, the same offsets already on a device (as the verification computed them);
    used on that device instead of uploading `keep` there. Positions < start are untouched.

    Example: start=10, tree occupied 10..14, accepted nodes [0, 2, 3] -> positions 10, 12, 13
    move to 10, 11, 12 and the cache length becomes 13.

    Device traffic: keep = [0, 1, ..., M-1] (a chain's accepted prefix, plain decoding's root)
    moves nothing and is a crop. Otherwise the gather index goes to each device the cache spans
    once (a host-to-device copy waits for the device, a sync, so never once per layer and per
    keys/values: a 32-layer target would pay 64 syncs a step), and not at all to where `index` is.
    """
    m = len(keep) if isinstance(keep, (list, tuple)) else int(keep.numel())
    if _is_prefix(keep, m):
        crop(cache, start + m)
        return
    on_device: dict[torch.device, torch.Tensor] = {}
    if index is not None:
        on_device[index.device] = index + start

    def on(device: torch.device) -> torch.Tensor:
        if device not in on_device:  # host sync: the keep index's upload to `device`, once per device
            src = keep.to(device) if torch.is_tensor(keep) else torch.tensor(keep, dtype=torch.long, device=device)
            on_device[device] = src + start
        return on_device[device]

    if isinstance(cache, KVBuffer):
        for store in (cache.keys, cache.values):
            for t in store:  # layer by layer, on each layer's device
                t[:, :, start : start + m] = t[:, :, : cache.length].index_select(-2, on(t.device))
        cache.length = start + m
        return
    for layer in _layers(cache):
        if not (layer.is_initialized and layer.keys.numel()):
            continue
        src = on(layer.keys.device)
        # index_select copies first, so the in-place write cannot read what it overwrote.
        layer.keys[..., start : start + m, :] = layer.keys.index_select(-2, src)
        layer.values[..., start : start + m, :] = layer.values.index_select(-2, src)
        layer.keys = layer.keys[..., : start + m, :]
        layer.values = layer.values[..., : start + m, :]


def _is_prefix(keep: list[int] | torch.Tensor, m: int) -> bool:
    """keep == [0, 1, ..., m-1], known without a read from a device (a host list, or a CPU tensor)."""
    if torch.is_tensor(keep):
        if keep.device.type != "cpu":
            return False
        keep = keep.tolist()  # a CPU tensor: no device to wait for
    return list(keep) == list(range(m))


# -- caches of several sequences: one row each (`core.batch`) ----------------------------------
# A batched cache holds B rows with a common number of columns; which columns hold a key for
# which row is the caller's bookkeeping (`core.batch.Rows`), so rows of different lengths share
# one buffer. Columns no row uses hold zeros (never NaN: a masked key's value is still multiplied
# by its zero weight).


def row_kv(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's keys and values as [B, heads, columns, head_dim] views of the valid part."""
    if isinstance(cache, KVBuffer):
        return [k[:, :, : cache.length] for k in cache.keys], [v[:, :, : cache.length] for v in cache.values]
    layers = [layer for layer in _layers(cache) if layer.is_initialized]
    return [layer.keys for layer in layers], [layer.values for layer in layers]


def cache_from_kv(like, keys: list[torch.Tensor], values: list[torch.Tensor], room: int = 256):
    """A cache of `like`'s kind (a KVBuffer with `room` free columns, or a DynamicCache) holding
    `keys` and `values` ([B, heads, columns, head_dim] per layer, copied)."""
    if isinstance(like, KVBuffer):
        length = keys[0].shape[2]
        out_k, out_v = [], []
        for k, v in zip(keys, values):
            big_k = k.new_zeros(k.shape[:2] + (length + room,) + k.shape[3:])
            big_v = v.new_zeros(v.shape[:2] + (length + room,) + v.shape[3:])
            big_k[:, :, :length] = k
            big_v[:, :, :length] = v
            out_k.append(big_k)
            out_v.append(big_v)
        return KVBuffer(out_k, out_v, length)
    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k.clone(), v.clone(), i)
    return cache


def compact_rows(cache, start: int, cols: torch.Tensor) -> None:
    """Per row b, keep columns cols[b, j] at start + j, then crop every row to start + M.

    cols: [B, M] absolute column indices (>= start), one row of them per cache row; a row that
    keeps fewer than M pads its row with any valid column (the caller marks those unused).
    Columns < start are untouched.

    Example: start=10, row 0 keeps [10, 12, 13], row 1 keeps [11] padded to [11, 11, 11] ->
    row 0's columns 10, 12, 13 move to 10, 11, 12; row 1's 11 moves to 10 (11, 12 unused).
    """
    b, m = cols.shape
    keys, values = row_kv(cache)
    for store in (keys, values):
        for t in store:  # layer by layer, on each layer's device
            idx = cols.to(t.device)[:, None, :, None].expand(b, t.shape[1], m, t.shape[3])
            t[:, :, start : start + m] = t.gather(2, idx)  # gather copies before the write
    if isinstance(cache, KVBuffer):
        cache.length = start + m
        return
    for layer in _layers(cache):
        if layer.is_initialized:
            layer.keys = layer.keys[..., : start + m, :]
            layer.values = layer.values[..., : start + m, :]
