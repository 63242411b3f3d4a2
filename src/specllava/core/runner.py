"""One explicit model call per role.

`ModelRunner` owns a Hugging Face model (unmodified) and its KV cache, and offers:
  - `prefill_like_generate(...)`: the target's prefill, run through `generate()` itself so the
    first token's logits come from exactly the code path plain decoding uses (a different path
    can flip near-tie argmaxes);
  - `prefill(...)`: a plain forward over the prompt (the draft's prefill);
  - `forward(tokens, positions, bias)`: tokens on top of the cache with explicit position ids and
    a 4D additive attention mask, returning logits. Verification and drafting both use it.
The cache itself changes only through `cache.crop` and `cache.compact`.
"""

from __future__ import annotations

import inspect

import torch

from .cache import cache_length


def is_vlm(model) -> bool:
    return getattr(model.config, "vision_config", None) is not None


def image_token_id(model) -> int | None:
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        val = getattr(cfg, name, None)
        if val is not None:
            return int(val)
    return None


def vocab_size(model) -> int:
    """Size of the output distribution (rows of the LM head), the vocabulary that matters here."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x names the cache argument `cache`; earlier 5.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class ModelRunner:
    """vocab_ids: optional [K] token ids (a draft's reduced vocabulary). With it, `forward` runs
    the model body (`model.model`) and projects on those K rows of the LM head only, returning
    logits over the subset: column j is token vocab_ids[j]. On a CPU the full head is most of a
    small draft's cost; the subset never changes what the target emits, only what is proposed."""

    def __init__(self, model, vocab_ids: torch.Tensor | None = None):
        self.model = model
        self.cache = None
        self._cache_kw = _cache_kwarg(model)
        self.forwards = 0  # model forward passes since the last prefill, prefill included
        self.vocab_ids = None
        if vocab_ids is not None:
            self._check_plain_head(model)
            self.vocab_ids = vocab_ids.to(model.device)
            # contiguous copy of the rows, made once per request rather than gathered every forward
            self._head = model.get_output_embeddings().weight.index_select(0, self.vocab_ids).detach()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def length(self) -> int:
        return cache_length(self.cache)

    def prefill_like_generate(self, input_ids, pixel_values=None, attention_mask=None) -> torch.Tensor:
        """Prefill through generate(max_new_tokens=1); returns the raw last-position logits [V]."""
        kwargs = {} if pixel_values is None else {"pixel_values": pixel_values}
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
            return_dict_in_generate=True,
            **kwargs,
        )
        self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        self.forwards = 1
        return out.logits[0][0]

    def prefill(self, input_ids, pixel_values=None) -> torch.Tensor:
        """Plain forward over the prompt; returns the last-position logits [V]."""
        from .cache import new_cache

        self.cache = new_cache(self.model)
        kwargs = {} if pixel_values is None else {"pixel_values": pixel_values}
        out = self.model(
            input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: self.cache}, **kwargs
        )
        self.forwards = 1
        return out.logits[0, -1]

    @staticmethod
    def _check_plain_head(model) -> None:
        text = model.config.get_text_config()
        if getattr(text, "final_logit_softcapping", None) or getattr(model, "model", None) is None:
            raise ValueError(
                f"a reduced draft vocabulary needs logits = lm_head(model.model(...)); {type(model).__name__} "
                "does not have that form (drop draft_vocab)"
            )

    def forward(
        self,
        tokens: torch.Tensor,  # [n] long
        positions: torch.Tensor,  # [n] long
        bias: torch.Tensor | None,  # [1, 1, n, cache_len + n] additive mask; None = causal
        logits_to_keep: int = 0,  # 0 = logits at every position
    ) -> torch.Tensor:
        if self.vocab_ids is not None:
            return self._forward_subset(tokens, positions, bias, logits_to_keep)
        out = self.model(
            input_ids=tokens[None],
            position_ids=positions[None],
            attention_mask=bias,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self._cache_kw: self.cache},
        )
        self.forwards += 1
        return out.logits[0]  # [n or logits_to_keep, V]

    def _forward_subset(self, tokens, positions, bias, logits_to_keep) -> torch.Tensor:
        out = self.model.model(
            input_ids=tokens[None],
            position_ids=positions[None],
            attention_mask=bias,
            use_cache=True,
            **{self._cache_kw: self.cache},
        )
        self.forwards += 1
        hidden = out.last_hidden_state[0]  # [n, hidden]
        if logits_to_keep:
            hidden = hidden[-logits_to_keep:]
        return torch.nn.functional.linear(hidden, self._head)  # [n, K]
