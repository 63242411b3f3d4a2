"""Lean decode paths: a model's decoder layers as a few tensor ops each, on a `KVBuffer`.

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
float32 and bfloat16, for one token and for a tree under a mask, and `core.runner.TargetPath`
checks it once more on the model itself before using it. Needs the model loaded with
attn_implementation "sdpa" (transformers' default); otherwise the target keeps its own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .cache import KVBuffer

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
        self.eps = float(body.norm.variance_epsilon)
        self.final_norm = body.norm.weight if exact else body.norm.weight.detach().to(self.dtype)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.inter = cfg.intermediate_size
        self.layers = [self._exact_layer(layer) if exact else self._layer(layer, quant) for layer in body.layers]
        self._table = (torch.empty(0), torch.empty(0))  # rotary (cos, sin) per position, grown on demand

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

    def _layer(self, layer, quant) -> dict:
        attn, mlp = layer.self_attn, layer.mlp

        def fused(*linears):
            w = torch.cat([lin.weight.detach() for lin in linears])
            biases = [lin.bias for lin in linears]
            b = None if all(x is None for x in biases) else torch.cat(
                [x.detach() if x is not None else w.new_zeros(lin.out_features) for x, lin in zip(biases, linears)])
            return make_linear(w, b, quant, self.dtype)

        return {
            "norm1": layer.input_layernorm.weight.detach().to(self.dtype),
            "norm2": layer.post_attention_layernorm.weight.detach().to(self.dtype),
            "qkv": fused(attn.q_proj, attn.k_proj, attn.v_proj),
            "o": fused(attn.o_proj),
            "gate_up": fused(mlp.gate_proj, mlp.up_proj),
            "down": fused(mlp.down_proj),
        }

    def new_cache(self, cache) -> KVBuffer:
        """The draft's cache after its prefill (a DynamicCache), as this path's `KVBuffer`."""
        return KVBuffer.from_cache(cache, self.dtype)

    # ------------------------------------------------------------------------------------------
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor | None,
                 cache: KVBuffer) -> torch.Tensor:
        """tokens, positions: [n]; bias: [1, 1, n, length + n] additive mask (None: causal).
        Appends the n positions to `cache`; returns the final-normed hidden states [n, hidden]."""
        if self.exact:
            return self._exact(tokens, positions, bias, cache)
        n, past = tokens.numel(), cache.length
        x = self.embed(tokens).to(self.dtype)  # [n, hidden]
        cos, sin = self._rope(positions, past + n)  # [1, n, head_dim] each
        mask = self._mask(bias, n, past, x.device)
        q_end = self.heads * self.head_dim
        k_end = q_end + self.kv_heads * self.head_dim
        for i, p in enumerate(self.layers):
            qkv = p["qkv"](self._norm(x, p["norm1"]))
            q = qkv[:, :q_end].view(n, self.heads, self.head_dim).transpose(0, 1)
            k = qkv[:, q_end:k_end].view(n, self.kv_heads, self.head_dim).transpose(0, 1)
            v = qkv[:, k_end:].view(n, self.kv_heads, self.head_dim).transpose(0, 1)
            keys, values = cache.write(i, apply_rotary(k, cos, sin)[None], v[None])
            att = F.scaled_dot_product_attention(apply_rotary(q, cos, sin)[None], keys, values, attn_mask=mask,
                                                 enable_gqa=self.heads != self.kv_heads)
            x = x + p["o"](att[0].transpose(0, 1).reshape(n, q_end))
            gate_up = p["gate_up"](self._norm(x, p["norm2"]))
            x = x + p["down"](F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :])
        cache.advance(n)
        return self._norm(x, self.final_norm)

    def _exact(self, tokens, positions, bias, cache: KVBuffer) -> torch.Tensor:
        """transformers' Llama decoder forward, op for op (batch 1), on a KVBuffer."""
        n = tokens.numel()
        if bias is None and n > 1:  # as transformers' sdpa mask: boolean causal after the cache
            bias = self._mask(None, n, cache.length, tokens.device)
        x = self.embed(tokens[None])  # [1, n, hidden]
        cos, sin = self.rotary(x, positions[None])  # [1, n, head_dim], in x's dtype
        cos, sin = cos[:, None], sin[:, None]
        for i, p in enumerate(self.layers):
            h = self._norm(x, p["norm1"])
            q = F.linear(h, *p["q"]).view(1, n, -1, self.head_dim).transpose(1, 2)
            k = F.linear(h, *p["k"]).view(1, n, -1, self.head_dim).transpose(1, 2)
            v = F.linear(h, *p["v"]).view(1, n, -1, self.head_dim).transpose(1, 2)
            keys, values = cache.write(i, apply_rotary(k, cos, sin), v)
            att, _ = sdpa_attention_forward(p["attn"], apply_rotary(q, cos, sin), keys, values, bias,
                                            dropout=0.0, scaling=p["attn"].scaling)
            x = x + F.linear(att.reshape(1, n, -1).contiguous(), *p["o"])
            h = self._norm(x, p["norm2"])
            x = x + F.linear(F.silu(F.linear(h, *p["gate"])) * F.linear(h, *p["up"]), *p["down"])
        cache.advance(n)
        return self._norm(x, self.final_norm)[0]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)  # as transformers' RMSNorm: back to the input's dtype

    def _rope(self, positions: torch.Tensor, need: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """need: a bound on max(positions) + 1 known without reading positions back to the host
        (a draft step's positions never pass its cache length + n: `Drafter` feeds each node at
        the root's position plus its depth); None reads it."""
        cos, sin = self._table  # one read: requests in other threads may replace the table meanwhile
        need = int(positions.max()) + 1 if need is None else need
        if need > cos.shape[0]:  # (re)build the table with the model's own rotary embedding
            size = max(need, 2 * cos.shape[0], 1024)
            pos = torch.arange(size, device=positions.device)[None]
            probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
            cos, sin = self.rotary(probe, pos)
            cos, sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
            self._table = (cos, sin)
        return cos[positions][None], sin[positions][None]

    def _mask(self, bias, n, past, device) -> torch.Tensor | None:
        if bias is not None:  # [1, 1, n, past + n] additive, built in this path's dtype (ModelRunner.dtype)
            return bias.to(self.dtype)
        if n == 1:
            return None
        causal = torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past)
        return causal[None, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, rotate-half convention (as transformers' Llama)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quant: str | None, dtype: torch.dtype):
    """`x -> x @ weight.T + bias` as a callable: int8 weights (float32 in and out) when quant is
    "int8", else the weights cast once to `dtype`. Shared by the lean paths and the EAGLE head."""
    if quant == "int8":
        from .quant import Int8Linear

        return Int8Linear(weight, bias)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    return lambda x: F.linear(x, w, b)
