"""The draft reuses the target's vision features at prefill when its vision tower is the target's."""

import copy

import pytest
import torch
from random_models import llava_prompt, perturbed_copy, tiny_llava

from specllava import SpeculativeDecoder
from specllava.core.runner import ModelRunner
from specllava.core.vision import capture_projector_input, draft_image_inputs, shares_vision_tower


@pytest.fixture(scope="module")
def target():
    return tiny_llava(0)


def _sharing_draft(target, seed=3):
    """A smaller LLaVA draft whose vision tower is a copy of the target's (as train-draft makes)."""
    draft = tiny_llava(seed, hidden=32, layers=1)
    draft.model.vision_tower.load_state_dict(target.model.vision_tower.state_dict())
    return draft


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_shares_only_an_identical_tower(target):
    assert shares_vision_tower(target, _sharing_draft(target))
    assert not shares_vision_tower(target, tiny_llava(3, hidden=32, layers=1))  # other weights
    assert not shares_vision_tower(target, perturbed_copy(target, 0.01, seed=1))
    other = _sharing_draft(target)
    other.config.vision_feature_select_strategy = "full"
    assert not shares_vision_tower(target, other)
    assert not shares_vision_tower(target, None)


@torch.inference_mode()
def test_reused_features_give_the_drafts_own_prefill(target):
    """The draft's prefill logits and cache are those of its own forward with pixel_values."""
    draft = _sharing_draft(target)
    ids, px = llava_prompt(2)
    with capture_projector_input(target) as seen:
        target(input_ids=ids, pixel_values=px)
    assert len(seen) == 1
    own, reused = ModelRunner(draft), ModelRunner(draft)
    a = own.prefill(ids, pixel_values=px)
    b = reused.prefill(ids, mm_encoder_outputs=draft_image_inputs(draft, seen[0]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert own.length == reused.length
    assert torch.equal(own.cache.layers[0].keys, reused.cache.layers[0].keys)


@torch.inference_mode()
@pytest.mark.parametrize("method", ["chain", "dynamic"])
def test_generate_skips_the_drafts_vision_tower_and_stays_exact(target, method):
    draft = _sharing_draft(target)
    calls = _count_calls(draft.model.vision_tower)
    dec = SpeculativeDecoder(target, draft, method=method, draft_quant="none")
    assert dec.shares_vision
    for seed in range(3):
        ids, px = llava_prompt(seed)
        ref = target.generate(input_ids=ids, pixel_values=px, max_new_tokens=20, do_sample=False)
        out = dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=20)
        assert torch.equal(out.sequences, ref)
    assert calls == []  # the target's features were reused every time


@torch.inference_mode()
def test_a_different_tower_runs_its_own(target):
    draft = tiny_llava(3, hidden=32, layers=1)
    calls = _count_calls(draft.model.vision_tower)
    dec = SpeculativeDecoder(target, draft, method="dynamic", draft_quant="none")
    assert not dec.shares_vision
    ids, px = llava_prompt(1)
    dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=5)
    assert len(calls) == 1


def test_capture_ignores_other_threads(target):
    import threading

    ids, px = llava_prompt(0)
    with capture_projector_input(target) as seen:
        worker = threading.Thread(target=lambda: target(input_ids=ids, pixel_values=px))
        worker.start()
        worker.join()
    assert seen == []
    assert copy.copy(target.model.multi_modal_projector._forward_pre_hooks) == {}  # hook removed
