"""Per-request decoding statistics (`SpecOutput.stats`, `Sequence.stats`).

  new_tokens       tokens emitted (prompt excluded)
  target_forwards  target forward passes, the prefill included (a batched forward counts once
                   for every sequence in it)
  draft_forwards   draft forward passes, its prefill included (likewise)
  mean_accepted    tokens emitted per target forward (bonus included; plain decoding = 1)
  accept_hist      accept_hist[k] = verification steps that accepted k draft tokens
  accept_by_depth  accept_by_depth[d-1] = steps whose accepted path reached depth >= d
  steps            verification steps
  tree_nodes_mean  mean draft nodes per verified tree (root excluded)
  batch_mean       mean number of sequences per verification forward (1 when decoded alone)
  finish_reason    "eos", "length", "stop", "cancelled" or "time_limit"
  time_*_s         wall time: prefill (target + draft), decode (after prefill), draft, verify;
                   in a batch, draft and verify are the batched step's times, shared
"""

from __future__ import annotations


class Stats:
    def __init__(self):
        self.t_draft = self.t_verify = 0.0
        self.hist: list[int] = []
        self.nodes: list[int] = []
        self.batch: list[int] = []
        self.target_forwards = 1  # the prefill
        self.draft_forwards = 0

    def record(self, nodes: int, accepted: int, batch: int = 1) -> None:
        """One verification step: `nodes` tree nodes (root included), `accepted` draft tokens
        accepted, in a forward over `batch` sequences."""
        if accepted >= len(self.hist):
            self.hist += [0] * (accepted + 1 - len(self.hist))
        self.hist[accepted] += 1
        self.nodes.append(nodes - 1)
        self.batch.append(batch)
        self.target_forwards += 1

    def summary(self, new_tokens: int, time_prefill_s: float, time_total_s: float, finish_reason: str | None) -> dict:
        by_depth = [sum(self.hist[d:]) for d in range(1, len(self.hist))]
        return {
            "new_tokens": new_tokens,
            "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards,
            "mean_accepted": new_tokens / max(self.target_forwards, 1),
            "accept_hist": self.hist,
            "accept_by_depth": by_depth,
            "steps": len(self.nodes),
            "tree_nodes_mean": sum(self.nodes) / len(self.nodes) if self.nodes else 0.0,
            "batch_mean": sum(self.batch) / len(self.batch) if self.batch else 1.0,
            "finish_reason": finish_reason,
            "time_prefill_s": time_prefill_s,
            "time_decode_s": time_total_s - time_prefill_s,
            "time_draft_s": self.t_draft,
            "time_verify_s": self.t_verify,
            "time_total_s": time_total_s,
        }
