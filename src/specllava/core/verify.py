"""Verification: pure functions of (tree, target output[, generator]) -> accepted path + bonus.

Words used throughout:
  p               the target's (processed) distribution at a node, i.e. over the token after it;
  accepted token  a draft token on the accepted path: the target would have emitted it itself;
  rejected token  a draft token the target did not take;
  bonus token     the one token the target itself contributes per verification: its own choice
                  after the last accepted node (argmax at T=0, a draw from what is left at T>0).
A step therefore emits len(accepted path) - 1 draft tokens + 1 bonus token; the *mean accepted
length* is that count averaged over target forwards.

No model and no cache in here: everything is tensors in, tensors/ints out, so each rule can be
tested on hand-made trees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import Tree


@dataclass
class Verdict:
    path: list[int]  # accepted node indices, root first (the root is always on it)
    bonus: int  # bonus token id
    tokens: list[int] | None = None  # the path's tokens, root first, when the rule read them already
    index: torch.Tensor | None = None  # [len(path)] the path on the logits' device, when the rule has it

    def emitted(self, tree: Tree) -> list[int]:
        """Tokens this step emits: the accepted draft tokens, then the bonus token."""
        if self.tokens is not None:
            return self.tokens[1:] + [self.bonus]
        return [int(t) for t in tree.tokens[self.path[1:]].tolist()] + [self.bonus]


def verify_greedy(tree: Tree, logits: torch.Tensor, anc: torch.Tensor) -> Verdict:
    """Greedy rule: walk from the root, taking the child equal to the target's argmax.

    logits: [N, V] target logits at every node.  anc: [N, N] ancestor mask of the tree.
    Vectorised: a node is accepted iff it and all its ancestors match the argmax at their parent.
    Siblings carry distinct tokens, so at most one child per node can match and the accepted
    nodes form a single path; its deepest node gives the bonus token.
    """
    # as generate() does: float32 logits, then argmax (same first-index tie-break; on the CPU a
    # bf16 argmax is also ~4x slower than the cast plus a float32 argmax)
    argmax = logits.float().argmax(dim=-1)  # [N]
    match = tree.tokens == argmax[tree.parents.clamp(min=0)]  # [N]
    match[0] = True  # the root is already emitted
    accepted = ~(anc & ~match[None, :]).any(dim=1)  # [N]: every node on the root path matches
    depth = torch.where(accepted, tree.depth, -1)
    last = depth.argmax()
    # host sync, the one of a greedy verification: the bonus token, the path's membership, the tokens
    n = tree.tokens.shape[0]
    row = torch.cat([argmax[last].view(1), anc[last].long(), tree.tokens]).tolist()
    path = [i for i, on in enumerate(row[1 : 1 + n]) if on]  # ancestors in index order = root first
    # the same path as a device index (the cache compaction's, no upload): a stable sort puts the
    # path's nodes first, in index order. E.g. on-path [1, 0, 1, 1, 0] -> [0, 2, 3, 1, 4][:3]
    index = torch.sort((~anc[last]).to(torch.uint8), stable=True).indices[: len(path)]
    return Verdict(path=path, bonus=int(row[0]), tokens=[row[1 + n + i] for i in path], index=index)


def verify_greedy_rows(tokens: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor, real: torch.Tensor,
                       logits: torch.Tensor, anc: torch.Tensor) -> list[Verdict]:
    """`verify_greedy` for B trees at once, padded to N nodes; one host read for all of them.

    tokens, parents, depth, real: [B, N] (real False: padding, never accepted; a pad's parent
    is -1). logits: [B, N, V]. anc: [B, N, N] ancestor masks (a pad sees only itself).
    """
    argmax = logits.float().argmax(dim=-1)  # [B, N], as generate(): float32 logits, first max
    match = tokens == argmax.gather(1, parents.clamp(min=0))  # [B, N]
    match[:, 0] = True  # the roots are already emitted
    match &= real
    accepted = ~(anc & ~match[:, None, :]).any(dim=2)  # [B, N]
    last = torch.where(accepted, depth, -1).argmax(dim=1)  # [B]
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    n = tokens.shape[1]
    # the one read-back of a batched greedy step: per row the bonus, the path's membership, the tokens
    read = torch.cat([argmax[rows, last][:, None], anc[rows, last].long(), tokens], dim=1).tolist()
    out = []
    for row in read:
        path = [i for i, on in enumerate(row[1 : 1 + n]) if on]
        out.append(Verdict(path=path, bonus=int(row[0]), tokens=[row[1 + n + i] for i in path]))
    return out


def verify_sampling(tree: Tree, p, generator: torch.Generator | None, q=None) -> Verdict:
    """Lossless multi-candidate rule. Two cases per node, both exact (docs/algorithms.md):

    p: [N, V] processed target distribution at every node (rows are read lazily: `p[node]`), on
       any device.
    generator: a CPU generator (the uniforms are drawn on the CPU, see `_uniform`).
    q: optional; `q[node]` is the draft distribution the node's children were *drawn* from,
       without replacement, in tree order (sampled drafting): a [V] row, or a pair (ids, values)
       giving its nonzero part, `ids` [K] ascending token ids (a reduced draft vocabulary).
       Nodes without it (q None, or `node not in q`: children chosen deterministically) use the
       first rule.

    Candidates fixed by the draft: at the current node, with children x1..xk in draft order,
    accept x1 with probability p(x1); if rejected, set p(x1) = 0, renormalise and try x2 the same
    way. Each emitted token is an ordinary draw from p, performed one candidate at a time.

    Candidates drawn from q (recursive rejection sampling without replacement): accept x_i with
    probability min(1, r(x_i) / q_i(x_i)); if rejected, r <- normalise(max(0, r - q_i)) and
    q_{i+1} <- q_i with x_i removed, renormalised. A good draft is accepted with probability
    sum(min(p, q)) instead of p(x), which matters when p is flat (high temperature).

    If one child is accepted, move to it and repeat with its own p; if none (or the node has no
    children), the bonus token is drawn from what is left of r.

    Cost: one uniform per candidate tried, and vocabulary-wide work only where the rule needs it:
    the first rule reads p at the candidates plus one sum, and changes r only at rejected
    candidates (zeroed, for the bonus draw); the second keeps r as a scalar multiple of p outside
    q's support and updates it densely only on the support (the draft's K ids). The accept/reject
    decisions and draws are those of `reference_verify_sampling`, the rule written over full
    float64 vectors (tests/core/test_verify.py checks both on random trees).
    """
    parents = tree.parents.tolist()
    tokens = tree.tokens.tolist()
    children: list[list[int]] = [[] for _ in parents]
    for i, par in enumerate(parents):
        if par >= 0:
            children[par].append(i)
    node, path = 0, [0]
    while True:
        kids = children[node]
        prow = p[node]  # [V]
        if not kids:
            return Verdict(path=path, bonus=draw(prow, generator), tokens=[tokens[i] for i in path])
        if q is not None and node in q:
            child, bonus = _drawn_candidates(prow, q[node], kids, tokens, generator)
        else:
            child, bonus = _fixed_candidates(prow, kids, tokens, generator)
        if child is None:
            return Verdict(path=path, bonus=bonus, tokens=[tokens[i] for i in path])
        node = child
        path.append(child)


def _fixed_candidates(prow: torch.Tensor, kids: list[int], tokens: list[int], generator):
    """Candidates fixed by the draft: (accepted child, None) or (None, bonus token). Only p at the
    candidates and p's sum are read; rejected candidates are zeroed for the bonus draw alone."""
    cand = torch.tensor([tokens[c] for c in kids], dtype=torch.long, device=prow.device)
    row = prow.double()
    vals = torch.cat([row.sum().view(1), row[cand]]).tolist()  # one read-back
    total = vals[0]
    for j, child in enumerate(kids):
        if _uniform(generator) * total < vals[1 + j]:  # accept w.p. r(x) / sum(r)
            return child, None
        total -= vals[1 + j]  # r(x) <- 0
    row = row.clone()
    row[cand] = 0.0
    return None, draw(row, generator)


def _drawn_candidates(prow: torch.Tensor, qrow, kids: list[int], tokens: list[int], generator):
    """Candidates drawn from q: (accepted child, None) or (None, bonus token).

    r is kept as c * p outside q's support S (where max(0, r/R - q/Q) = r/R, so each rejection
    only rescales it) and as a dense vector on S; the sums over the vocabulary are the scalar
    c * (sum p - sum p[S]) plus a sum over S."""
    if isinstance(qrow, tuple):
        ids, qs = qrow
        ids = ids.to(prow.device)
        qs = qs.to(prow.device).double()
    else:
        ids, qs = None, qrow.to(prow.device).double()
    row = prow.double()
    rs = row if ids is None else row[ids]  # r on the support, [K]
    cand = torch.tensor([tokens[c] for c in kids], dtype=torch.long, device=prow.device)
    col = cand if ids is None else torch.searchsorted(ids, cand)  # candidates' positions in S
    outside = 0.0 if ids is None else row.sum() - rs.sum()  # p's mass outside S (a 0-d tensor)
    c = 1.0  # r = c * p outside S
    qs = qs.clone()
    qsum = qs.sum()
    for j, child in enumerate(kids):
        u = _uniform(generator)
        total = rs.sum() + c * outside
        # accept w.p. min(1, r(x)/q(x)), both normalised (one read-back)
        k = col[j]
        if bool(u * qs[k] * total < rs[k] * qsum):
            return child, None
        rs = (rs / total - qs / qsum).clamp_(min=0.0)
        c = c / total
        qs[k] = 0.0
        qsum = qs.sum()
    if ids is None:
        return None, draw(rs, generator)
    full = row * c
    full[ids] = rs
    return None, draw(full, generator)


def reference_verify_sampling(tree: Tree, p, generator: torch.Generator | None, q=None) -> Verdict:
    """`verify_sampling` written plainly over full-vocabulary float64 vectors, one candidate at a
    time: the definition the fast rule is tested against (same uniforms, same verdicts)."""
    parents = tree.parents.tolist()
    children: list[list[int]] = [[] for _ in parents]
    for i, par in enumerate(parents):
        if par >= 0:
            children[par].append(i)
    tokens = tree.tokens.tolist()
    node, path = 0, [0]
    while True:
        residual = p[node].double().clone()  # [V]; float64 so repeated renormalising stays exact
        drawn = q is not None and bool(children[node]) and node in q
        if drawn:
            qrow = q[node]
            if isinstance(qrow, tuple):
                ids, vals = qrow
                qi = torch.zeros_like(residual)
                qi[ids.to(qi.device)] = vals.to(qi.device).double()
            else:
                qi = qrow.to(residual.device).double().clone()
        moved = False
        for child in children[node]:
            tok = tokens[child]
            total = residual.sum()
            u = _uniform(generator)
            if drawn:  # accept w.p. min(1, r(x)/q(x)), both normalised
                accept = bool(u * qi[tok] * total < residual[tok] * qi.sum())
            else:  # accept w.p. r(x)
                accept = bool(u * total < residual[tok])
            if accept:
                node, moved = child, True
                path.append(child)
                break
            if drawn:
                residual = (residual / total - qi / qi.sum()).clamp_(min=0.0)
                qi[tok] = 0.0
            else:
                residual[tok] = 0.0
        if not moved:
            return Verdict(path=path, bonus=draw(residual, generator), tokens=[tokens[i] for i in path])


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability weights[i] / weights.sum() (weights >= 0, not all zero).

    Inverse CDF with a single uniform: the first i whose cumulative weight exceeds u * total, so
    zero-weight entries are never drawn. torch.multinomial draws one exponential variate per entry
    instead: a random number for each of the ~49k vocabulary entries, every step.
    """
    cdf = torch.cumsum(weights.double(), dim=0)
    u = _uniform(generator) * cdf[-1]
    i = int(torch.searchsorted(cdf, u, right=True))
    if i >= cdf.numel():  # u rounded up to the total: the last entry that has weight
        i = int(torch.nonzero(weights).max())
    return i


def _uniform(generator: torch.Generator | None) -> float:
    """One uniform draw in [0, 1), made on the CPU on purpose: a handful per step, compared with
    values the loop reads back anyway, and the same draws whatever device the models sit on
    (a CPU generator; None = torch's default one)."""
    device = generator.device if generator is not None else "cpu"  # never the default device
    return float(torch.rand((), generator=generator, dtype=torch.float64, device=device))
