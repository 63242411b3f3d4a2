"""The dynamic tree's node budget: 32 at T=0 and 8 when sampling unless node_budget is given."""

import pytest
import torch
from random_models import llava_prompt

from specllava import SpeculativeDecoder
from specllava.core.config import GREEDY_NODE_BUDGET, SAMPLED_NODE_BUDGET, TreeConfig

# a draft close to the target with permissive growth: trees fill whatever budget they get
WIDE = dict(min_path_conf=0.0, min_feed_mass=0.0, max_children=4, frontier=8, max_depth=6)


def test_budget_resolution():
    assert (GREEDY_NODE_BUDGET, SAMPLED_NODE_BUDGET) == (32, 8)
    cfg = TreeConfig()
    assert cfg.node_budget is None
    assert (cfg.budget(sampled=False), cfg.budget(sampled=True)) == (32, 8)
    assert TreeConfig(node_budget=12).budget(True) == TreeConfig(node_budget=12).budget(False) == 12
    with pytest.raises(ValueError):
        TreeConfig(node_budget=0)


def _largest_tree(target, draft, options, **gen):
    sizes = []
    dec = SpeculativeDecoder(target, draft, method="dynamic", draft_quant="none", **options)
    for seed in range(3):
        ids, px = llava_prompt(seed)
        dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=24, seed=seed,
                     on_step=lambda tree, verdict: sizes.append(len(tree) - 1), **gen)
    return max(sizes)


@torch.inference_mode()
def test_default_budget_depends_on_sampling(tiny_pair):
    target, draft = tiny_pair
    assert SAMPLED_NODE_BUDGET < _largest_tree(target, draft, WIDE) <= GREEDY_NODE_BUDGET
    assert _largest_tree(target, draft, WIDE, do_sample=True, temperature=1.0) == SAMPLED_NODE_BUDGET


@torch.inference_mode()
def test_explicit_budget_applies_when_sampling(tiny_pair):
    target, draft = tiny_pair
    assert _largest_tree(target, draft, dict(WIDE, node_budget=20), do_sample=True, temperature=1.0) == 20
