"""Statistical losslessness at T > 0: the joint distribution of the first three sampled tokens
equals the target's own (exact, computed by enumeration on a tiny vocabulary), and the same check
rejects a deliberately wrong acceptance rule.

Bound: Pearson chi-square goodness of fit against the exact distribution (rare outcomes pooled);
a correct sampler passes with p-value > 1e-3 (fails by chance 1 time in 1000; the seeds are
fixed, so the test is deterministic), the wrong rule must give p-value < 1e-6.
"""

from collections import Counter

import pytest
import torch

import specllava.core.decoder as decoder_module
from random_models import chi2_pvalue, exact_sequence_probs, text_prompt, tiny_lm, wrong_verify_sampling
from specllava import SpeculativeDecoder
from specllava.core.sampling import SamplingParams

V = 8
N_TOKENS = 3
DEEP = dict(min_path_conf=0.0, min_feed_mass=0.0, node_budget=12, max_depth=3, max_children=3, frontier=4)


@pytest.fixture(scope="module")
def pair():
    target = tiny_lm(11, vocab=V, hidden=32, layers=1, init=0.6)
    draft = tiny_lm(12, vocab=V, hidden=32, layers=1, init=0.6)  # disagrees often: many rejections
    return target, draft


def exact_joint(target, ids, params):
    return exact_sequence_probs(target, ids, params, N_TOKENS)


def sample_ours(target, draft, ids, params, n, method="dynamic", options=DEEP):
    dec = SpeculativeDecoder(target, draft, method=method, **options)
    counts = Counter()
    for i in range(n):
        out = dec.generate(
            input_ids=ids, max_new_tokens=N_TOKENS, do_sample=True, temperature=params.temperature,
            top_k=params.top_k, top_p=params.top_p, seed=1000 + i,
        )
        counts[tuple(out.sequences[0, ids.shape[1]:].tolist())] += 1
    return counts


CASES = [
    ("T=1", SamplingParams(True, 1.0, 0, 1.0), "dynamic"),
    ("T=0.7,top_k=4", SamplingParams(True, 0.7, 4, 1.0), "chain"),
    ("T=1.3,top_p=0.8", SamplingParams(True, 1.3, 0, 0.8), "dynamic"),
    # drawn candidates over a reduced draft vocabulary, the node budget cutting the draws
    ("T=1,draft_vocab=5,budget=4", SamplingParams(True, 1.0, 0, 1.0), "dynamic-small"),
]
OPTIONS = {"dynamic": DEEP, "chain": dict(chain_length=3), "dynamic-small": dict(DEEP, node_budget=4, draft_vocab=5)}


@pytest.mark.parametrize("name, params, method", CASES, ids=[c[0] for c in CASES])
def test_speculative_sampling_matches_target_distribution(pair, name, params, method):
    target, draft = pair
    ids = text_prompt(5, length=6, vocab=V)
    exact = exact_joint(target, ids, params)
    counts = sample_ours(target, draft, ids, params, 1200, method=method.split("-")[0], options=OPTIONS[method])
    pval = chi2_pvalue(counts, exact)
    assert pval > 1e-3, f"{name}: speculative samples differ from the target's distribution (p-value {pval:.2e})"


def test_target_generate_sampling_matches_the_same_exact_distribution(pair):
    """Sanity check of the reference itself: HF's own sampling fits `exact_joint`."""
    target, _ = pair
    ids = text_prompt(5, length=6, vocab=V)
    params = SamplingParams(True, 1.3, 0, 0.8)
    exact = exact_joint(target, ids, params)
    counts = Counter()
    torch.manual_seed(0)
    with torch.inference_mode():
        for _ in range(800):
            out = target.generate(input_ids=ids, max_new_tokens=N_TOKENS, do_sample=True, temperature=1.3, top_k=0, top_p=0.8)
            counts[tuple(out[0, ids.shape[1]:].tolist())] += 1
    assert chi2_pvalue(counts, exact) > 1e-3


@pytest.mark.slow  # over 20 s in `pytest --durations`: many sampled runs to reject the wrong rule
def test_the_check_fails_on_a_wrong_acceptance_rule(pair, monkeypatch):
    target, draft = pair
    ids = text_prompt(5, length=6, vocab=V)
    params = SamplingParams(True, 1.0, 0, 1.0)
    exact = exact_joint(target, ids, params)
    monkeypatch.setattr(decoder_module, "verify_sampling", wrong_verify_sampling)
    counts = sample_ours(target, draft, ids, params, 3000)
    pval = chi2_pvalue(counts, exact)
    assert pval < 1e-6, f"the losslessness check did not catch a wrong rule (p-value {pval:.2e})"


def test_identical_draft_has_its_first_drawn_child_accepted_everywhere(pair):
    """q == p (same model, same temperature): min(1, p/q) = 1, so every step walks first children
    down to a node without children. Deterministic candidates would be accepted only w.p. p(x)."""
    target, _ = pair
    ids = text_prompt(5, length=6, vocab=V)
    steps = []
    SpeculativeDecoder(target, target, method="dynamic", draft_quant="none", **DEEP).generate(
        input_ids=ids, max_new_tokens=24, do_sample=True, temperature=1.0, seed=3,
        on_step=lambda tree, verdict: steps.append((tree, verdict.path)),
    )
    assert steps
    for tree, path in steps:
        for node, nxt in zip(path, path[1:] + [None]):
            kids = tree.children(node).tolist()
            assert (nxt is None and not kids) or (kids and nxt == kids[0])
