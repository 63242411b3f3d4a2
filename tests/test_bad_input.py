"""Bad input gets one clear error before any work; unusual but valid input works.

Each case here is a row of docs/inputs.md: the API's ValueErrors (`SpeculativeDecoder`), the
command line's parse-time refusals (exit 2, one line, nothing loaded), its runtime failures
(exit 1, one line, no traceback unless --debug), and text-only prompts with every method and
every kind of draft, exact against `target.generate()`.
"""

from __future__ import annotations

import pytest
import torch

from random_models import VOCAB, llava_prompt, perturbed_copy, text_prompt, tiny_lm, tiny_llava
from specllava import SpeculativeDecoder
from specllava.core.eagle import EagleHead


@pytest.fixture(scope="module")
def target():
    return tiny_llava(0)


@pytest.fixture(scope="module")
def drafts(target):
    torch.manual_seed(5)
    head = EagleHead.from_target(target, token_ranking=list(range(40)))
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {
        "vlm": perturbed_copy(target, 0.05, seed=1),
        "text-only": tiny_lm(77, hidden=32, layers=1),
        "eagle-head": head.eval(),
    }


# ---------------------------------------------------------------------------------------------
# text-only prompts: every method, every kind of draft, exact vs target.generate()

@pytest.mark.parametrize("draft_kind", ["vlm", "text-only", "eagle-head"])
@pytest.mark.parametrize("method", ["ar", "chain", "static", "dynamic"])
def test_text_only_prompt_is_exact(target, drafts, draft_kind, method):
    ids = text_prompt(3, length=10)
    with torch.inference_mode():
        ref = target.generate(input_ids=ids, max_new_tokens=24, do_sample=False)
    dec = SpeculativeDecoder(target, None if method == "ar" else drafts[draft_kind], method=method)
    out = dec.generate(input_ids=ids, max_new_tokens=24)
    assert out.sequences.tolist() == ref.tolist()
    if method != "ar":
        assert out.stats["draft_forwards"] > 0


@pytest.mark.parametrize("draft_kind", ["vlm", "text-only", "eagle-head"])
def test_text_only_prompt_samples(target, drafts, draft_kind):
    """At T>0 a text-only prompt decodes too (losslessness itself is tested with images elsewhere)."""
    ids = text_prompt(4, length=10)
    out = SpeculativeDecoder(target, drafts[draft_kind], method="dynamic").generate(
        input_ids=ids, max_new_tokens=16, do_sample=True, temperature=1.0, seed=0)
    assert out.sequences.shape == (1, 26)


# ---------------------------------------------------------------------------------------------
# the API: SpeculativeDecoder refuses bad input with a ValueError naming it

API_CASES = {
    "float input_ids": (lambda ids, px: dict(input_ids=ids.float(), pixel_values=px), "integer token ids"),
    "input_ids above the vocabulary": (lambda ids, px: dict(input_ids=ids.clone().fill_(VOCAB + 7), pixel_values=None),
                                       r"out of range: token ids must be in \[0, 96\)"),
    "negative input_ids": (lambda ids, px: dict(input_ids=-ids, pixel_values=None), "out of range"),
    "1-D input_ids": (lambda ids, px: dict(input_ids=ids[0], pixel_values=px), r"shape \[1, prompt_len\]"),
    "3-D pixel_values": (lambda ids, px: dict(input_ids=ids, pixel_values=px[0]), r"\[1, channels, height, width\]"),
    "integer pixel_values": (lambda ids, px: dict(input_ids=ids, pixel_values=px.long()), "float tensor"),
    "float max_new_tokens": (lambda ids, px: dict(input_ids=ids, pixel_values=px, max_new_tokens=2.5), "integer >= 1"),
    "string max_new_tokens": (lambda ids, px: dict(input_ids=ids, pixel_values=px, max_new_tokens="8"), "integer >= 1"),
    "negative max_new_tokens": (lambda ids, px: dict(input_ids=ids, pixel_values=px, max_new_tokens=-5), ">= 1, got -5"),
    "prompt fills the context": (lambda ids, px: dict(input_ids=torch.full((1, 512), 5)), "context holds 512"),
    "negative top_k": (lambda ids, px: dict(input_ids=ids, pixel_values=px, do_sample=True, top_k=-3), "top_k"),
    "top_p above 1": (lambda ids, px: dict(input_ids=ids, pixel_values=px, do_sample=True, top_p=1.5), "top_p"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_refuses(target, drafts, case):
    make_kwargs, message = API_CASES[case]
    ids, px = llava_prompt(0)
    with pytest.raises(ValueError, match=message):
        SpeculativeDecoder(target, drafts["text-only"], method="dynamic").generate(**make_kwargs(ids, px))


def test_api_integer_likes_are_fine(target):
    ids, px = llava_prompt(0)
    out = SpeculativeDecoder(target, None, method="ar").generate(input_ids=ids.int(), pixel_values=px,
                                                                  max_new_tokens=torch.tensor(3))
    assert out.stats["new_tokens"] == 3


def test_api_caps_max_new_tokens_at_the_context(target, drafts):
    """prompt + max_new_tokens past the context: a warning, and the tokens that fit (as generate() gives them)."""
    ids = text_prompt(5, length=500)
    with torch.inference_mode():
        ref = target.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    with pytest.warns(UserWarning, match="generating at most 12"):
        out = SpeculativeDecoder(target, drafts["vlm"], method="dynamic").generate(input_ids=ids, max_new_tokens=100)
    assert out.sequences.tolist() == ref.tolist()


@pytest.mark.parametrize("bad, role", [(None, "target"), ("a/path", "target")])
def test_api_target_must_be_a_model(bad, role):
    with pytest.raises(ValueError, match=f"{role} must be a loaded model"):
        SpeculativeDecoder(bad, None, method="ar")


def test_api_draft_must_be_a_model(target):
    with pytest.raises(ValueError, match="draft must be a loaded model"):
        SpeculativeDecoder(target, "HuggingFaceTB/SmolLM2-135M", method="chain")


def test_api_refuses_meta_weights(target):
    with torch.device("meta"):
        meta = tiny_lm(1, hidden=32, layers=1)
    with pytest.raises(ValueError, match="draft's weights are on the meta device"):
        SpeculativeDecoder(target, meta, method="chain")
    with pytest.raises(ValueError, match="target's weights are on the meta device"):
        SpeculativeDecoder(meta, None, method="ar")


TREE_CASES = {
    "max_depth=2.5": (dict(max_depth=2.5), "TreeConfig.max_depth must be an integer"),
    "max_depth=abc": (dict(max_depth="abc"), "TreeConfig.max_depth must be an integer"),
    "max_depth=0": (dict(max_depth=0), "TreeConfig.max_depth must be >= 1"),
    "child_mass=abc": (dict(child_mass="abc"), "TreeConfig.child_mass must be a number"),
    "child_mass=nan": (dict(child_mass=float("nan")), r"TreeConfig.child_mass must be in \(0, 1\]"),
    "choices without a parent": (dict(choices=[[0], [1, 0]]), "TreeConfig.choices: .* has no parent"),
    "choices not paths": (dict(choices=[1, 2]), "TreeConfig.choices must be a non-empty list of paths"),
}


@pytest.mark.parametrize("case", list(TREE_CASES))
def test_api_refuses_bad_tree_options(target, drafts, case):
    options, message = TREE_CASES[case]
    with pytest.raises(ValueError, match=message):
        SpeculativeDecoder(target, drafts["text-only"], method="dynamic", **options)


def test_api_refuses_static_ranks_beyond_the_draft_vocabulary(target, drafts):
    with pytest.raises(ValueError, match="static tree choices use draft rank 200"):
        SpeculativeDecoder(target, drafts["text-only"], method="static", choices=[[0], [200]])
    with pytest.raises(ValueError, match="draft rank 20, but the draft proposes from 16"):
        SpeculativeDecoder(target, drafts["text-only"], method="static", choices=[[20]], draft_vocab=16)
