"""Backends on transformers' own modules: the whole model's forward (any model; the reference the
lean paths are checked against), or its text decoder then a draft's own head."""

from __future__ import annotations

import torch

from ..cache import new_cache
from ..model_info import cache_kwarg, input_device, sliding_window
from .base import Step, no_features


class _OnModel:
    """What the backends over transformers' modules read off their model when used (it may have
    moved or been cast since), and the prefill's cache kept as is."""

    model: torch.nn.Module

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return input_device(self.model)

    def start(self, cache=None):
        return new_cache(self.model) if cache is None else cache


class TransformersBackend(_OnModel):
    """`model(input_ids, position_ids, attention_mask=bias, cache)`, as generate() calls it; the
    4D additive mask is taken as is (sdpa and eager attention)."""

    kind = "transformers"
    vocab_ids = None
    quant = None

    def __init__(self, model):
        self.model = model
        self.window = sliding_window(model)
        self._cache_kw = cache_kwarg(model)

    def forward(self, tokens, positions, bias, cache, *, features=None, logits_to_keep=0, hidden=False) -> Step:
        no_features(self, features)
        batched = tokens.dim() == 2  # [B, n]: one row of a B-row cache per sequence
        ids, pos = (tokens, positions) if batched else (tokens[None], positions[None])
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=bias, use_cache=True,
                         logits_to_keep=logits_to_keep, output_hidden_states=hidden, **{self._cache_kw: cache})
        if batched:
            return Step(out.logits, out.hidden_states[-1] if hidden else None)
        return Step(out.logits[0], out.hidden_states[-1][0] if hidden else None)


class DecoderBackend(_OnModel):
    """A draft's text decoder through transformers (its own, or an int8 copy: `core.quant`), then a
    head over the draft vocabulary's rows: for a draft the lean path does not cover (or with
    draft_lean=False). Decode steps skip the VLM wrapper: after the prefill every token is text."""

    kind = "decoder"

    def __init__(self, model, head, vocab_ids: torch.Tensor | None, quant: str | None):
        if quant == "int8":
            from ..quant import int8_decoder

            self.body = int8_decoder(model)
        else:
            self.body = model.get_decoder()
        self.model, self.head, self.vocab_ids, self.quant = model, head, vocab_ids, quant
        self.window = sliding_window(model)
        self._cache_kw = cache_kwarg(self.body)

    def forward(self, tokens, positions, bias, cache, *, features=None, logits_to_keep=0, hidden=False) -> Step:
        no_features(self, features)
        batched = tokens.dim() == 2  # [B, n]: one row of a B-row cache per sequence
        ids, pos = (tokens, positions) if batched else (tokens[None], positions[None])
        out = self.body(input_ids=ids, position_ids=pos, attention_mask=bias, use_cache=True,
                        **{self._cache_kw: cache})
        h = out.last_hidden_state if batched else out.last_hidden_state[0]  # [B, n, hidden] or [n, hidden]
        return Step(self.head(h[..., -logits_to_keep:, :] if logits_to_keep else h), h if hidden else None)
