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
import threading
import warnings
import weakref
from contextlib import contextmanager

import torch
import transformers

from .cache import cache_length, compact
from .lean import LeanDecoder


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


def sliding_window(model) -> int | None:
    """The language model's attention window (Mistral's `sliding_window`) when every layer uses
    it, None for full attention. Models that mix windowed and full layers are refused by
    `unsupported_attention`."""
    cfg = model.config.get_text_config(decoder=True)
    kinds = set(getattr(cfg, "layer_types", None) or [])
    if kinds:
        return int(cfg.sliding_window) if kinds == {"sliding_attention"} else None
    window = getattr(cfg, "sliding_window", None)
    return None if window is None else int(window)


def unsupported_attention(model) -> str | None:
    """Why a tree forward through `model` would not be exact, or None: flash-attention kernels
    take no arbitrary 4D mask, and per-layer attention kinds would need one mask per kind."""
    cfg = model.config.get_text_config(decoder=True)
    impl = getattr(cfg, "_attn_implementation", None) or ""
    if "flash" in impl:
        return (f"attn_implementation {impl!r} does not honour the 4D tree attention mask; load the model with "
                "attn_implementation='sdpa' (or 'eager')")
    kinds = set(getattr(cfg, "layer_types", None) or [])
    if len(kinds) > 1:
        return f"layers of several attention kinds ({', '.join(sorted(kinds))}) are not supported"
    if kinds - {"full_attention", "sliding_attention"}:
        return f"attention kind {', '.join(sorted(kinds))} is not supported"
    return None


def is_dispatched(model) -> bool:
    """True for a model that accelerate spread over several devices or offloaded (`hf_device_map`
    with more than one entry, or weights left on the meta device until a hook loads them)."""
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    if len(devices) > 1 or "disk" in devices:
        return True
    return any(p.device.type == "meta" for p in model.parameters())


def input_device(model) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings (for an offloaded one, the
    device accelerate runs it on), which for a model on one device is `model.device`."""
    emb = model.get_input_embeddings()
    hook = getattr(emb, "_hf_hook", None)
    run_on = getattr(hook, "execution_device", None)
    if run_on is not None:
        return torch.device(f"cuda:{run_on}" if isinstance(run_on, int) else run_on)
    device = emb.weight.device
    return torch.device("cpu") if device.type == "meta" else device


def _fingerprint(model) -> tuple:
    """Changes when the model's weights are replaced, moved, cast or modified in place (weights made
    under torch.inference_mode keep no version counter: for those, in-place edits go unseen)."""
    impl = getattr(model.config.get_text_config(), "_attn_implementation", None)
    return (impl, *((p.data_ptr(), None if p.is_inference() else p._version, p.dtype) for p in model.parameters()))


class ModelCheckCache:
    """Results of construction-time checks (and what they build), cached per model (weakly: they
    go with the model) and recomputed when the model's weights change (`_fingerprint`): building a
    decoder per request then repeats no check. A fingerprint is taken once per model per
    `stamp_window()` (one decoder construction), since it walks every parameter."""

    def __init__(self):
        self._results = weakref.WeakKeyDictionary()
        self._local = threading.local()

    @contextmanager
    def stamp_window(self):
        """Within it, each model's fingerprint is taken once (its weights do not change meanwhile)."""
        self._local.stamps = {}
        try:
            yield
        finally:
            self._local.stamps = None

    def _stamp(self, model) -> tuple:
        stamps = getattr(self._local, "stamps", None)
        if stamps is None:
            return _fingerprint(model)
        if id(model) not in stamps:
            stamps[id(model)] = _fingerprint(model)
        return stamps[id(model)]

    def get(self, model, key, compute, *others):
        per_model = self._results.setdefault(model, {})
        stamp = (self._stamp(model), *(id(o) for o in others), *(self._stamp(o) for o in others))
        hit = per_model.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = compute()
        per_model[key] = (stamp, value)
        return value

    def forget(self, model) -> None:
        """Drop `model`'s cached results (a change the fingerprint cannot see, e.g. patched code)."""
        self._results.pop(model, None)


CHECKS = ModelCheckCache()


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x names the cache argument `cache`; earlier 5.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class DraftPath:
    """How a draft's decode steps run: its text decoder, then an output head.

    Only for a draft (its numerics never change what the target emits). Built once per decoder
    and shared by its requests: `vocab_ids` restricts the head to K rows (a reduced draft
    vocabulary: on a CPU the full head is most of a small draft's cost); `quant="int8"` runs the
    decoder and the head with int8 linears (`specllava.core.quant`). Decode steps skip the VLM
    wrapper (after the prefill every token is text): a Llama-style draft runs `core.lean`'s lean
    decoder on a `KVBuffer` (`lean=True`, the default), any other the model's own text decoder
    (an int8 copy of it with `quant="int8"`).
    """

    def __init__(self, model, vocab_ids: torch.Tensor | None = None, quant: str | None = None, lean: bool = True):
        _check_plain_head(model)
        weight = model.get_output_embeddings().weight
        self.vocab_ids = None if vocab_ids is None else vocab_ids.to(weight.device)
        # contiguous copy of the rows, made once rather than gathered every forward
        rows = weight if self.vocab_ids is None else weight.index_select(0, self.vocab_ids)
        rows = rows.detach()
        if quant not in (None, "int8"):
            raise ValueError(f"unknown quant {quant!r}")
        # one lean decoder per draft and quant, whatever the head's vocabulary (`CHECKS` caches it)
        self.lean = CHECKS.get(model, ("lean", quant), lambda: LeanDecoder.build(model, quant)) if lean else None
        if quant == "int8":
            from .quant import Int8Linear, int8_decoder

            self.body = None if self.lean is not None else int8_decoder(model)
            self.head = Int8Linear(rows)
        else:
            self.body = None if self.lean is not None else model.get_decoder()
            self.head = lambda hidden: torch.nn.functional.linear(hidden, rows)
        self.quant = quant
        self.cache_kw = None if self.body is None else _cache_kwarg(self.body)


class TargetPath:
    """How the target's decode steps run on `core.lean`'s exact path: transformers' own operations
    (bitwise the same logits, tested) without the per-forward overhead of its module stack, on a
    `KVBuffer` rather than a cache concatenated per layer and step. `build` returns None for a
    target the exact path does not cover (it then keeps its own forward)."""

    vocab_ids = None

    def __init__(self, model):
        self.lean = LeanDecoder(model, exact=True)
        self.head = model.get_output_embeddings()  # the model's own lm_head module
        self.body = None

    @classmethod
    def build(cls, model) -> TargetPath | None:
        """The exact path for `model`, or None when it does not cover it or when its logits differ
        from transformers' on this model (a transformers version whose Llama forward changed):
        `matches_transformers` runs once per model (cached until its weights change), and a
        mismatch warns and keeps transformers' forward."""
        return CHECKS.get(model, "target_path", lambda: None if cls.unsupported(model) else cls._checked(model))

    @classmethod
    def _checked(cls, model) -> TargetPath | None:
        path = cls(model)
        if not path.matches_transformers(model):
            warnings.warn(f"specllava: the exact lean path's logits differ from transformers' forward for "
                          f"{type(model).__name__} (transformers {transformers.__version__}); the target keeps "
                          "transformers' own forward", stacklevel=2)
            return None
        return path

    @torch.inference_mode()
    def matches_transformers(self, model) -> bool:
        """Feed the same short text (a chain, then a 3-node tree under its mask, then one token)
        through transformers' forward and this path; True when every logit is bitwise equal."""
        from .tree import attention_bias

        device = input_device(model)
        avoid = image_token_id(model)
        text_ids = [i for i in range(min(model.get_input_embeddings().num_embeddings, 64)) if i != avoid]
        ids = [text_ids[(3 + k) % len(text_ids)] for k in range(8)]
        prompt = torch.tensor([ids[:4]], device=device)
        tree = torch.tensor(ids[4:7], device=device)
        tree_mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool, device=device)
        outs = []
        for path in (None, self):
            runner = ModelRunner(model, path)
            runner.prefill(prompt)
            logits = runner.forward(tree, torch.tensor([4, 5, 5], device=device), attention_bias(tree_mask, 4, runner.dtype))
            compact(runner.cache, 4, torch.tensor([0, 2], device=device))
            step = runner.forward(torch.tensor(ids[7:8], device=device), torch.tensor([6], device=device), None)
            outs.append(torch.cat([logits, step]))
        return bool(torch.equal(outs[0], outs[1]))

    @staticmethod
    def unsupported(model) -> str | None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        text = model.config.get_text_config()
        if head is None or getattr(text, "final_logit_softcapping", None) or getattr(text, "logit_scale", None):
            return "logits are not lm_head(hidden)"
        if is_dispatched(model):  # its weights move in and out through accelerate's hooks
            return "dispatched by accelerate (hf_device_map / offload)"
        return LeanDecoder.unsupported(model, exact=True)


def _check_plain_head(model) -> None:
    text = model.config.get_text_config()
    head = model.get_output_embeddings()
    if (getattr(text, "final_logit_softcapping", None) or head is None
            or getattr(head, "bias", None) is not None or not hasattr(model, "get_decoder")):
        raise ValueError(
            f"a reduced or quantized draft needs logits = lm_head(decoder(...)) without bias or "
            f"softcapping; {type(model).__name__} does not have that form (drop draft_vocab and "
            "use draft_quant='none')"
        )


class ModelRunner:
    """path: optional `DraftPath` (a draft) or `TargetPath` (a target). With it, `forward` runs
    the path's decoder and head (a reduced vocabulary returns logits over the subset: column j is
    token vocab_ids[j]). The prefill always runs the model itself. keep_hidden: keep the final
    (normed) hidden states of the last prefill or forward in `hidden`, [n, hidden_size] (the
    features an EAGLE head reads, `core.eagle`)."""

    def __init__(self, model, path: DraftPath | TargetPath | None = None, keep_hidden: bool = False):
        self.model = model
        self.keep_hidden = keep_hidden
        self.hidden: torch.Tensor | None = None
        self.cache = None
        self._cache_kw = _cache_kwarg(model)
        self.forwards = 0  # model forward passes since the last prefill, prefill included
        self.path = path
        self.vocab_ids = None if path is None else path.vocab_ids
        self.window = sliding_window(model)  # tree masks honour it (`tree.attention_bias`)
        self._device = input_device(model)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype decode steps compute in (masks are built in it): a lean path's own, else the model's."""
        if self.path is not None and self.path.lean is not None:
            return self.path.lean.dtype
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        """Where its inputs go (`input_device`); its logits may come out elsewhere (sharded)."""
        return self._device

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
            from .cache import new_cache

            kwargs[self._cache_kw] = new_cache(self.model)
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
        from .cache import new_cache

        self.cache = new_cache(self.model)
        kwargs = dict(model_inputs)
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values
        if mm_encoder_outputs is not None:
            kwargs["mm_encoder_outputs"] = mm_encoder_outputs
        out = self.model(
            input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: self.cache}, **kwargs
        )
        self._adopt(self.cache)
        return out.logits[0, -1]

    def _adopt(self, cache) -> None:
        """Take a prefill's DynamicCache: as is, or as a lean path's KVBuffer for its decode steps."""
        lean = None if self.path is None else self.path.lean
        self.cache = cache if lean is None else lean.new_cache(cache)
        self.forwards = 1

    def forward(
        self,
        tokens: torch.Tensor,  # [n] long
        positions: torch.Tensor,  # [n] long
        bias: torch.Tensor | None,  # [1, 1, n, cache_len + n] additive mask; None = causal
        logits_to_keep: int = 0,  # 0 = logits at every position
    ) -> torch.Tensor:
        if self.path is not None:
            return self._forward_path(tokens, positions, bias, logits_to_keep)
        out = self.model(
            input_ids=tokens[None],
            position_ids=positions[None],
            attention_mask=bias,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            output_hidden_states=self.keep_hidden,
            **{self._cache_kw: self.cache},
        )
        self.forwards += 1
        if self.keep_hidden:
            self.hidden = out.hidden_states[-1][0]
        return out.logits[0]  # [n or logits_to_keep, V]

    def _forward_path(self, tokens, positions, bias, logits_to_keep) -> torch.Tensor:
        self.forwards += 1
        if self.path.lean is not None:
            hidden = self.path.lean(tokens, positions, bias, self.cache)  # [n, hidden]
            if self.keep_hidden:
                self.hidden = hidden
            if logits_to_keep:
                hidden = hidden[-logits_to_keep:]
            return self.path.head(hidden)  # [n, K]
        out = self.path.body(
            input_ids=tokens[None],
            position_ids=positions[None],
            attention_mask=bias,
            use_cache=True,
            **{self.path.cache_kw: self.cache},
        )
        hidden = out.last_hidden_state[0]  # [n, hidden]
        if logits_to_keep:
            hidden = hidden[-logits_to_keep:]
        return self.path.head(hidden)  # [n, K]
