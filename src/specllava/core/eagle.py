"""A feature-level draft head (EAGLE-style) that reads the target's own hidden states.

A separate draft model sees only tokens. This head sees what the target computed: at position j
it takes the target's final hidden state (its *feature*, the vector the target's LM head turns into
the next-token distribution) at position j-1 together with the embedding of token j, fuses them
(`fc`), runs one decoder layer over its own KV cache, and predicts the feature at position j. The
target's own LM head (its rows for a reduced draft vocabulary) turns that prediction into the draft
distribution over token j+1. Deeper in a draft tree the head feeds on its own predicted features,
as EAGLE does; after each verification the accepted tokens are fed again with the target's real
features, so the head's cache only ever holds real ones for committed text.

What the target emits never depends on the head (it only proposes; verification decides), so the
head's numerics are free: int8 linears, a reduced vocabulary, no bitwise care.

The head owns only its fusion layer, one Llama-style decoder layer and a final norm (about 4.6 M
parameters for the default target); the token embedding, the LM head and the rotary embedding are
the target's. Files: safetensors with those tensors, `kind` = "eagle-head", the layer shape and the
token ranking (`core.vocab`) in the metadata (`EagleHead.save` / `EagleHead.load`).
`specllava.training.eagle` trains one for any Llama-style target.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .backends.lean import LeanDecoder
from .backends.llama import apply_rotary, rms_norm
from .cache import crop
from .config import TreeConfig
from .drafting import Drafter
from .runner import ModelRunner
from .tree import Tree

HEAD_KIND = "eagle-head"


@dataclass
class HeadShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    vocab: int  # rows of the target's LM head

    @classmethod
    def of(cls, target) -> HeadShape:
        cfg = target.config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim,
                   cfg.intermediate_size, float(cfg.rms_norm_eps), int(target.get_output_embeddings().weight.shape[0]))


class EagleHead(nn.Module):
    """fc(concat(embed(token_j), feature_{j-1})) -> one decoder layer -> norm = predicted feature_j."""

    def __init__(self, shape: HeadShape, token_ranking: list[int] | None = None):
        super().__init__()
        h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        self.shape = shape
        self.token_ranking = token_ranking
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.q_proj, self.k_proj = nn.Linear(h, q, bias=False), nn.Linear(h, kv, bias=False)
        self.v_proj, self.o_proj = nn.Linear(h, kv, bias=False), nn.Linear(q, h, bias=False)
        self.gate_proj = nn.Linear(h, shape.intermediate, bias=False)
        self.up_proj = nn.Linear(h, shape.intermediate, bias=False)
        self.down_proj = nn.Linear(shape.intermediate, h, bias=False)
        self.input_norm = nn.Parameter(torch.ones(h))
        self.post_norm = nn.Parameter(torch.ones(h))
        self.norm = nn.Parameter(torch.ones(h))

    # what `core.vocab` and `core.model_info.vocab_size` read from a draft model
    @property
    def config(self):
        return self

    def get_text_config(self):
        return self

    def get_output_embeddings(self):
        return None  # the target's

    @property
    def vocab_size(self) -> int:
        return self.shape.vocab

    def to_dict(self) -> dict:  # the config's description (calibration cache keys)
        return {"kind": HEAD_KIND, **asdict(self.shape)}

    @classmethod
    def from_target(cls, target, token_ranking: list[int] | None = None) -> EagleHead:
        """A fresh head whose layer and norm start as the target's last layer and final norm."""
        head = cls(HeadShape.of(target), token_ranking)
        body = target.get_decoder()
        last = body.layers[-1]
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(head, name).weight.copy_(getattr(last.self_attn, name).weight.float())
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(head, name).weight.copy_(getattr(last.mlp, name).weight.float())
            head.input_norm.copy_(last.input_layernorm.weight.float())
            head.post_norm.copy_(last.post_attention_layernorm.weight.float())
            head.norm.copy_(body.norm.weight.float())
        return head

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in self.state_dict().items()}
        meta = {"kind": HEAD_KIND, "shape": json.dumps(asdict(self.shape))}
        if self.token_ranking:
            meta["token_ranking"] = json.dumps([int(t) for t in self.token_ranking])
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EagleHead:
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / "eagle_head.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("kind") != HEAD_KIND:
                raise ValueError(f"{path} is not an EAGLE head file (metadata kind={meta.get('kind')!r})")
            head = cls(HeadShape(**json.loads(meta["shape"])), json.loads(meta.get("token_ranking", "null")))
            head.load_state_dict({k: f.get_tensor(k).float() for k in f.keys()})
        return head.eval()

    @staticmethod
    def is_head_file(path: str | Path) -> bool:
        path = Path(path)
        if path.is_dir():
            path = path / "eagle_head.safetensors"
        if not path.is_file() or path.suffix != ".safetensors":
            return False
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("kind") == HEAD_KIND

    def check_target(self, target) -> None:
        why = LeanDecoder.unsupported(target)
        if why is None and getattr(target.config.get_text_config(), "final_logit_softcapping", None):
            why = "its logits are soft-capped"
        if why is not None:
            raise ValueError(f"an EAGLE head drafts for Llama-style targets only; {type(target).__name__}: {why}")
        if asdict(HeadShape.of(target)) != asdict(self.shape):
            raise ValueError(f"this EAGLE head was trained for a target of shape {asdict(self.shape)}, "
                             f"the target has {asdict(HeadShape.of(target))}")

    # -- training ---------------------------------------------------------------------------------
    def rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.shape.eps)

    def unrolled(self, emb: torch.Tensor, feats_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 passes: int) -> list[torch.Tensor]:
        """Training forward, unrolled as a draft tree uses the head (EAGLE-3's training-time test).

        emb: [B, T, hidden] embeddings of tokens 0..T-1; feats_in: [B, T, hidden] the target's
        feature at j-1 for each j (zeros at 0); cos, sin: [B, T, head_dim]. Pass 1 reads the real
        features (a tree's root); pass s reads pass s-1's prediction at j-1 (a node at depth s-1)
        and attends to pass 1's keys up to j-s+1 and to pass u's key at j-s+u for 1 < u <= s: the
        committed text, then the node's own ancestors in the tree. Returns the predicted features
        of every pass, each [B, T, hidden]."""
        s = self.shape
        B, T, _ = emb.shape
        cos, sin = cos[:, None], sin[:, None]
        keys, values, outs, inp = [], [], [], feats_in
        for p in range(1, passes + 1):
            x = self.fc(torch.cat([emb, inp], -1))
            h = self.rms(x, self.input_norm)
            q = apply_rotary(self.q_proj(h).view(B, T, s.heads, s.head_dim).transpose(1, 2), cos, sin)
            keys.append(apply_rotary(self.k_proj(h).view(B, T, s.kv_heads, s.head_dim).transpose(1, 2), cos, sin))
            values.append(self.v_proj(h).view(B, T, s.kv_heads, s.head_dim).transpose(1, 2))
            mask = unroll_mask(T, p, emb.device)
            att = F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask,
                                                 enable_gqa=s.heads != s.kv_heads)
            x = x + self.o_proj(att.transpose(1, 2).reshape(B, T, -1))
            h = self.rms(x, self.post_norm)
            x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
            out = self.rms(x, self.norm)
            outs.append(out)
            inp = F.pad(out[:, :-1], (0, 0, 1, 0))  # position j reads this pass's prediction at j-1
        return outs

    def teacher_forced(self, target, ids: torch.Tensor, feats: torch.Tensor, passes: int = 1) -> list[torch.Tensor]:
        """`unrolled` over a text the target has read: ids [B, T], feats [B, T, hidden] its final
        hidden states there (each position j reads the feature at j-1). For checks and tools."""
        emb = target.get_input_embeddings()(ids).float()
        cos, sin = target.get_decoder().rotary_emb(emb, torch.arange(ids.shape[1], device=ids.device)[None])
        return self.unrolled(emb, F.pad(feats[:, :-1], (0, 0, 1, 0)).float(), cos.float(), sin.float(), passes)


def unroll_mask(T: int, p: int, device=None) -> torch.Tensor:
    """[T, p*T] bool: what position j attends to in pass p of `EagleHead.unrolled` (keys of
    passes 1..p side by side): pass 1 up to j-p+1, pass u (1 < u <= p) at j-p+u only."""
    j = torch.arange(T, device=device)[:, None]
    i = torch.arange(T, device=device)[None, :]
    blocks = [i <= j - p + 1] + [i == j - p + u for u in range(2, p + 1)]
    return torch.cat(blocks, dim=1)


class EagleDrafter(Drafter):
    """`Drafter` with the head: the same trees (chain, static, dynamic; greedy or sampled), but
    every head forward gets one input feature per token. The pending chain reads the target's
    features (the prompt's after the prefill, the accepted path's after each verification);
    a tree node reads its parent's predicted feature. After verification the head's cache drops
    every tree node and the accepted tokens are fed again with the target's real features.

    runner: a `ModelRunner` on the head's backend (`backends.HeadBackend`) with keep_hidden=True,
    started (`ModelRunner.start`): after each forward its `hidden` holds the predicted features."""

    def __init__(self, runner: ModelRunner, target, policy: str, cfg: TreeConfig, prompt_ids: list[int],
                 prompt_feats: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None):
        super().__init__(runner, policy, cfg, temperature, generator)
        self.calib = None  # the head's trees follow its own q: its commit observes no acceptance
        self.target = target  # the target's ModelRunner: its `hidden` after each verification
        self.pending = list(prompt_ids)
        # token j reads the feature at j-1; the first token none (zeros); the last row is the root's
        self.pending_feats = torch.cat([prompt_feats.new_zeros(1, prompt_feats.shape[-1]), prompt_feats])

    def _pending_features(self) -> torch.Tensor:
        return self.pending_feats

    def _frontier_features(self, frontier, parents) -> torch.Tensor:
        return self.node_feats[self.node_row[parents[frontier]]]  # each node reads its parent's

    def _feed_pending(self, pending: list[int]) -> torch.Tensor:
        logits = super()._feed_pending(pending)
        self.node_feats = self.runner.hidden[-1:]  # the root's predicted feature
        # node_row[i]: the row of node_feats holding fed node i's predicted feature, on the device
        # (no read back per depth); node 0, the root, is row 0
        self.node_row = torch.zeros(1, dtype=torch.long, device=self.node_feats.device)
        return logits

    def _feed_frontier(self, frontier, tokens, parents, depth) -> torch.Tensor:
        logits = super()._feed_frontier(frontier, tokens, parents, depth)
        base = self.node_feats.shape[0]
        self.node_feats = torch.cat([self.node_feats, self.runner.hidden])
        rows = self.node_row.new_zeros(tokens.numel())
        rows[: self.node_row.numel()] = self.node_row
        rows[frontier.to(rows.device)] = torch.arange(base, base + frontier.numel(), device=rows.device)
        self.node_row = rows
        return logits

    def commit(self, tree: Tree, path: list[int]) -> None:
        crop(self.runner.cache, self.runner.length - self.fed.numel())
        index = torch.tensor(path, dtype=torch.long, device=tree.tokens.device)  # host sync: the path's upload
        self.pending = tree.tokens[index[1:]].tolist()  # host sync: the accepted tokens
        # the root's and the accepted nodes' features
        self.pending_feats = self.target.hidden[index.to(self.target.hidden.device)]
