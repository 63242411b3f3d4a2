"""Lean decode paths: a model's decoder layers as a few tensor ops each, on a `KVBuffer`; and
`LeanBackend`, the backend that runs them with an output head.

Two modes. The draft's (default) takes shortcuts that change its numerics slightly; the target's
(`exact=True`) takes none and computes the very numbers transformers' forward computes.

A small draft's decode step on a CPU is mostly Python around small matrix products (masks,
rotary tables, cache updates, output objects), so a few fused tensor ops per layer cost a
fraction of transformers' decoder (`tools/profile_decode.py` measures both; docs/benchmarks.md).
Only the draft runs here, and what the
target emits never depends on the draft's numerics (the draft only proposes; verification
decides), so the draft may take a shorter road to nearly the same numbers:

- q, k and v in one linear, gate and up in one linear (the weights concatenated once);
- rotary cos/sin read from a table built with the model's own rotary embedding;
- keys and values written in place into a preallocated `KVBuffer` (`core.cache`);
- one `scaled_dot_product_attention` call per layer, GQA included, with the caller's mask.

With int8 weights (`core.quant`) activations stay in float32 (the int8 kernels take and return
float32, so no casts); otherwise they stay in the model's dtype, norms in float32 as transformers
computes them. Supported: Llama-style decoders (model_type llama, mistral or qwen2, full attention,
SiLU MLP, optional q/k/v biases, no q/k norms); `LeanDecoder.unsupported` says why a model is not one,
and any other draft keeps transformers' own forward.

The target's exact path (`exact=True`): what the target emits must not change at all, so it runs
the same operations as transformers' Llama forward in the same order and dtype: the model's own
q/k/v/o and gate/up/down linears (not fused), its own rotary embedding evaluated at the step's
positions, the same RMSNorm, and attention through transformers' own `sdpa_attention_forward`
(same GQA handling, scaling and mask). Only the bookkeeping differs: keys and values go into a
`KVBuffer` instead of being concatenated per layer and step, and no module hooks, mask building or
output objects run. tests/core/test_lean.py checks its logits equal transformers' bit for bit, in
float32 and bfloat16, for one token and for a tree under a mask, and `exact_backend` checks it once
more on the model itself before using it (`matches_transformers`, cached per model). Needs the model loaded with
attn_implementation "sdpa" (transformers' default); otherwise the target keeps its own forward.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..cache import KVBuffer
from ..model_info import image_token_id, input_device, is_dispatched
from .base import Step, no_features
from .llama import FusedLayer, RotaryTable, apply_rotary, causal_mask, rms_norm, step_mask

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2")


class LeanDecoder:
    """hidden = final_norm(decoder(tokens)) for decode steps (the LM head is the caller's).

    exact=False: the draft's path (fused linears, rotary table, optional int8). exact=True: the
    target's path, the same numbers as transformers' forward (see the module docstring)."""

    def __init__(self, model, quant: str | None = None, exact: bool = False):
        why = self.unsupported(model, exact)
        if why:
            raise ValueError(f"no lean {'exact ' if exact else ''}path for {type(model).__name__}: {why}")
        if exact and quant is not None:
            raise ValueError("the exact path runs the model's own weights; quant must be None")
        body = model.get_decoder()
        cfg = model.config.get_text_config()
        self.exact = exact
        self.dtype = torch.float32 if quant == "int8" else model.dtype
        self.embed = body.get_input_embeddings()
        self.rotary = body.rotary_emb
        self.rope = RotaryTable(body.rotary_emb, self.dtype)
        self.eps = float(body.norm.variance_epsilon)
        self.final_norm = body.norm.weight if exact else body.norm.weight.detach().to(self.dtype)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = [self._exact_layer(layer) if exact else FusedLayer.of(layer, cfg, quant, self.dtype, self.eps)
                       for layer in body.layers]

    @staticmethod
    def unsupported(model, exact: bool = False) -> str | None:
        """Why `model` cannot take the lean path (the exact one with exact=True), or None when it can."""
        if not hasattr(model, "get_decoder"):
            return "no get_decoder()"
        cfg = model.config.get_text_config()
        if exact and getattr(cfg, "_attn_implementation", None) != "sdpa":
            return f"attn_implementation {getattr(cfg, '_attn_implementation', None)!r} is not 'sdpa'"
        if getattr(cfg, "model_type", None) not in LEAN_MODEL_TYPES:
            return f"model_type {getattr(cfg, 'model_type', None)!r} is not one of {LEAN_MODEL_TYPES}"
        if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
            return "not a SiLU MLP"
        if (getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)) or any(
                kind != "full_attention" for kind in getattr(cfg, "layer_types", None) or []):
            return "sliding-window attention"
        body = model.get_decoder()
        for layer in getattr(body, "layers", []):
            attn = getattr(layer, "self_attn", None)
            if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
                return "attention without q/k/v/o projections"
            if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
                return "q/k norms"
            head_dim = attn.q_proj.out_features // cfg.num_attention_heads
            if abs(getattr(attn, "scaling", head_dim**-0.5) - head_dim**-0.5) > 1e-12:
                return "attention scaling other than 1/sqrt(head_dim)"
        if not hasattr(body, "rotary_emb") or not hasattr(body, "norm"):
            return "no rotary embedding or final norm"
        return None

    @classmethod
    def build(cls, model, quant: str | None = None, exact: bool = False) -> LeanDecoder | None:
        return None if cls.unsupported(model, exact) else cls(model, quant, exact)

    @staticmethod
    def _exact_layer(layer) -> dict:
        attn, mlp = layer.self_attn, layer.mlp
        mods = dict(attn=attn, q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj,
                    gate=mlp.gate_proj, up=mlp.up_proj, down=mlp.down_proj)
        out = {name: (m.weight, m.bias) if name != "attn" else m for name, m in mods.items()}
        out["norm1"] = layer.input_layernorm.weight
        out["norm2"] = layer.post_attention_layernorm.weight
        return out

    # ------------------------------------------------------------------------------------------
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor | None,
                 cache: KVBuffer) -> torch.Tensor:
        """tokens, positions: [n] (one sequence) or [B, n] (B sequences, one row each of a
        B-row `cache`); bias: [1 or B, 1, n, length + n] additive mask (None: causal).
        Appends the n positions to `cache`; returns the final-normed hidden states [n, hidden]
        ([B, n, hidden])."""
        if self.exact:
            return self._exact(tokens, positions, bias, cache)
        batched = tokens.dim() == 2
        ids = tokens if batched else tokens[None]
        b, n, past = ids.shape[0], ids.shape[1], cache.length
        x = self.embed(ids.reshape(-1)).to(self.dtype)  # [b * n, hidden]
        cos, sin = self.rope(positions, past + n)  # [1 or b, n, head_dim] each
        mask = step_mask(bias, n, past, self.dtype, x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, batch=b)
        cache.advance(n)
        h = rms_norm(x, self.final_norm, self.eps)
        return h.view(b, n, -1) if batched else h

    def _exact(self, tokens, positions, bias, cache: KVBuffer) -> torch.Tensor:
        """transformers' Llama decoder forward, op for op, on a KVBuffer (tokens [n] or [B, n])."""
        batched = tokens.dim() == 2
        ids, pos = (tokens, positions) if batched else (tokens[None], positions[None])
        b, n = ids.shape
        if bias is None and n > 1:  # as transformers' sdpa mask: boolean causal after the cache
            bias = causal_mask(n, cache.length, tokens.device)
        x = self.embed(ids)  # [b, n, hidden]
        cos, sin = self.rotary(x, pos)  # [b, n, head_dim], in x's dtype
        cos, sin = cos[:, None], sin[:, None]
        for i, p in enumerate(self.layers):
            h = rms_norm(x, p["norm1"], self.eps)
            q = F.linear(h, *p["q"]).view(b, n, -1, self.head_dim).transpose(1, 2)
            k = F.linear(h, *p["k"]).view(b, n, -1, self.head_dim).transpose(1, 2)
            v = F.linear(h, *p["v"]).view(b, n, -1, self.head_dim).transpose(1, 2)
            keys, values = cache.write(i, apply_rotary(k, cos, sin), v)
            att, _ = sdpa_attention_forward(p["attn"], apply_rotary(q, cos, sin), keys, values, bias,
                                            dropout=0.0, scaling=p["attn"].scaling)
            x = x + F.linear(att.reshape(b, n, -1).contiguous(), *p["o"])
            h = rms_norm(x, p["norm2"], self.eps)
            x = x + F.linear(F.silu(F.linear(h, *p["gate"])) * F.linear(h, *p["up"]), *p["down"])
        cache.advance(n)
        out = rms_norm(x, self.final_norm, self.eps)
        return out if batched else out[0]


class LeanBackend:
    """A `LeanDecoder` then an output head, on a `KVBuffer` taken over from the prefill's cache.

    The target's exact backend (`exact_backend`): the exact decoder and the model's own lm_head
    module. A draft's fast backend (`backends.draft_backend`): the fused decoder (int8 or in the
    model's dtype) and a head over the draft vocabulary's rows (`vocab_ids`)."""

    window = None  # the lean paths refuse sliding windows (`LeanDecoder.unsupported`)

    def __init__(self, decoder: LeanDecoder, head, device: torch.device, vocab_ids: torch.Tensor | None = None,
                 quant: str | None = None):
        self.decoder, self.head, self.device, self.vocab_ids, self.quant = decoder, head, device, vocab_ids, quant
        self.dtype = decoder.dtype
        self.kind = "exact" if decoder.exact else "lean"

    @classmethod
    def exact(cls, model) -> LeanBackend:
        """The target's exact backend, unchecked (`exact_backend` checks it on the model)."""
        return cls(LeanDecoder(model, exact=True), model.get_output_embeddings(), input_device(model))

    def start(self, cache=None) -> KVBuffer:
        if cache is None:
            raise ValueError("a lean backend continues a prefill: it needs the prefill's cache")
        return KVBuffer.from_cache(cache, self.dtype)

    def forward(self, tokens, positions, bias, cache, *, features=None, logits_to_keep=0, hidden=False) -> Step:
        no_features(self, features)
        h = self.decoder(tokens, positions, bias, cache)  # [n, hidden] or [B, n, hidden]
        logits = self.head(h[..., -logits_to_keep:, :] if logits_to_keep else h)
        return Step(logits, h if hidden else None)


def exact_backend(model) -> LeanBackend | None:
    """The target's exact lean backend, or None when the exact path does not cover `model` or its
    logits differ from transformers' on this model (a transformers version whose Llama forward
    changed): then a warning, and the target keeps transformers' forward."""
    if unsupported_exact(model):
        return None
    backend = LeanBackend.exact(model)
    if not matches_transformers(model, backend):
        warnings.warn(f"specllava: the exact lean path's logits differ from transformers' forward for "
                      f"{type(model).__name__} (transformers {transformers.__version__}); the target keeps "
                      "transformers' own forward", stacklevel=3)
        return None
    return backend


def unsupported_exact(model) -> str | None:
    """Why the target's exact backend does not cover `model`, or None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    text = model.config.get_text_config()
    if head is None or getattr(text, "final_logit_softcapping", None) or getattr(text, "logit_scale", None):
        return "logits are not lm_head(hidden)"
    if is_dispatched(model):  # its weights move in and out through accelerate's hooks
        return "dispatched by accelerate (hf_device_map / offload)"
    return LeanDecoder.unsupported(model, exact=True)


@torch.inference_mode()
def matches_transformers(model, backend) -> bool:
    """Feed the same short text (a chain, then a 3-node tree under its mask, then one token)
    through transformers' forward and `backend`; True when every logit is bitwise equal."""
    from ..cache import compact
    from ..runner import ModelRunner
    from ..tree import attention_bias

    device = input_device(model)
    avoid = image_token_id(model)
    text_ids = [i for i in range(min(model.get_input_embeddings().num_embeddings, 64)) if i != avoid]
    ids = [text_ids[(3 + k) % len(text_ids)] for k in range(8)]
    prompt = torch.tensor([ids[:4]], device=device)
    tree = torch.tensor(ids[4:7], device=device)
    tree_mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool, device=device)
    outs = []
    for candidate in (None, backend):
        runner = ModelRunner(model, candidate)
        runner.prefill(prompt)
        logits = runner.forward(tree, torch.tensor([4, 5, 5], device=device), attention_bias(tree_mask, 4, runner.dtype))
        compact(runner.cache, 4, torch.tensor([0, 2], device=device))
        step = runner.forward(torch.tensor(ids[7:8], device=device), torch.tensor([6], device=device), None)
        outs.append(torch.cat([logits, step]))
    return bool(torch.equal(outs[0], outs[1]))
