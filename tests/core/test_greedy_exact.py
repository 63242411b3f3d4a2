"""Speculative greedy output == target.generate(do_sample=False), token for token (float32)."""

import pytest
import torch

from random_models import IMAGE_TOKEN, llava_prompt, perturbed_copy, text_prompt, tiny_lm, tiny_llava
from specllava import SpeculativeDecoder

DEEP = dict(min_path_conf=0.0, min_feed_mass=0.0, node_budget=24, max_depth=5, frontier=6)  # forces deep, wide trees
FULL_DEPTH = dict(min_feed_mass=0.0)  # the default stops growing once the frontier is unlikely to be accepted
SHARP = dict(score_temperature=0.3)  # sharper path confidences: other tree shapes, the same output
METHODS = [("ar", {}), ("chain", {}), ("static", {}), ("dynamic", {}), ("dynamic", DEEP), ("dynamic", FULL_DEPTH),
           ("dynamic", SHARP)]
METHOD_IDS = ["ar", "chain", "static", "dynamic", "dynamic-deep", "dynamic-no-feed-floor", "dynamic-sharp-scores"]


@pytest.fixture(scope="module")
def target():
    return tiny_llava(0)


@pytest.fixture(scope="module")
def drafts(target):
    return {
        "perturbed": perturbed_copy(target, 0.05, seed=1),  # high acceptance
        "unrelated": tiny_llava(123, hidden=32, layers=1),  # almost nothing accepted
        "text-only": tiny_lm(77, hidden=32, layers=1),  # LM with the same vocabulary, no image
    }


def reference(model, ids, px, max_new_tokens, **kw):
    with torch.inference_mode():
        return model.generate(input_ids=ids, pixel_values=px, max_new_tokens=max_new_tokens, do_sample=False, **kw)


@pytest.mark.parametrize("draft_kind", ["perturbed", "unrelated", "text-only"])
@pytest.mark.parametrize("method, options", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_generate(target, drafts, draft_kind, method, options, seed):
    ids, px = llava_prompt(seed)
    ref = reference(target, ids, px, 64)
    dec = SpeculativeDecoder(target, None if method == "ar" else drafts[draft_kind], method=method, **options)
    out = dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=64)
    assert out.sequences.shape == ref.shape
    assert out.sequences.tolist() == ref.tolist()
    s = out.stats
    assert s["new_tokens"] == 64
    assert s["mean_accepted"] == pytest.approx(64 / s["target_forwards"])
    if method == "ar":
        assert s["target_forwards"] == 64 and s["draft_forwards"] == 0


def test_perturbed_draft_is_accepted_often(target, drafts):
    ids, px = llava_prompt(0)
    for method, options in [("chain", {}), ("static", {}), ("dynamic", DEEP)]:
        out = SpeculativeDecoder(target, drafts["perturbed"], method=method, **options).generate(
            input_ids=ids, pixel_values=px, max_new_tokens=64
        )
        assert out.stats["mean_accepted"] > 2.0, (method, out.stats)


def test_identical_draft_chain_accepts_every_guess(target):
    """A draft equal to the target must have every chain guess accepted: this catches a wrong
    draft-side tree mask or position, which the exactness tests alone would not (they stay exact
    whatever the draft proposes). draft_quant="none": an int8 draft is no longer equal."""
    ids, px = llava_prompt(4)
    out = SpeculativeDecoder(target, perturbed_copy(target, 0.0, seed=0), method="chain", chain_length=4,
                             draft_quant="none").generate(
        input_ids=ids, pixel_values=px, max_new_tokens=31
    )
    assert out.stats["accept_hist"] == [0, 0, 0, 0, 6]  # 1 prefill token + 6 steps x 5 tokens
    deep = SpeculativeDecoder(target, perturbed_copy(target, 0.0, seed=0), method="dynamic", draft_quant="none",
                              calibrate=False, **DEEP).generate(
        input_ids=ids, pixel_values=px, max_new_tokens=31
    )
    assert deep.stats["accept_hist"][:-1] == [0] * (len(deep.stats["accept_hist"]) - 1)
    # calibrated (the default), the budget follows the measured acceptance, so the first trees can
    # be shallower; every step still accepts its whole best-first chain, and the tree soon is
    # that chain at full depth
    paths = []

    def on_step(tree, verdict):
        kids = {}
        for i, par in enumerate(tree.parents.tolist()):
            kids.setdefault(par, []).append(i)
        chain = [0]
        while chain[-1] in kids:
            chain.append(kids[chain[-1]][0])  # children in draft order: the draft's best first
        paths.append((verdict.path, chain))

    calibrated = SpeculativeDecoder(target, perturbed_copy(target, 0.0, seed=0), method="dynamic",
                                    draft_quant="none", **DEEP).generate(
        input_ids=ids, pixel_values=px, max_new_tokens=31, on_step=on_step
    )
    assert all(path == chain for path, chain in paths), paths
    assert calibrated.stats["accept_hist"][-1] >= 2, calibrated.stats


class Recorder:
    """A minimal HF-style streamer (put/end) that records what it is given."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def test_eos_inside_an_accepted_run(target):
    ids, px = llava_prompt(5)
    free = reference(target, ids, px, 64)[0, ids.shape[1]:].tolist()
    pos = next(i for i in range(6, 64) if free[i] not in free[:i])  # first occurrence mid-output
    eos = free[pos]
    ref = reference(target, ids, px, 64, eos_token_id=eos)
    assert ref.shape[1] == ids.shape[1] + pos + 1
    rec = Recorder()
    out = SpeculativeDecoder(target, perturbed_copy(target, 0.0, seed=0), method="chain", chain_length=6).generate(
        input_ids=ids, pixel_values=px, max_new_tokens=64, eos_token_id=eos, streamer=rec
    )
    assert out.sequences.tolist() == ref.tolist()
    assert rec.chunks[-1][-1] == eos and rec.ended
    assert sum(rec.chunks[1:], []) == out.sequences[0, ids.shape[1]:].tolist()


def test_eos_from_generation_config_and_max_new_tokens_mid_tree():
    target = tiny_llava(0)
    ids, px = llava_prompt(6)
    free = reference(target, ids, px, 40)[0, ids.shape[1]:].tolist()
    target.generation_config.eos_token_id = [free[25], 1]  # a list, as many configs have
    for n in (11, 40):
        ref = reference(target, ids, px, n)
        out = SpeculativeDecoder(target, perturbed_copy(target, 0.0, seed=0), method="static").generate(
            input_ids=ids, pixel_values=px, max_new_tokens=n
        )
        assert out.sequences.tolist() == ref.tolist(), n


def test_text_only_target_and_draft():
    target, draft = tiny_lm(3), tiny_lm(4, hidden=32, layers=1)
    ids = text_prompt(9, length=10)
    with torch.inference_mode():
        ref = target.generate(input_ids=ids, max_new_tokens=64, do_sample=False)
    for method in ("chain", "dynamic"):
        out = SpeculativeDecoder(target, draft, method=method).generate(input_ids=ids, max_new_tokens=64)
        assert out.sequences.tolist() == ref.tolist()


def test_image_token_never_confuses_the_loop(target):
    """Drafts may propose the image token id; the target treats it as text after the prefill."""
    ids, px = llava_prompt(7)
    draft = perturbed_copy(target, 0.05, seed=3)
    with torch.no_grad():
        draft.lm_head.weight[IMAGE_TOKEN] += 5.0  # make the draft love the image token
    ref = reference(target, ids, px, 32)
    out = SpeculativeDecoder(target, draft, method="dynamic", **DEEP).generate(input_ids=ids, pixel_values=px, max_new_tokens=32)
    assert out.sequences.tolist() == ref.tolist()


@pytest.mark.parametrize("draft_kind", ["perturbed", "text-only"])
@pytest.mark.parametrize("draft_vocab", [40, "ids"])
def test_reduced_draft_vocabulary_stays_exact(target, drafts, draft_kind, draft_vocab):
    ids, px = llava_prompt(1)
    ref = reference(target, ids, px, 48)
    vocab = torch.arange(0, 90, 2) if draft_vocab == "ids" else draft_vocab
    out = SpeculativeDecoder(target, drafts[draft_kind], method="dynamic", draft_vocab=vocab, **DEEP).generate(
        input_ids=ids, pixel_values=px, max_new_tokens=48
    )
    assert out.sequences.tolist() == ref.tolist()


def test_reduced_draft_vocabulary_proposes_only_its_tokens(target):
    """With a draft identical to the target, a subset that holds the target's tokens keeps the
    acceptance; the proposals themselves must come from the subset."""
    import specllava.core.decoder as dec_module

    ids, px = llava_prompt(4)
    seen = []
    real_verify = dec_module.verify_greedy

    def spy(tree, logits, anc):
        seen.extend(tree.tokens[1:].tolist())
        return real_verify(tree, logits, anc)

    subset = torch.arange(3, 60)
    dec = SpeculativeDecoder(target, perturbed_copy(target, 0.0, seed=0), method="dynamic", draft_vocab=subset, **DEEP)
    try:
        dec_module.verify_greedy = spy
        out = dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=24)
    finally:
        dec_module.verify_greedy = real_verify
    assert seen and set(seen) <= set(subset.tolist())
    assert out.sequences.tolist() == reference(target, ids, px, 24).tolist()


def test_on_step_sees_every_verified_tree_and_its_accepted_path(target, drafts):
    ids, px = llava_prompt(0)
    seen = []
    out = SpeculativeDecoder(target, drafts["perturbed"], method="dynamic", **DEEP).generate(
        input_ids=ids, pixel_values=px, max_new_tokens=40, on_step=lambda tree, v: seen.append((tree, v))
    )
    assert len(seen) == out.stats["steps"]
    emitted = [int(out.sequences[0, ids.shape[1]])]  # the prefill's token
    for tree, verdict in seen:
        assert verdict.path[0] == 0  # paths start at the root
        assert all(int(tree.parents[b]) == a for a, b in zip(verdict.path, verdict.path[1:]))
        emitted += verdict.emitted(tree)
    assert emitted[:40] == out.sequences[0, ids.shape[1]:].tolist()


def test_min_feed_mass_saves_draft_forwards_on_unlikely_frontiers(target, drafts):
    ids, px = llava_prompt(1)
    runs = {}
    for mass in (0.0, 0.2, 5.0):
        runs[mass] = SpeculativeDecoder(target, drafts["perturbed"], method="dynamic", min_feed_mass=mass).generate(
            input_ids=ids, pixel_values=px, max_new_tokens=48
        )
    assert runs[0.0].sequences.tolist() == runs[0.2].sequences.tolist() == runs[5.0].sequences.tolist()
    per_step = {m: r.stats["draft_forwards"] / r.stats["steps"] for m, r in runs.items()}
    assert per_step[5.0] < per_step[0.2] < per_step[0.0]
    # a mass no frontier can reach: one forward per step (the root's), depth-1 children only
    assert runs[5.0].stats["draft_forwards"] == runs[5.0].stats["steps"] + 1  # + the draft's prefill
    assert len(runs[5.0].stats["accept_by_depth"]) <= 1


def test_sharper_scores_grow_deeper_trees_and_emit_the_same_tokens(target, drafts):
    ids, px = llava_prompt(1)
    runs = {t: SpeculativeDecoder(target, drafts["perturbed"], method="dynamic", score_temperature=t).generate(
        input_ids=ids, pixel_values=px, max_new_tokens=48) for t in (1.0, 0.3)}
    assert runs[1.0].sequences.tolist() == runs[0.3].sequences.tolist()
    per_step = {t: r.stats["draft_forwards"] / r.stats["steps"] for t, r in runs.items()}
    assert per_step[0.3] > per_step[1.0]  # confident-looking frontiers are worth feeding
    assert runs[0.3].stats["mean_accepted"] >= runs[1.0].stats["mean_accepted"]
    with pytest.raises(ValueError, match="score_temperature"):
        SpeculativeDecoder(target, drafts["perturbed"], method="dynamic", score_temperature=0.0)
