"""One model's cache and calls: `ModelRunner`.

  - `prefill_like_generate(...)`: the target's prefill, run through `generate()` itself so the
    first token's logits come from exactly the code path plain decoding uses (a different path
    can flip near-tie argmaxes);
  - `prefill(...)`: a plain forward over the prompt (the draft's prefill);
  - `start()`: no prefill, an empty cache (an EAGLE head);
  - `forward(tokens, positions, bias)`: tokens on top of the cache with explicit position ids and
    a 4D additive attention mask, returning logits, through the runner's backend
    (`core.backends`). Verification and drafting both use it.
The cache itself changes only through `cache.crop` and `cache.compact`.
"""

from __future__ import annotations

import torch

from .backends import Backend, TransformersBackend
from .cache import cache_length, new_cache
from .model_info import cache_kwarg


class ModelRunner:
    """model: the Hugging Face model (the prefill always runs it). backend: how its decode steps
    run (default: its own forward, `TransformersBackend`); a reduced-vocabulary backend returns
    logits over the subset (column j is token vocab_ids[j]). keep_hidden: keep the final (normed)
    hidden states of the last prefill or forward in `hidden`, [n, hidden_size] (the features an
    EAGLE head reads, `core.eagle`; for an EAGLE head's runner, its predicted features)."""

    def __init__(self, model, backend: Backend | None = None, keep_hidden: bool = False):
        self.model = model
        self.backend = backend if backend is not None else TransformersBackend(model)
        self.keep_hidden = keep_hidden
        self.hidden: torch.Tensor | None = None
        self.cache = None
        self.forwards = 0  # forward passes since the prefill (or start), the prefill included
        self.vocab_ids = self.backend.vocab_ids
        self.window = self.backend.window  # tree masks honour it (`tree.attention_bias`)
        self.device = self.backend.device  # where its inputs go; its logits may come out elsewhere (sharded)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype decode steps compute in (masks are built in it): the backend's."""
        return self.backend.dtype

    @property
    def length(self) -> int:
        return cache_length(self.cache)

    def prefill_like_generate(self, input_ids, pixel_values=None, attention_mask=None, **model_inputs) -> torch.Tensor:
        """Prefill through generate(max_new_tokens=1); returns the raw last-position logits [V].

        model_inputs: the processor's other tensors (LLaVA-NeXT's image_sizes, ...), passed on as
        generate() takes them."""
        kwargs = dict(model_inputs)
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values
        if self.window is not None:  # full layers, the window in the mask (`cache.new_cache`)
            kwargs[cache_kwarg(self.model)] = new_cache(self.model)
        eos = self.model.generation_config.eos_token_id
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = eos[0] if isinstance(eos, list) else eos
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=1,
            do_sample=False,
            temperature=None,
            top_k=None,
            top_p=None,
            pad_token_id=pad,
            output_logits=True,
            output_hidden_states=self.keep_hidden,
            return_dict_in_generate=True,
            **kwargs,
        )
        if self.keep_hidden:  # the prefill step's last layer: the final norm's output
            self.hidden = out.hidden_states[0][-1][0]
        self._adopt(out.cache if getattr(out, "cache", None) is not None else out.past_key_values)
        return out.logits[0][0]

    def prefill(self, input_ids, pixel_values=None, mm_encoder_outputs=None, **model_inputs) -> torch.Tensor:
        """Plain forward over the prompt; returns the last-position logits [V].

        mm_encoder_outputs: precomputed image features instead of pixel_values (`core.vision`).
        model_inputs: other processor tensors for the model (image_sizes, ...)."""
        self.cache = new_cache(self.model)
        kwargs = dict(model_inputs)
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values
        if mm_encoder_outputs is not None:
            kwargs["mm_encoder_outputs"] = mm_encoder_outputs
        out = self.model(
            input_ids=input_ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(self.model): self.cache}, **kwargs
        )
        self._adopt(self.cache)
        return out.logits[0, -1]

    def start(self) -> None:
        """No prefill: the backend's empty cache (an EAGLE head, fed the prompt at its first step)."""
        self.cache = self.backend.start(None)
        self.forwards = 0

    def _adopt(self, cache) -> None:
        """Take a prefill's DynamicCache: as is, or copied into the backend's own buffer."""
        self.cache = self.backend.start(cache)
        self.forwards = 1

    def forward(
        self,
        tokens: torch.Tensor,  # [n] long
        positions: torch.Tensor,  # [n] long
        bias: torch.Tensor | None,  # [1, 1, n, cache_len + n] additive mask; None = causal
        logits_to_keep: int = 0,  # 0 = logits at every position
        features: torch.Tensor | None = None,  # [n, hidden]: an EAGLE head's input features
    ) -> torch.Tensor:
        step = self.backend.forward(tokens, positions, bias, self.cache, features=features,
                                    logits_to_keep=logits_to_keep, hidden=self.keep_hidden)
        self.forwards += 1
        if self.keep_hidden:
            self.hidden = step.hidden
        return step.logits  # [n or logits_to_keep, V or K]
