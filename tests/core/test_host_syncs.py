"""Host syncs per decoding step, counted on the CPU (`core.syncs.HostSyncCounter`): a greedy step
that drafts d levels makes at most 2 d + 4 of them, however many layers the target has
(docs/models.md lists each one), with either draft kind and either target path. d is the tree's
depth, unless the node budget then drops the deepest levels drafted."""

import pytest
import torch

from random_models import perturbed_copy, text_prompt, tiny_lm
from specllava import SpeculativeDecoder
from specllava.core.cache import KVBuffer, compact
from specllava.core.eagle import EagleHead
from specllava.core.syncs import HostSyncCounter, count_generation

LAYERS = 32
DEEP = dict(max_depth=6, min_feed_mass=0.0, min_path_conf=0.0)  # trees several levels deep


def test_the_counter_sees_every_kind_of_host_sync():
    x = torch.arange(6)
    with HostSyncCounter() as syncs:
        x[0].item(), x.tolist(), bool(x[1] > 0), int(x[2]), float(x[3]), range(x[1])
        x.nonzero(), torch.nonzero(x), x[x > 2], x.unique(), x.cpu(), x.numpy()
        torch.tensor([1, 2]), torch.as_tensor([3]), x[[0, 2]]
        # not syncs: shapes, device-side work, fills and aranges with Python numbers, views
        x.shape[0], x.numel(), len(x), x + 1, x.argmax(), torch.full((2,), 5), torch.arange(3), x[1:3], x[0]
        torch.as_tensor(x)  # a tensor is already on a device: not an upload
    kinds = [kind for kind, _ in syncs.events]
    assert kinds == ["item", "tolist", "bool", "int", "float", "index", "nonzero", "nonzero", "bool index",
                     "unique", "cpu", "numpy", "upload", "upload", "list index (upload)"]
    assert all(place.startswith("core/test_host_syncs.py:") for _, place in syncs.events), syncs.events


def test_the_counter_would_catch_a_per_layer_index_upload():
    """Compaction must move its index to the device once, not per layer (the bound below would
    fail by 2 x layers): with a host list it uploads once; with the index given, never; an
    identity prefix is a crop."""
    shape = (1, 2, 10, 4)
    buf = KVBuffer([torch.randn(shape) for _ in range(LAYERS)], [torch.randn(shape) for _ in range(LAYERS)], 8)
    with HostSyncCounter() as syncs:
        compact(buf, 3, [0, 2, 4])
    assert [kind for kind, _ in syncs.events] == ["upload"] and buf.length == 6
    index = torch.tensor([1, 3])  # as the verification leaves it on the device
    with HostSyncCounter() as syncs:
        compact(buf, 2, [1, 3], index=index)
        compact(buf, 1, [0, 1])
    assert syncs.events == [] and buf.length == 3
    with HostSyncCounter() as syncs:  # what one upload per layer, for keys and for values, costs
        for store in (buf.keys, buf.values):
            for t in store:
                t.index_select(-2, torch.tensor([0, 1]))
    assert len(syncs.events) == 2 * LAYERS


def _count(decoder, ids, **gen):
    return count_generation(decoder, ids, 40, **gen)


@pytest.fixture(scope="module")
def deep_target():
    return tiny_lm(0, layers=LAYERS, hidden=32)


@pytest.fixture(scope="module")
def drafts(deep_target):
    torch.manual_seed(5)
    return {"draft model": perturbed_copy(deep_target, 0.02, seed=1), "eagle head": EagleHead.from_target(deep_target)}


@pytest.mark.parametrize("target_lean", [True, False], ids=["exact-lean-target", "transformers-target"])
@pytest.mark.parametrize("method, options", [("ar", {}), ("chain", {}), ("static", {}), ("dynamic", {}),
                                             ("dynamic", DEEP)], ids=["ar", "chain", "static", "dynamic", "dynamic-deep"])
@pytest.mark.parametrize("draft_kind", ["draft model", "eagle head"])
def test_a_greedy_step_makes_at_most_2_depth_plus_4_host_syncs(deep_target, drafts, draft_kind, method, options,
                                                                 target_lean):
    if method == "ar" and draft_kind == "eagle head":
        pytest.skip("plain decoding has no draft")
    dec = SpeculativeDecoder(deep_target, None if method == "ar" else drafts[draft_kind], method=method,
                             target_lean=target_lean, **options)
    syncs, depths, out = _count(dec, text_prompt(3, 12))
    per_step = syncs.per_step()
    assert len(per_step) >= 5 and len(per_step) == len(depths)
    for i, (n, d) in enumerate(zip(per_step, depths)):
        assert n <= 2 * d + 4, f"step {i}: {n} host syncs at depth {d}: {dict(syncs.step_events(i))}"
    if method == "ar":
        assert set(per_step) == {1}  # the verification's one read: the token
    if options:
        assert max(depths) >= 3  # the deep trees are deep (the bound is tested where it binds)
    if method != "ar" and draft_kind == "draft model":
        assert out.stats["mean_accepted"] > 1.5


def test_the_count_does_not_grow_with_the_layers(drafts, deep_target):
    """The same draft against a 2-layer and a 32-layer target: the same syncs per step."""
    shallow = tiny_lm(0, layers=2, hidden=32)
    by_depth = []
    for target in (shallow, deep_target):
        # calibrate=False: the tree then follows the draft alone; calibrated trees follow each target's
        # acceptance, so their shapes differ (their count stays under the bound above, 32 layers)
        dec = SpeculativeDecoder(target, perturbed_copy(target, 0.02, seed=1), method="dynamic", calibrate=False,
                                 **DEEP)
        syncs, depths, _ = _count(dec, text_prompt(3, 12))
        seen = {}
        for n, d in zip(syncs.per_step(), depths):
            seen.setdefault(d, set()).add(n)
        by_depth.append(seen)
    common = set(by_depth[0]) & set(by_depth[1])
    assert common and all(by_depth[0][d] == by_depth[1][d] for d in common), by_depth
