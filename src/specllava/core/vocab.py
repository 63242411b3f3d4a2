"""Which tokens a reduced draft vocabulary keeps (`SpeculativeDecoder(draft_vocab=K)`).

On a CPU a small draft's LM head is a large part of its forward, so the draft proposes from K
token ids only (lossless: the target still verifies every token, the draft just never proposes the
others). Which K matters: a target answers with a few thousand distinct tokens, and even
several thousand lowest ids of a BPE vocabulary miss a good share of them (docs/training.md).

A draft may carry a *token ranking*: `config.token_ranking`, the ids its training answers used,
most frequent first (`train-draft` writes it; the default pair ships one). `draft_vocab_ids(K, ...)`
takes the ranked ids first, then fills up with the lowest remaining ids (BPE and SentencePiece
vocabularies put frequent tokens first). A draft without a ranking gets the K lowest ids.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from .model_info import vocab_size

RANKING_ATTR = "token_ranking"  # on the draft's (top-level) config; saved in config.json


def rank_tokens(token_ids: Iterable[int]) -> list[int]:
    """Distinct ids of `token_ids`, most frequent first (ties: lower id first)."""
    counts = Counter(int(t) for t in token_ids)
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def draft_ranking(draft) -> list[int] | None:
    """The draft's token ranking, or None when it has none."""
    config = getattr(draft, "config", None)
    ranking = getattr(config, RANKING_ATTR, None)
    return [int(t) for t in ranking] if ranking else None


def default_draft_vocab(draft, temperature: float) -> int | None:
    """The CLI's `--draft-vocab` default: for a draft with a token ranking, the ranking's length
    rounded up to a power of two at temperature 0 and twice that when sampling (capped at the
    vocabulary); None (the full vocabulary) for a draft without one.

    Why: a head over the ranked ids is small (cheap) and holds nearly every token the target
    writes greedily, and renormalised over those tokens the draft does not spend its confidence
    on tokens the target does not write. Sampled text is more varied, so sampled requests get
    twice as many ids. Tuned on the default pair (docs/benchmarks.md, "Why these defaults").
    """
    ranking = draft_ranking(draft) if draft is not None else None
    if not ranking:
        return None
    return ranked_vocab_size(len(ranking), temperature, vocab_size(draft))


def ranked_vocab_size(ranked: int, temperature: float, size: int) -> int:
    """`default_draft_vocab`'s K for a ranking of `ranked` ids and a `size`-token vocabulary."""
    k = 1 << (ranked - 1).bit_length()
    return min(2 * k if temperature > 0 else k, size)


def draft_vocab_ids(k: int, size: int, ranking: list[int] | None = None) -> torch.Tensor:
    """K token ids for a reduced draft vocabulary of a `size`-token model: the ranking's first
    (out-of-range and repeated ids skipped), then the lowest ids not yet taken. Sorted ascending.
    On the CPU: the backends move them to the head's device once."""
    if not 1 <= k <= size:
        raise ValueError(f"draft_vocab={k} must be between 1 and the vocabulary size {size}")
    if not ranking:
        return torch.arange(k, device="cpu")
    ranked = torch.tensor([t for t in dict.fromkeys(ranking) if 0 <= t < size][:k], dtype=torch.long, device="cpu")
    taken = torch.zeros(size, dtype=torch.bool, device="cpu")
    taken[ranked] = True
    fill = (~taken).nonzero().flatten()[: k - ranked.numel()]
    return torch.cat([ranked, fill]).sort().values
