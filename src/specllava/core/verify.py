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
    # the one read-back of a greedy step: the bonus token, the accepted path's membership, the tokens
    n = tree.tokens.shape[0]
    row = torch.cat([argmax[last].view(1), anc[last].long(), tree.tokens]).tolist()
    path = [i for i, on in enumerate(row[1 : 1 + n]) if on]  # ancestors in index order = root first
    return Verdict(path=path, bonus=int(row[0]), tokens=[row[1 + n + i] for i in path])


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


def verify_sampling(tree: Tree, p: torch.Tensor, generator: torch.Generator | None, q=None) -> Verdict:
    """Lossless multi-candidate rule. Two cases per node, both exact (docs/algorithms.md):

    p: [N, V] processed target distribution at every node (rows are read lazily), on any device.
    generator: a CPU generator (the uniforms are drawn on the CPU, see `_uniform`).
    q: optional; `q(node)` -> [V] the draft distribution the node's children were *drawn* from,
       without replacement, in tree order (sampled drafting). Nodes without it (q None, or a
       node whose children were chosen deterministically) use the first rule.

    Candidates fixed by the draft: at the current node, with children x1..xk in draft order,
    accept x1 with probability p(x1); if rejected, set p(x1) = 0, renormalise and try x2 the same
    way. Each emitted token is an ordinary draw from p, performed one candidate at a time.

    Candidates drawn from q (recursive rejection sampling without replacement): accept x_i with
    probability min(1, r(x_i) / q_i(x_i)); if rejected, r <- normalise(max(0, r - q_i)) and
    q_{i+1} <- q_i with x_i removed, renormalised. A good draft is accepted with probability
    sum(min(p, q)) instead of p(x), which matters when p is flat (high temperature).

    If one child is accepted, move to it and repeat with its own p; if none (or the node has no
    children), the bonus token is drawn from what is left of r.
    """
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
            qi = q[node].double().clone()
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
    return float(torch.rand((), generator=generator, dtype=torch.float64))
