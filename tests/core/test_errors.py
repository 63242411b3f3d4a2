"""Bad input gets a clear ValueError naming the problem."""

import pytest
import torch

from random_models import llava_prompt, text_prompt, tiny_lm, tiny_llava
from specllava import SpeculativeDecoder


@pytest.fixture(scope="module")
def target():
    return tiny_llava(0)


@pytest.fixture(scope="module")
def draft():
    return tiny_lm(1, hidden=32, layers=1)


def test_vocabulary_mismatch(target):
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        SpeculativeDecoder(target, tiny_lm(2, vocab=64), method="dynamic")


def test_unknown_method(target, draft):
    with pytest.raises(ValueError, match="unknown method 'beam'"):
        SpeculativeDecoder(target, draft, method="beam")


def test_method_needs_a_draft(target):
    with pytest.raises(ValueError, match="needs a draft"):
        SpeculativeDecoder(target, None, method="chain")


def test_unknown_tree_option(target, draft):
    with pytest.raises(ValueError, match="unknown tree option"):
        SpeculativeDecoder(target, draft, method="dynamic", node_bugdet=8)


def test_bad_tree_option_value(target, draft):
    with pytest.raises(ValueError, match="child_mass"):
        SpeculativeDecoder(target, draft, method="dynamic", child_mass=1.5)
    with pytest.raises(ValueError, match="min_feed_mass"):
        SpeculativeDecoder(target, draft, method="dynamic", min_feed_mass=-0.1)


@pytest.mark.parametrize(
    "make_kwargs, message",
    [
        (lambda ids, px: dict(input_ids=ids[:, :0], pixel_values=px), "empty prompt"),
        (lambda ids, px: dict(input_ids=ids, pixel_values=px, max_new_tokens=0), "max_new_tokens must be >= 1"),
        (lambda ids, px: dict(input_ids=ids.repeat(2, 1), pixel_values=px), "1 images but 2 rows have image tokens"),
        (lambda ids, px: dict(input_ids=ids, pixel_values=None), "image tokens but no pixel_values"),
        (lambda ids, px: dict(input_ids=ids[:, -4:], pixel_values=px), "no image tokens"),
        (lambda ids, px: dict(input_ids=ids, pixel_values=px, do_sample=True, temperature=0.0), "temperature"),
        (lambda ids, px: dict(input_ids=ids, pixel_values=px, do_sample=True, top_p=0.0), "top_p"),
        (lambda ids, px: dict(input_ids=ids, pixel_values=px, attention_mask=torch.zeros_like(ids)), "padding"),
    ],
    ids=["empty", "max_new_tokens", "batch", "image-no-pixels", "pixels-no-image", "temperature", "top_p", "padding"],
)
def test_bad_generate_arguments(target, draft, make_kwargs, message):
    ids, px = llava_prompt(0)
    with pytest.raises(ValueError, match=message):
        SpeculativeDecoder(target, draft, method="dynamic").generate(**make_kwargs(ids, px))


def test_pixel_values_for_text_only_target(draft):
    target = tiny_lm(3)
    _, px = llava_prompt(0)
    with pytest.raises(ValueError, match="text-only"):
        SpeculativeDecoder(target, draft, method="chain").generate(input_ids=text_prompt(0), pixel_values=px)


def test_vision_draft_for_text_only_target(target):
    with pytest.raises(ValueError, match="vision-language draft needs a vision-language target"):
        SpeculativeDecoder(tiny_lm(3), target, method="chain")


def test_bad_draft_vocab(target, draft):
    with pytest.raises(ValueError, match="draft_vocab=0"):
        SpeculativeDecoder(target, draft, method="dynamic", draft_vocab=0)
    with pytest.raises(ValueError, match="draft_vocab ids"):
        SpeculativeDecoder(target, draft, method="dynamic", draft_vocab=torch.tensor([5, 10_000]))
