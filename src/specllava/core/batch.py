"""Batched steps: the trees of B sequences drafted together and verified in one target forward.

`Batch` holds the sequences a decoder steps together. Each model's caches of those sequences live
in one batched buffer (`Rows`): B rows with a common number of columns, padded. A row's keys sit
in some of those columns; `Rows.pos[b, c]` is the position id of the key in column c of row b, or
-1 when row b has none there. So rows of different prompt lengths, images and progress share one
buffer, and the attention mask of every forward is built from `pos` (a query sees its row's
keys, and of the columns written this step only those its tree allows).

Why padded rather than ragged: the lean target path and transformers' forward both take a
[B, heads, columns, head_dim] cache and a [B, 1, n, columns + n] mask, so a padded buffer runs
through the same forward code as one sequence does; the waste (columns a row does not use) is
the difference in prompt lengths plus, per step, the difference in accepted lengths, a few
percent of the attention's work, and no extra weight reads (docs/algorithms.md).

One step (`step_batch`), each stage one forward for all rows:
  1. draft: every drafter's pending chain in one draft forward; then per depth, every row's
     frontier in one draft forward (rows whose tree is done feed a masked pad); the policy
     (`Drafter.begin / grow / tree / accepted_fed`) stays per sequence;
  2. verify: all trees, padded to the largest, in one target forward (4D mask per row);
  3. accept: greedy rows in one vectorised rule with one host read; sampled rows per row, each
     with its own generator;
  4. compact: per row, both caches keep the accepted path (`cache.compact_rows`);
  5. emit: per sequence, cut at EOS / max_new_tokens.
Drafters on different draft backends (greedy and sampled requests may use different draft
vocabularies) draft in separate groups, one forward per group and depth.

Sequences join (their own caches copied into new rows) and leave (their rows copied back out,
if unfinished) between steps: `Batch.build`.
"""

from __future__ import annotations

import time

import torch

from .cache import cache_from_kv, compact_rows, crop, row_kv
from .drafting import DraftQ, Drafter
from .quant import batch_rows
from .runner import ModelRunner
from .sampling import LazyProbs
from .sequence import Sequence, StepResult
from .tree import Tree, ancestor_mask, root_only
from .verify import Verdict, verify_greedy_rows, verify_sampling


class Rows:
    """One model's cache for B sequences (see the module docstring).

    backend: the model's backend (batched forward). cache: a KVBuffer or DynamicCache of B rows.
    pos: [B, columns] long, position id per column and row (-1: none). lengths: per row, the
    number of keys it holds = the position of its next token."""

    def __init__(self, backend, cache, pos: torch.Tensor, lengths: list[int]):
        self.backend, self.cache, self.pos, self.lengths = backend, cache, pos, lengths

    @property
    def columns(self) -> int:
        return self.pos.shape[1]

    @classmethod
    def stack(cls, backend, parts: list[tuple[list, list, torch.Tensor]], like) -> Rows:
        """Rows from per-sequence parts (keys, values [1, heads, L_b, head_dim] per layer, positions
        [L_b]), each right-aligned in `max L_b` columns (zeros and -1 before it)."""
        width = max(p[2].numel() for p in parts)
        n_layers = len(parts[0][0])
        keys, values = [], []
        for layer in range(n_layers):
            for store, which in ((keys, 0), (values, 1)):
                rows = []
                for part in parts:
                    t = part[which][layer]
                    pad = width - t.shape[2]
                    rows.append(torch.cat([t.new_zeros(t.shape[:2] + (pad,) + t.shape[3:]), t], 2) if pad else t)
                store.append(torch.cat(rows, 0))
        device = parts[0][2].device
        pos = torch.full((len(parts), width), -1, dtype=torch.long, device=device)
        for b, part in enumerate(parts):
            if part[2].numel():
                pos[b, width - part[2].numel():] = part[2].to(device)
        return cls(backend, cache_from_kv(like, keys, values), pos, [int(p[2].numel()) for p in parts])

    def row(self, b: int) -> tuple[list, list, torch.Tensor]:
        """Row b's keys and values [1, heads, L_b, head_dim] per layer and positions [L_b]."""
        cols = (self.pos[b] >= 0).nonzero().flatten()  # [L_b] ascending = position order
        keys, values = row_kv(self.cache)
        pick = lambda t: t[b : b + 1].index_select(2, cols.to(t.device))  # noqa: E731
        return [pick(k) for k in keys], [pick(v) for v in values], self.pos[b, cols]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, real: torch.Tensor, visible: torch.Tensor,
                mark: int, logits_to_keep: int = 0) -> torch.Tensor:
        """One forward of n new tokens per row on top of the cache; returns logits [B, n, V]
        (of the last `logits_to_keep` columns only when > 0).

        tokens, positions, real: [B, n] (real False: a pad, never visible later). visible:
        [B, n, columns - mark + n], which of the columns written since `mark` (this step's tree
        block) and of the n new ones each query sees; columns before `mark` are seen wherever the
        row has a key (and inside a sliding window)."""
        b, n = tokens.shape
        pos = torch.cat([self.pos, torch.where(real, positions, -1)], 1)  # [B, columns + n]
        seen = torch.cat([(self.pos[:, :mark] >= 0)[:, None, :].expand(b, n, mark), visible], 2)
        if self.backend.window:
            seen &= pos[:, None, :] > positions[:, :, None] - self.backend.window
        dtype = self.backend.dtype
        bias = torch.zeros(seen.shape, dtype=dtype, device=seen.device)
        bias.masked_fill_(~seen, torch.finfo(dtype).min)
        logits = self.backend.forward(tokens, positions, bias[:, None], self.cache,
                                      logits_to_keep=logits_to_keep).logits  # [B, n, V]
        self.pos = pos
        return logits

    def keep(self, mark: int, cols: list[list[int]]) -> None:
        """Per row b, keep the columns cols[b] (ascending, >= mark) at mark, mark + 1, ...; drop
        every other column from mark on. Each row's length grows by len(cols[b])."""
        m = max(len(c) for c in cols)
        for b, c in enumerate(cols):
            self.lengths[b] += len(c)
        if m == 0:
            crop(self.cache, mark)
            self.pos = self.pos[:, :mark]
            return
        index = torch.tensor([c + [c[-1] if c else mark] * (m - len(c)) for c in cols], device=self.pos.device)
        compact_rows(self.cache, mark, index)  # [B, M]
        used = torch.arange(m, device=self.pos.device)[None, :] < torch.tensor([len(c) for c in cols],
                                                                                device=self.pos.device)[:, None]
        kept = torch.where(used, self.pos.gather(1, index), -1)
        self.pos = torch.cat([self.pos[:, :mark], kept], 1)


def _own(runner: ModelRunner) -> tuple[list, list, torch.Tensor]:
    """A per-sequence runner's cache as a row part (keys, values, positions)."""
    keys, values = row_kv(runner.cache)
    keys = [k for k in keys]
    return keys, [v for v in values], torch.arange(runner.length, device=runner.device)


class Batch:
    """The sequences a decoder steps together and their rows: `target` (one `Rows`), and the
    drafters' rows in groups by draft backend (`groups`: (Rows, row indices))."""

    def __init__(self, seqs: list[Sequence], target: Rows, groups: list[tuple[Rows, list[int]]]):
        self.seqs, self.target, self.groups = seqs, target, groups

    @classmethod
    def build(cls, seqs: list[Sequence], old: Batch | None) -> Batch:
        """A batch of `seqs`: rows of sequences already in `old` move over, the others join from
        their own caches; unfinished sequences of `old` not in `seqs` get their caches back."""
        old_rows = {id(s): b for b, s in enumerate(old.seqs)} if old is not None else {}
        t_parts, d_parts = [], {}
        for s in seqs:
            b = old_rows.get(id(s))
            t_parts.append(old.target.row(b) if b is not None else _own(s.target))
            if s.drafter is not None:
                if b is None:  # joining from its own steps: its draft cache compacted first
                    s.drafter.settle()
                d_parts[id(s)] = old.draft_row(b) if b is not None else _own(s.drafter.runner)
        if old is not None:
            old.release(keep={id(s) for s in seqs})
        like_t = seqs[0].target.cache if seqs[0].target.cache is not None else old.target.cache
        target = Rows.stack(seqs[0].target.backend, t_parts, like_t)
        groups: dict[int, list[int]] = {}
        for b, s in enumerate(seqs):
            if s.drafter is not None:
                groups.setdefault(id(s.drafter.runner.backend), []).append(b)
        draft_groups = []
        for members in groups.values():
            first = seqs[members[0]].drafter.runner
            like_d = first.cache if first.cache is not None else old.draft_like(first.backend)
            draft_groups.append((Rows.stack(first.backend, [d_parts[id(seqs[b])] for b in members], like_d), members))
        for s in seqs:  # while in the batch, a sequence's own caches are its rows
            s.target.cache = None
            if s.drafter is not None:
                s.drafter.runner.cache = None
        return cls(seqs, target, draft_groups)

    def draft_row(self, b: int):
        for rows, members in self.groups:
            if b in members:
                return rows.row(members.index(b))
        raise KeyError(b)

    def draft_like(self, backend):
        for rows, members in self.groups:
            if rows.backend is backend:
                return rows.cache
        return self.groups[0][0].cache

    def release(self, keep: set[int] = frozenset()) -> None:
        """Give every unfinished sequence not in `keep` its own caches back (its rows, copied)."""
        for b, s in enumerate(self.seqs):
            if id(s) in keep or s.finished:
                continue
            keys, values, _ = self.target.row(b)
            s.target.cache = cache_from_kv(self.target.cache, keys, values)
            if s.drafter is not None:
                for rows, members in self.groups:
                    if b in members:
                        keys, values, _ = rows.row(members.index(b))
                        s.drafter.runner.cache = cache_from_kv(rows.cache, keys, values)


def step_batch(batch: Batch, skip_draft: bool = False) -> list[StepResult]:
    """One draft -> verify -> accept -> compact -> emit step for every sequence of `batch`
    (skip_draft: plain decoding, the roots alone; the drafters catch up at their next tree)."""
    seqs = batch.seqs
    n_rows = len(seqs)
    t0 = time.perf_counter()
    # 1. draft every tree (each group's drafters in batched draft forwards; "ar": the root alone)
    trees: list[Tree | None] = [None] * n_rows
    fed_at: dict[int, tuple[int, list[int]]] = {}  # row -> (tree block start, fed nodes' columns)
    groups = [] if skip_draft else batch.groups
    for b in (range(n_rows) if skip_draft else ()):
        if seqs[b].drafter is not None:
            seqs[b].drafter.skip(seqs[b].root)
    for rows, members in groups:
        grown, marks = _draft_group(rows, [seqs[b].drafter for b in members], [seqs[b].root for b in members])
        for j, b in enumerate(members):
            trees[b], fed_at[b] = grown[j], marks[j]
    target = batch.target
    dev = target.pos.device
    for b, s in enumerate(seqs):
        if trees[b] is None:
            trees[b] = root_only(s.root, device=dev)
    t1 = time.perf_counter()
    # 2. verify: one target forward over every tree, padded to the largest ([B, N])
    seen = [t.to(dev) for t in trees]
    width = max(len(t) for t in seen)
    tokens = torch.stack([_pad(t.tokens, width, t.tokens[0]) for t in seen])  # [B, N]
    parents = torch.stack([_pad(t.parents, width, -1) for t in seen])  # [B, N]; pads are lone roots
    depth = torch.stack([_pad(t.depth, width, 0) for t in seen])  # [B, N]
    real = torch.arange(width, device=dev)[None, :] < torch.tensor([len(t) for t in seen], device=dev)[:, None]
    anc = torch.stack([ancestor_mask(p) for p in parents])  # [B, N, N]
    positions = depth + torch.tensor(target.lengths, device=dev)[:, None]  # [B, N]
    mark = target.columns
    logits = target.forward(tokens, positions, real, anc, mark)  # [B, N, V]
    # 3. accept: greedy rows together (one host read), sampled rows each with its own generator
    verdicts: list[Verdict | None] = [None] * n_rows
    greedy = [b for b, s in enumerate(seqs) if not s.params.do_sample]
    if greedy:
        idx = torch.tensor(greedy, device=dev)
        ld = logits.device
        rows = verify_greedy_rows(tokens[idx].to(ld), parents[idx].to(ld), depth[idx].to(ld), real[idx].to(ld),
                                  logits[idx.to(ld)], anc[idx].to(ld))
        for b, v in zip(greedy, rows):
            verdicts[b] = v
    for b, s in enumerate(seqs):
        if s.params.do_sample:
            d = s.drafter
            drawn = DraftQ(d, logits.shape[-1], logits.device) if d is not None and d.sampled and not skip_draft else None
            verdicts[b] = verify_sampling(seen[b], LazyProbs(logits[b, : len(seen[b])], s.params), s.generator, drawn)
    # 4. compact: each row keeps its accepted path, in both caches
    target.keep(mark, [[mark + i for i in v.path] for v in verdicts])
    for rows, members in groups:
        cols = []
        for b in members:
            start, fed_cols = fed_at[b]
            # a greedy row's step is charged the padded width it was verified at (a sampled row's
            # observations stay those it makes alone)
            keep = seqs[b].drafter.accepted_fed(trees[b], verdicts[b].path,
                                                None if seqs[b].params.do_sample else width)
            cols.append([start + fed_cols[k] for k in keep])
        rows.keep(fed_at[members[0]][0], cols)
    t2 = time.perf_counter()
    # 5. emit, per sequence
    results = []
    for b, s in enumerate(seqs):
        s.target.forwards += 1
        s.stats.t_draft += t1 - t0
        s.stats.t_verify += t2 - t1
        s.stats.record(len(trees[b]), len(verdicts[b].path) - 1, batch=n_rows)
        if s.drafter is not None:
            s.stats.draft_forwards = s.drafter.runner.forwards
        emitted = s.emit(verdicts[b].emitted(trees[b]))
        rows = None
        if s.keep_logits:  # row i: the distribution the i-th emitted token was chosen from
            rows = logits[b, torch.tensor(verdicts[b].path[: len(emitted)], device=logits.device)]
        results.append(StepResult(s, emitted, trees[b], verdicts[b], rows))
    return results


def _draft_group(rows: Rows, drafters: list[Drafter], roots: list[int]):
    """Grow one tree per drafter, every draft forward batched over the group's rows. Returns the
    trees and, per row, (tree block start column, columns of its fed nodes relative to it, in
    fed order) for `accepted_fed`'s offsets."""
    n_rows = len(drafters)
    dev = rows.pos.device
    # 1a. the pending chains (each row's committed tokens not yet in its cache, root last),
    #     right-aligned (pads first) so that every row's root is the last column: only its
    #     logits are computed, as a sequence alone computes them (`logits_to_keep=1`)
    #     A row whose drafter makes a plain step this step (begin: [], a calibrated drafter when
    #     drafting does not pay) feeds nothing, as alone: its tree is the root alone.
    pending = [d.begin(r) for d, r in zip(drafters, roots)]
    k = [len(p) for p in pending]
    width = max(k)
    if width:
        tokens = torch.tensor([[p[0] if p else r] * (width - len(p)) + p for p, r in zip(pending, roots)],
                              device=dev)  # [B, K]
        positions = torch.tensor([[rows.lengths[b] + max(0, j - (width - k[b])) for j in range(width)]
                                  for b in range(n_rows)], device=dev)  # [B, K]
        real = torch.arange(width, device=dev)[None, :] >= torch.tensor([width - n for n in k], device=dev)[:, None]
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        visible = (causal[None] & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=dev)[None]
        with batch_rows(k, last=True):  # an int8 draft quantizes each row's tokens as that sequence alone would
            logits = rows.forward(tokens, positions, real, visible, rows.columns, logits_to_keep=1)  # [B, 1, V]
    for b, d in enumerate(drafters):
        if k[b]:
            rows.lengths[b] += k[b]
            d.root_pos = rows.lengths[b] - 1
            d.runner.forwards += 1
    mark = rows.columns  # the tree block starts here
    fronts = [d.grow(logits[b, -1:]) if k[b] else None for b, d in enumerate(drafters)]
    fed_cols: list[list[int]] = [[] for _ in drafters]
    # 1b. per depth, every row's frontier in one forward (a done row feeds one masked pad)
    while any(f is not None for f in fronts):
        width = max(f.numel() for f in fronts if f is not None)
        block = rows.columns - mark  # tree-block columns so far
        tokens = torch.zeros(n_rows, width, dtype=torch.long, device=dev)
        positions = torch.zeros(n_rows, width, dtype=torch.long, device=dev)
        real = torch.zeros(n_rows, width, dtype=torch.bool, device=dev)
        visible = torch.zeros(n_rows, width, block + width, dtype=torch.bool, device=dev)
        visible[:, :, block:] = torch.eye(width, dtype=torch.bool, device=dev)  # each query itself
        for b, (d, f) in enumerate(zip(drafters, fronts)):
            positions[b] = max(rows.lengths[b] - 1, 0)  # a done row's pad: any position (masked)
            if f is None:
                continue
            n = f.numel()
            f = f.to(dev)
            tokens[b, :n] = d.tokens[f].to(dev)
            positions[b, :n] = d.root_pos + d.depth[f].to(dev)
            real[b, :n] = True
            if fed_cols[b]:  # fed ancestors: the fed nodes' columns, in fed order
                anc = ancestor_mask(d.parents).to(dev)  # [N, N]
                visible[b, :n, torch.tensor(fed_cols[b], device=dev)] = anc[f][:, d.fed.to(dev)]
        with batch_rows([0 if f is None else f.numel() for f in fronts]):
            logits = rows.forward(tokens, positions, real, visible, mark)  # [B, F, V]
        for b, (d, f) in enumerate(zip(drafters, fronts)):
            if f is None:
                continue
            n = f.numel()
            fed_cols[b] += range(block, block + n)
            d.runner.forwards += 1
            fronts[b] = d.grow(logits[b, :n])
    return [d.tree() for d in drafters], [(mark, c) for c in fed_cols]


def _pad(t: torch.Tensor, width: int, value) -> torch.Tensor:
    if t.numel() == width:
        return t
    fill = value if torch.is_tensor(value) else torch.tensor(value, dtype=t.dtype, device=t.device)
    return torch.cat([t, fill.reshape(1).expand(width - t.numel())])
