"""The target's processed distribution p, exactly as `generate(do_sample=True)` builds it.

Sampling is lossless only against *this* p, so it is built with transformers' own warpers in
generate()'s order (temperature, then top-k, then top-p) rather than re-implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingParams:
    """generate()-style sampling arguments. `do_sample=False` means greedy (argmax)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def warpers(self) -> LogitsProcessorList:
        out = LogitsProcessorList()
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            out.append(TopKLogitsWarper(top_k=self.top_k))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=self.top_p))
        return out


def sampling_args(temperature: float, top_k: int = 0, top_p: float = 1.0) -> dict:
    """`generate()`'s sampling arguments for a command-line style temperature, where 0 means greedy
    (the CLI's and the server's convention)."""
    sampled = temperature > 0
    return dict(do_sample=sampled, temperature=temperature if sampled else 1.0, top_k=top_k, top_p=top_p)


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Rows of `logits` [N, V] -> the distributions generate() would sample from, [N, V] float32."""
    scores = logits.float()
    warpers = params.warpers()
    if warpers:
        # The warpers only read input_ids' shape for batch size; they act row by row.
        dummy_ids = torch.zeros(scores.shape[0], 1, dtype=torch.long, device=scores.device)
        scores = warpers(dummy_ids, scores)
    return torch.softmax(scores, dim=-1)
