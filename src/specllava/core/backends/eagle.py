"""The EAGLE head's backend (`core.eagle`): decode steps that read one input feature per token."""

from __future__ import annotations

import torch
from torch import nn

from ..cache import KVBuffer
from ..model_info import input_device
from .base import Step
from .llama import FusedLayer, RotaryTable, make_linear, rms_norm, step_mask


class HeadBackend:
    """An `EagleHead`'s decode steps for one target: its fusion layer and one `FusedLayer` (linears
    in the target's dtype, or int8), the target's token embedding and rotary embedding, and the
    target's LM head rows for the draft vocabulary; keys and values in a `KVBuffer` of its own.
    `forward` takes `features` [n, hidden] (the feature before each token) and, with hidden=True,
    returns the predicted features."""

    kind = "eagle-head"
    window = None

    def __init__(self, head, target, vocab_ids: torch.Tensor | None, quant: str | None = None):
        head.check_target(target)
        s = self.shape = head.shape
        self.quant = quant
        self.dtype = torch.float32 if quant == "int8" else target.dtype
        self.device = input_device(target)
        self.embed = target.get_input_embeddings()
        self.rope = RotaryTable(target.get_decoder().rotary_emb, self.dtype)
        dev = self.device  # the head's weights and cache sit with the target's input embeddings
        self.vocab_ids = None if vocab_ids is None else vocab_ids.to(dev)
        weight = target.get_output_embeddings().weight.detach()
        rows = weight if self.vocab_ids is None else weight.index_select(0, self.vocab_ids)

        def lin(m: nn.Linear | torch.Tensor):
            w = m.weight.detach() if isinstance(m, nn.Linear) else m.detach()
            b = m.bias.detach() if isinstance(m, nn.Linear) and m.bias is not None else None
            return make_linear(w.to(dev), None if b is None else b.to(dev), quant, self.dtype)

        self.fc = lin(head.fc)
        self.lm = lin(rows)
        norm1, norm2, self.final_norm = (n.detach().to(dev, self.dtype) for n in (head.input_norm, head.post_norm, head.norm))
        self.layer = FusedLayer(norm1=norm1, norm2=norm2,
                                qkv=lin(torch.cat([head.q_proj.weight, head.k_proj.weight, head.v_proj.weight])),
                                o=lin(head.o_proj), gate_up=lin(torch.cat([head.gate_proj.weight, head.up_proj.weight])),
                                down=lin(head.down_proj), heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim,
                                intermediate=s.intermediate, eps=s.eps)

    def start(self, cache=None, room: int = 1024) -> KVBuffer:
        if cache is not None:
            raise ValueError("an EAGLE head has no prefill: it starts from an empty cache")
        shape = (1, self.shape.kv_heads, room, self.shape.head_dim)
        return KVBuffer([torch.empty(shape, dtype=self.dtype, device=self.device)],
                        [torch.empty(shape, dtype=self.dtype, device=self.device)], 0)

    def forward(self, tokens, positions, bias, cache, *, features=None, logits_to_keep=0, hidden=False) -> Step:
        if features is None or features.shape[0] != tokens.numel():
            raise ValueError("an EAGLE head needs one input feature per token (features [n, hidden])")
        n, past = tokens.numel(), cache.length
        # the features come from the target's last layer, which a dispatched target may hold elsewhere
        x = self.fc(torch.cat([self.embed(tokens).to(self.dtype), features.to(self.device, self.dtype)], -1))
        cos, sin = self.rope(positions, past + n)  # `Drafter`'s positions stay below past + n
        x = self.layer(x, cos, sin, step_mask(bias, n, past, self.dtype, x.device), cache, 0)
        cache.advance(n)
        out = rms_norm(x, self.final_norm, self.shape.eps)  # the predicted features [n, hidden]
        return Step(self.lm(out[-logits_to_keep:] if logits_to_keep else out), out if hidden else None)
