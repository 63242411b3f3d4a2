"""Token trees as plain tensors.

A tree holds N nodes in an order where every parent comes before its children (breadth-first in
practice). Node 0 is the *root*: the last token already emitted, whose KV is not yet in either
cache. Every other node is a draft guess for the token that follows its parent.

    tokens[N]   token id of each node                         (LongTensor)
    parents[N]  index of each node's parent, -1 for the root  (LongTensor)
    depth[N]    0 for the root, parent depth + 1 otherwise    (LongTensor)
    score[N]    draft path confidence: product of the draft probabilities along the root path
                (1.0 at the root)                              (FloatTensor)

Chains, static trees and dynamic trees are all this one type; only the functions that build them
differ. Everything a verifier needs is derived by the three functions below:
`ancestor_mask`, `position_ids` and `root_paths`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Tree:
    tokens: torch.Tensor  # [N] long
    parents: torch.Tensor  # [N] long, root = -1
    depth: torch.Tensor  # [N] long
    score: torch.Tensor  # [N] float

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.depth.max()) if len(self) else 0

    def children(self, node: int) -> torch.Tensor:
        """Indices of `node`'s children, in tree order (= draft proposal order)."""
        return (self.parents == node).nonzero().flatten()

    def select(self, keep: torch.Tensor) -> Tree:
        """Sub-tree on the ancestor-closed, ascending node indices `keep` ([M] long), re-indexed."""
        remap = torch.full((len(self),), -1, dtype=torch.long, device=self.tokens.device)
        remap[keep] = torch.arange(keep.numel(), device=keep.device)
        old_parents = self.parents[keep]
        parents = torch.where(old_parents >= 0, remap[old_parents.clamp(min=0)], old_parents)
        return Tree(self.tokens[keep], parents, self.depth[keep], self.score[keep])

    def to(self, device: torch.device | str) -> Tree:
        """The same tree on `device` (itself when it is already there): a tree drafted on the
        draft's device is verified on the target's."""
        if self.tokens.device == torch.device(device):
            return self
        return Tree(*(t.to(device) for t in (self.tokens, self.parents, self.depth, self.score)))


def root_only(token: int | torch.Tensor, device: torch.device | str = "cpu") -> Tree:
    """The trivial tree: just the root (plain autoregressive decoding verifies this)."""
    # fills, not uploads: a Python int reaches the device as a kernel argument, without a sync
    tok = token.to(device).reshape(1) if torch.is_tensor(token) else torch.full((1,), token, dtype=torch.long, device=device)
    return Tree(
        tokens=tok,
        parents=torch.full((1,), -1, dtype=torch.long, device=device),
        depth=torch.zeros(1, dtype=torch.long, device=device),
        score=torch.ones(1, device=device),
    )


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """Boolean [N, N] mask: row i is True at i and at every ancestor of i.

    Built by doubling: `reach` starts as "self or parent" and is squared ceil(log2 N) times, each
    squaring doubling the number of levels it spans. A fixed number of small matrix products and
    no read-back to the host (the mask is built on every decoding step, on the model's device).

    Example, tree   0 ── 1 ── 3          parents = [-1, 0, 0, 1]
                     └── 2
        mask = [[1,0,0,0],
                [1,1,0,0],
                [1,0,1,0],
                [1,1,0,1]]
    """
    n = parents.shape[0]
    idx = torch.arange(n, device=parents.device)
    reach = torch.zeros(n, n, dtype=torch.float32, device=parents.device)  # float: matmul-able
    reach[idx, idx] = 1.0
    reach[idx, parents.clamp(min=0)] += (parents >= 0).float()  # the root has no parent
    for _ in range(max(n - 1, 1).bit_length()):  # 2**k >= n - 1 levels after k squarings
        reach = (reach @ reach).clamp_(max=1.0)
    return reach > 0


def position_ids(tree: Tree, prefix_len: int) -> torch.Tensor:
    """Position id of every node: prefix_len + depth (not the node's index in the tree)."""
    return tree.depth + prefix_len  # [N]


def root_paths(parents: torch.Tensor) -> list[list[int]]:
    """For every node, the node indices on its path from the root (root first, node last)."""
    paths: list[list[int]] = []
    for i, p in enumerate(parents.tolist()):
        paths.append([i] if p < 0 else paths[p] + [i])
    return paths


def path_to(tree: Tree, node: int) -> list[int]:
    """Node indices from the root to `node`, root first."""
    path = []
    parents = tree.parents.tolist()
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def attention_bias(
    tree_mask: torch.Tensor,
    prefix_len: int,
    dtype: torch.dtype,
    window: int | None = None,
    query_pos: torch.Tensor | None = None,
    key_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive 4D attention mask [1, 1, n, prefix_len + m] for a forward on a cached prefix.

    tree_mask: [n, m] bool, which of the m positions after the prefix each of the n queries sees
    (for a verification forward, the tree's [N, N] ancestor mask). Every query sees the whole
    prefix; masked entries get the dtype's most negative value, as transformers' own masks do.

    window: a sliding-window model's `sliding_window` (Mistral). A query at position i then sees
    only keys at positions j > i - window, as transformers' `sliding_window_overlay` does; the
    prefix holds positions 0..prefix_len-1, query_pos [n] and key_pos [m] are the positions of
    the queries and of the m keys after the prefix.
    """
    n = tree_mask.shape[0]
    visible = torch.cat(
        [torch.ones(n, prefix_len, dtype=torch.bool, device=tree_mask.device), tree_mask], dim=1
    )
    if window is not None:
        keys = torch.cat([torch.arange(prefix_len, device=tree_mask.device), key_pos.to(tree_mask.device)])
        visible &= keys[None, :] > query_pos.to(tree_mask.device)[:, None] - window
    bias = torch.zeros(visible.shape, dtype=dtype, device=tree_mask.device)
    bias.masked_fill_(~visible, torch.finfo(dtype).min)
    return bias[None, None]  # [1, 1, N, prefix_len + N]


def chain_choices(length: int) -> list[tuple[int, ...]]:
    """Static-tree choices of a chain of `length` guesses: [(0,), (0, 0), (0, 0, 0), ...]."""
    return [(0,) * d for d in range(1, length + 1)]


def validate_choices(choices: list[tuple[int, ...]] | list[list[int]]) -> list[tuple[int, ...]]:
    """Sort static-tree choices breadth-first and check that every prefix is present.

    A choice is the path of draft ranks from the root: (0, 1) is the second-best child of the
    root's best child (Medusa / SpecInfer notation).
    """
    out = sorted({tuple(int(r) for r in c) for c in choices}, key=lambda c: (len(c), c))
    seen = set(out)
    for c in out:
        if not c:
            raise ValueError("static tree choices must not contain the empty path (the root is implicit)")
        if min(c) < 0:
            raise ValueError(f"static tree choice {c} has a negative rank")
        if len(c) > 1 and c[:-1] not in seen:
            raise ValueError(f"static tree choice {c} has no parent {c[:-1]} in the choices")
    return out
