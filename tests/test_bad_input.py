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
