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


class LazyProbs:
    """p at the tree's nodes as verification reads it: `p[node]` -> [V], the processed target
    distribution of that node's logits row, computed only for the nodes the sampler visits
    (processing all N rows would sort N full-vocabulary rows for top-p on every step)."""

    def __init__(self, logits: torch.Tensor, params: SamplingParams):
        self.logits, self.params, self.rows = logits, params, {}  # logits: [N, V]

    def __getitem__(self, node: int) -> torch.Tensor:
        if node not in self.rows:
            self.rows[node] = processed_probs(self.logits[node : node + 1], self.params)[0]
        return self.rows[node]


def mix_seed(seed: int) -> int:
    """SplitMix64 of the seed. torch's CPU generator seeded with consecutive integers (seed=0, 1,
    2, ... as users and benchmarks do) gives measurably biased first draws; mixing the seed first
    removes that (`tools/seed_bias.py`, docs/algorithms.md). A seed outside [0, 2**64) (negative,
    or wider than 64 bits) is mixed whole, 64 bits at a time after its sign, so that it does not
    share a stream with the seed its low 64 bits make (2**64 is not seed 0)."""
    if 0 <= seed <= _MASK64:
        return _splitmix64(seed) & 0x7FFFFFFFFFFFFFFF
    x, rest = _splitmix64(1 if seed < 0 else 2), abs(seed)
    while rest:
        x, rest = _splitmix64(x ^ (rest & _MASK64)), rest >> 64
    return x & 0x7FFFFFFFFFFFFFFF


_MASK64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def request_generator(seed: int | None) -> torch.Generator:
    """A request's CPU generator: seeded from `mix_seed(seed)`, or from fresh entropy for None.
    The verification's uniforms are drawn on the CPU on purpose (`verify._uniform`)."""
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(mix_seed(int(seed)))
    else:
        gen.seed()
    return gen
