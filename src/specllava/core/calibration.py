"""The draft's confidence calibrated online against the acceptance measured in this generation.

A draft's probabilities are not acceptance probabilities: a draft distilled on a flat target is
right far more often than its top probability says, a perturbed or weak draft can be confidently
wrong. The dynamic tree's shape (children per node, pruning, which nodes enter the budget, how deep
it grows) rests on these numbers, so it reads them through a `Calibrator` that has watched every
verified step of this sequence.

What is measured. A draft node is *tried* when its parent was accepted and every earlier sibling
(in draft order: rank at T=0, draw order when sampling) was rejected; a tried node is then
accepted or not. Both verification rules try siblings in this order, so the conditional
acceptance c = P(accepted | tried) is observed without bias for every tried node, at T=0 and at
T>0 alike. Nodes never tried (under a rejected parent, after an accepted sibling) tell nothing
and are skipped.

The estimator. Observations are binned by (depth, sibling rank, draft probability bucket), the
draft probability being the node's own q (not the path product). Each cell's estimate is shrunk
towards its pool over depths, that towards its rank's pool over depths and buckets, and that
towards prior(r), the draft's own mean conditional probability there (q over the mass its better
siblings left); with `strength` pseudo-observations at each level,

    rank(r)        = (accepted(r)       + m * prior(r))     / (tried(r)       + m)
    pooled(r, b)   = (accepted(r, b)    + m * rank(r))      / (tried(r, b)    + m)
    cell(d, r, b)  = (accepted(d, r, b) + m * pooled(r, b)) / (tried(d, r, b) + m)

so a fresh calibrator answers the draft's own numbers, and a few dozen steps make them the
measured ones. The unconditional probability that a node is accepted once its parent is, the
quantity path confidences multiply, is c_r * prod_{j < r} (1 - c_j) over its better siblings j.

Decisions (`Drafter` asks): `local(depth, q)` turns a frontier's draft probabilities [F, k] (best
or first-drawn first) into calibrated unconditional ones; `budget(scores)` picks how many of the
best nodes to verify from the expected accepted length and a cost model; `draft_pays()` says
whether drafting at all beats plain decoding, from the measured accepted length per step and the
same cost model (when it does not, the decoder verifies the root alone and probes again after a
growing number of steps).

Cost model (relative to one target forward of a single token): a step with N tree nodes and F
draft forwards costs 1 + node_cost * N + draft_cost * F. The defaults are the default pair's on a
2-core CPU (docs/benchmarks.md, "Where the time goes": about 1.2 ms per verified node and 2-3 ms
per draft forward with its loop work, against a 41 ms plain step).

Under batching (`CostModel.batch` = B sequences sharing each target forward, set by the decoder
before every step) the forward's fixed part (reading the weights, the per-forward overhead) is
shared by B rows while each verified node still costs its own compute, so one row's plain step
costs c0 = 1/B + node_cost * (1 - 1/B) of a lone forward, and a step with N nodes and F draft
forwards c0 + node_cost * N + draft_cost * F. Costs are kept in units of that plain step (B = 1:
the formula above), so `draft_pays` still compares with plain decoding's 1 token per unit: with
8 rows a node costs about a fifth of a plain step instead of a thirtieth, trees shrink, and a
draft that does not pay there leaves its row to plain batched decoding.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import numpy as np
import torch

# bucket edges over the draft's probability of the node's token
EDGE_LIST = [0.005, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.85, 0.95]
EDGES = torch.tensor(EDGE_LIST)
N_BUCKETS = len(EDGES) + 1
MAX_RANK = 4  # ranks 0..3 apart, 4 and beyond pooled
SCALE = 1_000_000  # confidences travel to the host as integers in millionths (`packed`)
DECAY = 0.8  # weight of a drafted step's tokens and cost at each later drafted step (draft_pays)
MAX_PLAIN_RUN = 32


@dataclass
class CostModel:
    """A step's cost relative to a one-token target forward (see the module docstring)."""

    node_cost: float = 0.03
    draft_cost: float = 0.05
    batch: int = 1  # sequences sharing each target forward (the decoder sets it every step)

    def step(self, nodes, draft_forwards):
        """The cost of a step with `nodes` tree nodes (a number or a tensor) and `draft_forwards`
        draft forwards, in units of one plain step at this batch size."""
        plain = 1.0 / self.batch + self.node_cost * (1.0 - 1.0 / self.batch)
        return (plain + self.node_cost * nodes + self.draft_cost * draft_forwards) / plain


class Calibrator:
    """Per-sequence acceptance statistics and the tree decisions made from them.

    max_depth: the deepest tree level observed separately (deeper levels share the last cell).
    strength:  pseudo-observations behind each level's prior (see the module docstring).
    """

    def __init__(self, max_depth: int = 8, strength: float = 2.0, cost: CostModel | None = None):
        self.max_depth = max_depth
        self.m = float(strength)
        self.cost = cost or CostModel()
        shape = (max_depth + 1, MAX_RANK + 1, N_BUCKETS)
        # host-side counts in numpy: the bookkeeping never touches a torch device
        self.tried = np.zeros(shape)
        self.accepted = np.zeros(shape)
        self.prior_sum = np.zeros(shape)  # sum of the draft's conditional q of tried nodes
        # drafted steps: how many, tokens emitted and cost spent, for draft_pays()
        self.drafted = 0
        self.tokens = 0.0
        self.spent = 0.0
        self.skip_until = 0  # plain steps left before the next probe
        self.skip_run = 0  # length of the last plain run
        self.probe_due = False
        self._table = None  # cached calibrated table, rebuilt after each observation
        self.version = 0  # observations with tried nodes so far
        self._table_on = (None, -1, None)  # (device, version, the table there)
        self._edges_on = {}

    # -- observations ---------------------------------------------------------------------------
    def observe(self, parents: list[int], depth: list[int], q: list[float], tokens: list[int] | None,
                path: list[int], draft_forwards: int = 0, nodes: int | None = None, bonus: int | None = None) -> None:
        """One verified step over the nodes the step grew: parents/depth/q/tokens per node (q: the
        draft's probability of the node's token at its parent, any value at the root; children of
        a node in draft order); `path`: the accepted nodes, root first; `nodes`: how many nodes
        were verified (default: all but the root).

        Sampled (bonus None): the grown tree is the verified one, and a child is accepted when it
        is on the path. Greedy (`bonus`, the token the target chose after the path): the target's
        argmax at each path node is the next path node's token, then the bonus, and a child is
        accepted when its token is that argmax, whether or not the node budget kept it in the
        verified tree, so a child's observations never depend on which siblings were kept."""
        children: dict[int, list[int]] = {}
        for i, par in enumerate(parents):
            if par >= 0:
                children.setdefault(par, []).append(i)
        if bonus is None:
            on_path = set(path)
            accepted_at = {u: next((c for c in children.get(u, []) if c in on_path), -1) for u in path}
        else:
            wanted = {u: tokens[v] for u, v in zip(path, path[1:])}
            wanted[path[-1]] = bonus
            accepted_at = {u: next((c for c in children.get(u, []) if tokens[c] == wanted[u]), -1) for u in path}
        seen = False
        for node in path:
            left = 1.0  # draft mass not taken by the better siblings
            for rank, child in enumerate(children.get(node, [])):
                qc = min(max(q[child], 0.0), 1.0)
                bucket = bisect_left(EDGE_LIST, qc)  # torch.bucketize's bucket, as `conditional` reads it
                cell = (min(depth[child], self.max_depth), min(rank, MAX_RANK), bucket)
                hit = child == accepted_at[node]
                self.tried[cell] += 1.0
                self.accepted[cell] += hit
                self.prior_sum[cell] += min(qc / left, 1.0) if left > 1e-9 else 1.0
                seen = True
                if hit:
                    break
                left = max(left - qc, 0.0)
        if seen:
            self._table = None
            self.version += 1
        n_nodes = len(parents) - 1 if nodes is None else nodes
        self.drafted += 1
        # moving sums (each step weighs DECAY of the one after it): recent steps decide
        self.tokens = DECAY * self.tokens + len(path)  # accepted draft tokens + the bonus
        self.spent = DECAY * self.spent + self.cost.step(n_nodes, draft_forwards)

    @staticmethod
    def packed(parents: torch.Tensor, depth: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """What `observe` needs from the device, as one long tensor to read back together with
        other values (`unpack` reverses it): parents, depth, q in millionths, tokens."""
        return torch.cat([parents, depth, (q.float() * SCALE).round().long(), tokens])

    @staticmethod
    def unpack(values: list[int], n: int) -> tuple[list[int], list[int], list[float], list[int]]:
        """`packed`'s read-back of n nodes -> (parents, depth, q, tokens)."""
        return values[:n], values[n:2 * n], [v / SCALE for v in values[2 * n:3 * n]], values[3 * n:4 * n]

    # -- estimates ------------------------------------------------------------------------------
    def table(self) -> np.ndarray:
        """Calibrated conditional acceptance c[depth, rank, bucket] (float32, numpy); NaN where
        nothing of its rank was observed yet (`conditional` uses the draft's q there)."""
        if self._table is None:
            m = self.m
            # rank r pooled over depths and buckets, shrunk to the draft's mean conditional q there
            tried_r, acc_r, prior_r = (x.sum(axis=(0, 2)) for x in (self.tried, self.accepted, self.prior_sum))
            with np.errstate(invalid="ignore", divide="ignore"):
                by_rank = np.where(tried_r > 0, (acc_r + m * prior_r / np.maximum(tried_r, 1)) / (tried_r + m), np.nan)
            # (rank, bucket) pooled over depths, shrunk to the rank's pool
            tried_p, acc_p = self.tried.sum(axis=0), self.accepted.sum(axis=0)  # [R, B]
            pooled = (acc_p + m * by_rank[:, None]) / (tried_p + m)
            cell = (self.accepted + m * pooled) / (self.tried + m)
            self._table = cell.astype(np.float32)
        return self._table

    def conditional(self, depth: int, q: torch.Tensor) -> torch.Tensor:
        """Calibrated P(accepted | tried) for a frontier's children at `depth`: q [F, k] the draft's
        probabilities of each parent's children in draft order -> [F, k]. On q's device, without
        reading anything back."""
        q = q.float()
        left = (1.0 - (q.cumsum(-1) - q)).clamp(min=1e-6)
        prior = (q / left).clamp(max=1.0)  # the draft's own conditional probability
        k = q.shape[-1]
        ranks = torch.arange(k, device=q.device).clamp(max=MAX_RANK)
        buckets = torch.bucketize(q, self._edges(q.device))
        tab = self._device_table(q.device)[min(depth, self.max_depth)]  # [R, B]
        est = tab[ranks[None, :].expand_as(buckets), buckets]
        # NaN: nothing of this rank observed yet; the draft's own conditional probability
        return torch.where(torch.isnan(est), prior, est)

    def _edges(self, device) -> torch.Tensor:
        if device not in self._edges_on:
            self._edges_on[device] = EDGES.to(device)
        return self._edges_on[device]

    def _device_table(self, device) -> torch.Tensor:
        """`table()` on `device`, copied there once per observation (on a GPU, one small upload
        per step)."""
        if self._table_on[:2] != (device, self.version):
            self._table_on = (device, self.version, torch.from_numpy(self.table()).to(device))
        return self._table_on[2]

    def local(self, depth: int, q: torch.Tensor) -> torch.Tensor:
        """Calibrated P(accepted | parent accepted) of each child, [F, k]: c_r * prod_{j<r} (1 - c_j)."""
        c = self.conditional(depth, q)
        survive = torch.cumprod(1.0 - c, dim=-1)
        before = torch.cat([torch.ones_like(c[:, :1]), survive[:, :-1]], dim=-1)
        return c * before

    # -- decisions ------------------------------------------------------------------------------
    def budget(self, scores: list[float], draft_forwards: int, most: int) -> int:
        """How many nodes to verify: the n <= most that maximises expected tokens per cost,
        (1 + sum of the n best path scores) / cost(n, draft_forwards). scores: the calibrated path
        confidences of a step's grown nodes (root excluded). At least 1."""
        best = sorted(scores, reverse=True)[:most]
        top, total, rate = 1, 1.0, 0.0
        for n, sc in enumerate(best, start=1):
            total += sc
            r = total / self.cost.step(n, draft_forwards)
            if r > rate:
                top, rate = n, r
        return top

    def budget_on_device(self, scores: torch.Tensor, draft_forwards: int, most: int) -> torch.Tensor:
        """`budget` computed where `scores` [n] lie, without reading them: a 0-d long tensor (the
        caller reads it together with what it needs anyway, or alone)."""
        best = scores.float().sort(descending=True).values[:most]
        n = torch.arange(1, best.numel() + 1, device=best.device, dtype=torch.float64)
        rate = (1.0 + best.double().cumsum(0)) / self.cost.step(n, draft_forwards)
        # argmax takes the first of equal rates, as `budget` keeps the first strictly best
        return rate.argmax() + 1 if best.numel() else torch.ones((), dtype=torch.long, device=best.device)

    def draft_pays(self, window: int = 6) -> bool:
        """Whether the next step should draft. Yes until `window` drafted steps are measured, then
        while their tokens per cost (the cost model's units: a plain step is 1 token for 1)
        reach plain decoding's 1 (moving sums, recent steps weigh most). When they do not, 1, 2,
        4, ... up to 32 plain steps follow, each run ended by one probing drafted step, which
        can bring drafting back.

        Deterministic: it reads the accepted counts and the cost model, never a clock, so a seeded
        sampled generation stays reproducible."""
        if self.skip_until > 0:
            self.skip_until -= 1
            return False
        if self.probe_due:  # the end of a plain run
            self.probe_due = False
            return True
        if self.drafted < window or self.tokens >= self.spent:
            self.skip_run = 0
            return True
        self.skip_run = min(max(2 * self.skip_run, 1), MAX_PLAIN_RUN)
        self.skip_until = self.skip_run - 1  # this step is the run's first
        self.probe_due = True
        return False
