"""Golden masks, positions and paths for hand-written trees."""

import pytest
import torch

from specllava.core.tree import (
    Tree,
    ancestor_mask,
    attention_bias,
    chain_choices,
    position_ids,
    root_paths,
    validate_choices,
)


def make_tree(parents, tokens=None):
    parents = torch.tensor(parents)
    depth = torch.zeros_like(parents)
    for i, p in enumerate(parents.tolist()):
        depth[i] = 0 if p < 0 else depth[p] + 1
    tokens = torch.tensor(tokens) if tokens is not None else torch.arange(len(parents)) + 10
    return Tree(tokens, parents, depth, torch.ones(len(parents)))


CHAIN = [-1, 0, 1, 2]
TWO_BY_TWO = [-1, 0, 0, 1, 1, 2, 2]  # root, two children, each with two children
UNBALANCED = [-1, 0, 0, 1, 3, 2]  # 0-1-3-4 deep branch, 0-2-5 shorter one


@pytest.mark.parametrize(
    "parents, mask, depth, paths",
    [
        (
            CHAIN,
            [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],
            [0, 1, 2, 3],
            [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]],
        ),
        (
            TWO_BY_TWO,
            [
                [1, 0, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0, 0],
                [1, 0, 1, 0, 0, 0, 0],
                [1, 1, 0, 1, 0, 0, 0],
                [1, 1, 0, 0, 1, 0, 0],
                [1, 0, 1, 0, 0, 1, 0],
                [1, 0, 1, 0, 0, 0, 1],
            ],
            [0, 1, 1, 2, 2, 2, 2],
            [[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 2, 6]],
        ),
        (
            UNBALANCED,
            [
                [1, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [1, 0, 1, 0, 0, 0],
                [1, 1, 0, 1, 0, 0],
                [1, 1, 0, 1, 1, 0],
                [1, 0, 1, 0, 0, 1],
            ],
            [0, 1, 1, 2, 3, 2],
            [[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 3, 4], [0, 2, 5]],
        ),
    ],
    ids=["chain", "2x2", "unbalanced"],
)
def test_golden_mask_positions_paths(parents, mask, depth, paths):
    tree = make_tree(parents)
    assert ancestor_mask(tree.parents).int().tolist() == mask
    assert tree.depth.tolist() == depth
    assert position_ids(tree, prefix_len=7).tolist() == [7 + d for d in depth]
    assert root_paths(tree.parents) == paths


def test_deep_chain_mask_is_lower_triangular():
    n = 40  # deeper than any doubling shortcut could fake
    tree = make_tree([-1] + list(range(n - 1)))
    assert torch.equal(ancestor_mask(tree.parents), torch.ones(n, n, dtype=torch.bool).tril())


def test_attention_bias_layout():
    tree = make_tree(TWO_BY_TWO)
    bias = attention_bias(ancestor_mask(tree.parents), prefix_len=3, dtype=torch.float32)
    assert bias.shape == (1, 1, 7, 10)
    assert (bias[0, 0, :, :3] == 0).all()  # every node sees the whole prefix
    visible = bias[0, 0, :, 3:] == 0
    assert torch.equal(visible, ancestor_mask(tree.parents))
    assert bias[0, 0, 3, 3 + 2] == torch.finfo(torch.float32).min  # node 3 cannot see its uncle 2


def test_select_reindexes_parents():
    tree = make_tree(UNBALANCED, tokens=[5, 6, 7, 8, 9, 4])
    sub = tree.select(torch.tensor([0, 2, 5]))
    assert sub.parents.tolist() == [-1, 0, 1]
    assert sub.tokens.tolist() == [5, 7, 4]
    assert sub.depth.tolist() == [0, 1, 2]


def test_choices():
    assert chain_choices(3) == [(0,), (0, 0), (0, 0, 0)]
    assert validate_choices([[1], [0, 0], [0]]) == [(0,), (1,), (0, 0)]
    with pytest.raises(ValueError, match="no parent"):
        validate_choices([(0,), (1, 0)])
    with pytest.raises(ValueError, match="empty path"):
        validate_choices([()])
