"""One tree forward on the cached prefix == a plain causal forward over each node's root path;
a compacted cache == a fresh prefill of the accepted sequence."""

import torch

from random_models import llava_prompt, text_prompt, tiny_lm, tiny_llava
from specllava.core.cache import compact, crop
from specllava.core.runner import ModelRunner
from specllava.core.tree import Tree, ancestor_mask, attention_bias, path_to, position_ids, root_paths

PARENTS = torch.tensor([-1, 0, 0, 1, 3, 2, 1])  # unbalanced, with siblings at two depths


def random_tree(seed):
    g = torch.Generator().manual_seed(seed)
    depth = torch.zeros_like(PARENTS)
    for i, p in enumerate(PARENTS.tolist()):
        depth[i] = 0 if p < 0 else depth[p] + 1
    tokens = torch.randint(3, 90, (len(PARENTS),), generator=g)
    return Tree(tokens, PARENTS.clone(), depth, torch.ones(len(PARENTS)))


def tree_forward(runner, tree):
    prefix = runner.length
    anc = ancestor_mask(tree.parents)
    return runner.forward(tree.tokens, position_ids(tree, prefix), attention_bias(anc, prefix, runner.dtype))


def plain_last_logits(model, ids, pixels=None):
    kw = {} if pixels is None else {"pixel_values": pixels}
    return model(input_ids=ids, **kw).logits[0, -1]


@torch.inference_mode()
def test_tree_logits_equal_root_path_forward_llava():
    model = tiny_llava(5)
    ids, px = llava_prompt(1)
    runner = ModelRunner(model)
    runner.prefill_like_generate(ids, px)
    tree = random_tree(2)
    logits = tree_forward(runner, tree)
    for node, path in enumerate(root_paths(tree.parents)):
        seq = torch.cat([ids, tree.tokens[path][None]], dim=1)
        ref = plain_last_logits(model, seq, px)
        torch.testing.assert_close(logits[node], ref, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_tree_logits_equal_root_path_forward_text_lm():
    model = tiny_lm(6)
    ids = text_prompt(3, length=12)
    runner = ModelRunner(model)
    runner.prefill(ids)
    tree = random_tree(4)
    logits = tree_forward(runner, tree)
    for node, path in enumerate(root_paths(tree.parents)):
        ref = plain_last_logits(model, torch.cat([ids, tree.tokens[path][None]], dim=1))
        torch.testing.assert_close(logits[node], ref, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_compacted_cache_equals_fresh_prefill():
    model = tiny_llava(7)
    ids, px = llava_prompt(8)
    runner = ModelRunner(model)
    runner.prefill_like_generate(ids, px)
    prefix = runner.length
    tree = random_tree(9)
    tree_forward(runner, tree)
    path = path_to(tree, 4)  # root -> 1 -> 3 -> 4
    compact(runner.cache, prefix, torch.tensor(path))
    assert runner.length == prefix + len(path)

    fresh = ModelRunner(model)
    fresh.prefill(torch.cat([ids, tree.tokens[path][None]], dim=1), pixel_values=px)
    assert fresh.length == runner.length
    for got, ref in zip(runner.cache.layers, fresh.cache.layers):
        torch.testing.assert_close(got.keys, ref.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.values, ref.values, atol=1e-5, rtol=1e-4)

    # and the next step on the compacted cache sees exactly the accepted sequence
    nxt = torch.tensor([17])
    got = runner.forward(nxt, torch.tensor([runner.length]), attention_bias(torch.ones(1, 1, dtype=torch.bool), runner.length, runner.dtype))
    ref = plain_last_logits(model, torch.cat([ids, tree.tokens[path][None], nxt[None]], dim=1), px)
    torch.testing.assert_close(got[0], ref, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_crop_drops_positions_in_every_layer():
    model = tiny_lm(1)
    runner = ModelRunner(model)
    runner.prefill(text_prompt(1, length=10))
    crop(runner.cache, 6)
    assert runner.length == 6
    assert all(layer.keys.shape[-2] == 6 and layer.values.shape[-2] == 6 for layer in runner.cache.layers)
