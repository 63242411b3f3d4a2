"""The pieces of a Llama-style decoder layer, written once: RMSNorm, rotary embedding (and a table
of it), the causal mask, linears in a dtype or int8, and the fused decode-step layer that the
draft's lean path (`backends.lean`) and the EAGLE head (`backends.eagle`, `core.eagle`) run.

The target's exact path does not use `FusedLayer`: it runs the model's own modules op for op
(`LeanDecoder._exact`); it shares `rms_norm`, `apply_rotary` and `causal_mask`, which compute what
transformers' Llama computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalised in float32, back to the input's dtype, then scaled."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, rotate-half convention (as transformers' Llama)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def causal_mask(n: int, past: int, device) -> torch.Tensor | None:
    """[1, 1, n, past + n] boolean mask of n new positions after `past` cached ones (each sees the
    cache and the new positions up to itself), as transformers' sdpa mask; None for one position."""
    if n == 1:
        return None
    return torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past)[None, None]


def step_mask(bias: torch.Tensor | None, n: int, past: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """The mask of a decode step: the caller's additive `bias` [1, 1, n, past + n] cast to the
    path's dtype, or the causal mask when there is none."""
    return causal_mask(n, past, device) if bias is None else bias.to(dtype)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quant: str | None, dtype: torch.dtype):
    """`x -> x @ weight.T + bias` as a callable: int8 weights (float32 in and out) when quant is
    "int8", else the weights cast once to `dtype`."""
    if quant == "int8":
        from ..quant import Int8Linear

        return Int8Linear(weight, bias)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    return lambda x: F.linear(x, w, b)


def fused_linear(linears, quant: str | None, dtype: torch.dtype):
    """Several nn.Linear on the same input as one (weights concatenated once; missing biases zero)."""
    w = torch.cat([lin.weight.detach() for lin in linears])
    biases = [lin.bias for lin in linears]
    b = None if all(x is None for x in biases) else torch.cat(
        [x.detach() if x is not None else w.new_zeros(lin.out_features) for x, lin in zip(biases, linears)])
    return make_linear(w, b, quant, dtype)


class RotaryTable:
    """cos/sin per position from a model's own rotary embedding, in `dtype`, grown on demand."""

    def __init__(self, rotary, dtype: torch.dtype):
        self.rotary, self.dtype = rotary, dtype
        empty = torch.empty(0, device=rotary.inv_freq.device)  # replaced by the first call's table
        self._table = (empty, empty)

    def __call__(self, positions: torch.Tensor, need: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, n, head_dim] cos and sin at `positions` [n] ([B, n, head_dim] at [B, n]). need: a bound on max(positions) + 1 known
        without reading positions back to the host (a draft step's positions never pass its cache
        length + n: `Drafter` feeds each node at the root's position plus its depth); None reads it."""
        cos, sin = self._table  # one read: requests in other threads may replace the table meanwhile
        need = int(positions.max()) + 1 if need is None else need
        if need > cos.shape[0]:  # (re)build the table with the model's own rotary embedding
            size = max(need, 2 * cos.shape[0], 1024)
            pos = torch.arange(size, device=positions.device)[None]
            probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
            cos, sin = self.rotary(probe, pos)
            cos, sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
            self._table = (cos, sin)
        if positions.dim() == 2:
            return cos[positions], sin[positions]
        return cos[positions][None], sin[positions][None]

    @property
    def size(self) -> int:
        return self._table[0].shape[0]


class FusedLayer:
    """One Llama decoder layer for decode steps (of one or several sequences): q, k and v in one linear, gate and up
    in one, keys and values written in place into a `KVBuffer`, one `scaled_dot_product_attention`
    call with the caller's mask (GQA included). Norm weights in `dtype`; linears from `make_linear`
    (int8 or `dtype`). For drafts only: its sums run in another order than transformers'."""

    def __init__(self, *, norm1, norm2, qkv, o, gate_up, down, heads: int, kv_heads: int, head_dim: int,
                 intermediate: int, eps: float):
        self.norm1, self.norm2, self.qkv, self.o, self.gate_up, self.down = norm1, norm2, qkv, o, gate_up, down
        self.heads, self.kv_heads, self.head_dim, self.inter, self.eps = heads, kv_heads, head_dim, intermediate, eps
        self.q_end = heads * head_dim
        self.k_end = self.q_end + kv_heads * head_dim

    @classmethod
    def of(cls, layer, cfg, quant: str | None, dtype: torch.dtype, eps: float) -> FusedLayer:
        """From a transformers Llama-style decoder layer (`self_attn`, `mlp`, two RMSNorms)."""
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(norm1=layer.input_layernorm.weight.detach().to(dtype),
                   norm2=layer.post_attention_layernorm.weight.detach().to(dtype),
                   qkv=fused_linear((attn.q_proj, attn.k_proj, attn.v_proj), quant, dtype),
                   o=fused_linear((attn.o_proj,), quant, dtype),
                   gate_up=fused_linear((mlp.gate_proj, mlp.up_proj), quant, dtype),
                   down=fused_linear((mlp.down_proj,), quant, dtype),
                   heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
                   intermediate=cfg.intermediate_size, eps=eps)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                 cache, index: int, batch: int = 1) -> torch.Tensor:
        """x: [batch * n, hidden] (rows of `batch` sequences, n each); cos, sin: [batch or 1, n,
        head_dim]; mask: [batch or 1, 1, n, length + n]. Writes layer `index` of `cache` (the
        caller advances it once every layer has written)."""
        n = x.shape[0] // batch
        qkv = self.qkv(rms_norm(x, self.norm1, self.eps))  # [batch * n, (heads + 2 kv_heads) * head_dim]
        q = qkv[:, : self.q_end].view(batch, n, self.heads, self.head_dim).transpose(1, 2)
        k = qkv[:, self.q_end : self.k_end].view(batch, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = qkv[:, self.k_end :].view(batch, n, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]  # [batch or 1, 1, n, head_dim]
        keys, values = cache.write(index, apply_rotary(k, cos, sin), v)
        att = F.scaled_dot_product_attention(apply_rotary(q, cos, sin), keys, values, attn_mask=mask,
                                             enable_gqa=self.heads != self.kv_heads)  # [batch, heads, n, head_dim]
        x = x + self.o(att.transpose(1, 2).reshape(batch * n, self.q_end))
        gate_up = self.gate_up(rms_norm(x, self.norm2, self.eps))
        return x + self.down(F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :])
