"""One request's decoding state (`Sequence`) and what one step did to it (`StepResult`).

A `Sequence` is made by `SpeculativeDecoder.start` (the prefill and the first token) and advanced
by `SpeculativeDecoder.step` (one draft -> verify -> accept -> compact -> emit step, for many
sequences at once). It holds everything that belongs to the request alone: its prompt, sampling
parameters and generator, stop rules, the target's and the draft's cache state, the tokens
emitted so far and its stats. Between steps the caller may stop it (`finish`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .drafting import Drafter
from .runner import ModelRunner
from .sampling import SamplingParams
from .stats import Stats
from .tree import Tree
from .verify import Verdict

FINISH_REASONS = ("eos", "length", "stop", "cancelled", "time_limit")


@dataclass(eq=False)
class Sequence:
    input_ids: torch.Tensor  # [1, prompt_len], on the target's input device
    params: SamplingParams
    max_new_tokens: int
    eos: set[int]
    generator: torch.Generator  # the request's CPU generator (sampling; unused when greedy)
    target: ModelRunner  # the target's cache for this request (while in a batch: its row there)
    drafter: Drafter | None  # None: plain decoding ("ar")
    deadline: float | None = None  # time.monotonic() after which the next step finishes it
    tokens: list[int] = field(default_factory=list)  # emitted tokens, the first one included
    stats: Stats = field(default_factory=Stats)
    finish_reason: str | None = None  # one of FINISH_REASONS once finished
    t_start: float = field(default_factory=time.perf_counter)
    t_prefill: float = 0.0  # seconds from start() to the first token
    t_end: float | None = None
    keep_logits: bool = False  # StepResult.logits wanted (the server's logprobs)
    first_logits: torch.Tensor | None = None  # [1, V] the target's raw logits behind the first token (keep_logits)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def root(self) -> int:
        """The last emitted token: the root of the next tree (not yet in either cache)."""
        return self.tokens[-1]

    def finish(self, reason: str) -> None:
        """Stop decoding this sequence (a stop sequence seen, a cancelled or timed-out request);
        the next `step` leaves it out and frees its place. The first reason given stays."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"unknown finish reason {reason!r}; one of {FINISH_REASONS}")
        if self.finish_reason is None:
            self.finish_reason = reason
            self.t_end = time.perf_counter()

    def emit(self, tokens: list[int]) -> list[int]:
        """Append a step's tokens, cut exactly where generate() stops: after the first EOS (kept,
        as generate() keeps it) and at max_new_tokens. Returns what was kept."""
        room = self.max_new_tokens - len(self.tokens)
        for i, tok in enumerate(tokens[:room]):
            if tok in self.eos:
                self.tokens += tokens[: i + 1]
                self.finish("eos")
                return tokens[: i + 1]
        kept = tokens[:room]
        self.tokens += kept
        if len(self.tokens) >= self.max_new_tokens:
            self.finish("length")
        return kept

    def sequences(self) -> torch.Tensor:
        """Prompt and emitted tokens, [1, prompt_len + new_tokens]."""
        new = torch.tensor([self.tokens], dtype=self.input_ids.dtype, device=self.input_ids.device)
        return torch.cat([self.input_ids, new], dim=1)

    def summary(self) -> dict:
        end = self.t_end if self.t_end is not None else time.perf_counter()
        if self.drafter is not None and self.stats.draft_forwards == 0:
            self.stats.draft_forwards = self.drafter.runner.forwards
        return self.stats.summary(len(self.tokens), self.t_prefill, end - self.t_start, self.finish_reason)


@dataclass
class StepResult:
    """What one step did to one sequence.

    tokens: the tokens it emitted (accepted draft tokens, then the bonus; cut at EOS or
    max_new_tokens). tree, verdict: the verified tree and its accepted path (`verdict.path`, node
    indices, root first) and bonus token. finished / finish_reason: whether this step ended it.
    logits: with the sequence's `keep_logits`, the target's raw logits behind each emitted token,
    [len(tokens), V] (the accepted path's rows, read from the verification forward), else None."""

    sequence: Sequence
    tokens: list[int]
    tree: Tree
    verdict: Verdict
    logits: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.sequence.finished

    @property
    def finish_reason(self) -> str | None:
        return self.sequence.finish_reason
