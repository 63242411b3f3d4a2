"""Batched steps (`core.batch`): every row of a batch equals that request decoded alone and
`target.generate()` on that row alone, token for token in float32, whatever the other rows are
(prompt lengths, images or none, progress, tree shapes) and as rows join and leave; sampled rows
keep the target's distribution (the same chi-square check as test_sampling_lossless, and the
deliberately wrong rule still fails it); `generate()` on a padded batch returns what
transformers' batched generate() returns."""

from collections import Counter

import pytest
import torch

import specllava.core.batch as batch_module
import specllava.core.decoder as decoder_module
from random_models import (IMAGE_TOKEN, chi2_pvalue, exact_sequence_probs, llava_prompt, perturbed_copy, text_prompt,
                           tiny_llava, tiny_lm, wrong_verify_sampling)
from specllava import SpeculativeDecoder
from specllava.core.eagle import EagleHead
from specllava.core.sampling import SamplingParams

METHODS = [("ar", {}), ("chain", {}), ("static", {}), ("dynamic", {}),
           ("dynamic", dict(min_path_conf=0.0, min_feed_mass=0.0, node_budget=24, max_depth=5, frontier=6))]
METHOD_IDS = ["ar", "chain", "static", "dynamic", "dynamic-deep"]


@pytest.fixture(scope="module")
def target():
    return tiny_llava(0)


@pytest.fixture(scope="module")
def drafts(target):
    return {"perturbed": perturbed_copy(target, 0.05, seed=1), "text-only": tiny_lm(77, hidden=32, layers=1)}


def requests():
    """Four different rows: images with prompts of three lengths, and a text-only prompt."""
    text = llava_prompt(2)[0][:, -5:]
    assert not (text == IMAGE_TOKEN).any()
    return [llava_prompt(0), llava_prompt(1, text_len=11), (text, None), llava_prompt(3, text_len=2)]


def reference(model, ids, px, new):
    with torch.inference_mode():
        return model.generate(input_ids=ids, pixel_values=px, max_new_tokens=new, do_sample=False)[0].tolist()


def run_batched(dec, reqs, news, join_late=(), **kw):
    """Step the requests together; those in `join_late` start after two steps (continuous batching)."""
    seqs = {}
    for k, (ids, px) in enumerate(reqs):
        if k not in join_late:
            seqs[k] = dec.start(ids, px, max_new_tokens=news[k], **kw)
    steps = 0
    while len(seqs) < len(reqs) or any(not s.finished for s in seqs.values()):
        if steps == 2:
            for k in join_late:
                seqs[k] = dec.start(reqs[k][0], reqs[k][1], max_new_tokens=news[k], **kw)
        dec.step(list(seqs.values()))
        steps += 1
    return [seqs[k] for k in range(len(reqs))]


@pytest.mark.parametrize("draft_kind", ["perturbed", "text-only"])
@pytest.mark.parametrize("method, options", METHODS, ids=METHOD_IDS)
def test_batch_rows_equal_each_row_alone_and_generate(target, drafts, draft_kind, method, options):
    if method == "ar" and draft_kind != "perturbed":
        pytest.skip("ar has no draft")
    reqs, news = requests(), [40, 25, 33, 12]
    dec = SpeculativeDecoder(target, None if method == "ar" else drafts[draft_kind], method=method, **options)
    seqs = run_batched(dec, reqs, news, join_late=(3,))
    for (ids, px), new, seq in zip(reqs, news, seqs):
        alone = dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=new)
        assert seq.sequences().tolist() == alone.sequences.tolist()
        if px is not None:  # (generate() on a text-only prompt may itself emit the image token)
            assert seq.sequences()[0].tolist() == reference(target, ids, px, new)
        assert seq.finish_reason == "length"
    assert max(seqs[0].stats.batch) == 4 and min(seqs[0].stats.batch) < 4  # joined, and others left
    if method != "ar" and draft_kind == "perturbed":
        assert seqs[0].summary()["mean_accepted"] > 1.5  # the draft took part


def test_transformers_forward_paths(target, drafts):
    """Target and draft through transformers' own forward (what non-Llama and dispatched models use)."""
    reqs, news = requests(), [30, 20, 26, 16]
    dec = SpeculativeDecoder(target, drafts["perturbed"], method="dynamic", target_lean=False, draft_lean=False,
                             draft_vocab=None, draft_quant="none")
    assert dec.target_backend.kind == "transformers" and dec.draft_backend.kind == "transformers"
    for (ids, px), new, seq in zip(reqs, news, run_batched(dec, reqs, news)):
        assert seq.sequences().tolist() == dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=new).sequences.tolist()


def test_llava_next_rows():
    from test_architectures import next_inputs, sharing_next_draft, tiny_llava_next

    target = tiny_llava_next(0)
    dec = SpeculativeDecoder(target, sharing_next_draft(target), method="dynamic")
    rows = [next_inputs(target, 20, 40, seed=0), next_inputs(target, 30, 30, seed=1)]
    seqs = [dec.start(**r, max_new_tokens=20) for r in rows]
    while not all(s.finished for s in seqs):
        dec.step(seqs)
    for r, s in zip(rows, seqs):
        with torch.inference_mode():
            ref = target.generate(**r, max_new_tokens=20, do_sample=False)
        assert torch.equal(s.sequences(), ref)


def test_sliding_window_rows():
    from test_architectures import tiny_mistral

    window = 8
    target = tiny_mistral(0, window)
    dec = SpeculativeDecoder(target, perturbed_copy(target, 0.05, seed=1), method="dynamic")
    prompts, news = [text_prompt(10, 10), text_prompt(4, 4), text_prompt(7, 7)], [30, 24, 3]
    seqs = [dec.start(p, max_new_tokens=n) for p, n in zip(prompts, news)]
    while not all(s.finished for s in seqs):
        dec.step(seqs)
    for p, n, s in zip(prompts, news, seqs):
        with torch.inference_mode():
            assert torch.equal(s.sequences(), target.generate(input_ids=p, max_new_tokens=n, do_sample=False))


def test_offloaded_target_rows(tmp_path):
    """A target dispatched by accelerate (a layer offloaded to disk): the batched forward goes
    through transformers' forward and its hooks."""
    from test_architectures import _offloaded

    plain = tiny_llava(0)
    draft = perturbed_copy(plain, 0.05, seed=1)
    reqs, news = requests(), [16, 12, 14, 10]
    expected = [reference(plain, ids, px, n) if px is not None else None for (ids, px), n in zip(reqs, news)]
    dec = SpeculativeDecoder(_offloaded(plain, tmp_path), draft, method="dynamic")
    assert dec.target_backend.kind == "transformers"
    for (ids, px), exp, seq in zip(reqs, expected, run_batched(dec, reqs, news)):
        if px is not None:
            assert seq.sequences()[0].tolist() == exp


def test_eagle_head_steps_each_sequence_on_its_own(target):
    torch.manual_seed(5)
    head = EagleHead.from_target(target)
    dec = SpeculativeDecoder(target, head, method="dynamic")
    assert not dec.strategy.batched
    reqs, news = requests(), [20, 14, 17, 9]
    for (ids, px), new, seq in zip(reqs, news, run_batched(dec, reqs, news)):
        assert seq.sequences().tolist() == dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=new).sequences.tolist()


def test_rows_leave_and_return_to_per_sequence_steps(target, drafts):
    """A sequence stepped alone after batched steps continues from its own caches."""
    dec = SpeculativeDecoder(target, drafts["perturbed"], method="dynamic")
    reqs = requests()[:2]
    a, b = (dec.start(ids, px, max_new_tokens=30) for ids, px in reqs)
    for _ in range(3):
        dec.step([a, b])
    while not a.finished:
        dec.step([a])  # b paused: it leaves the batch with its caches
    while not b.finished:
        dec.step([b])
    for (ids, px), seq in zip(reqs, (a, b)):
        assert seq.sequences()[0].tolist() == reference(target, ids, px, 30)


def test_greedy_and_sampled_rows_together(target, drafts):
    """Greedy rows stay exact next to sampled rows (which draft with another vocabulary size)."""
    dec = SpeculativeDecoder(target, drafts["perturbed"], method="dynamic")
    reqs = requests()
    seqs = [dec.start(ids, px, max_new_tokens=20, do_sample=k % 2 == 1, seed=k) for k, (ids, px) in enumerate(reqs)]
    while not all(s.finished for s in seqs):
        dec.step(seqs)
    for k, ((ids, px), seq) in enumerate(zip(reqs, seqs)):
        if k % 2 == 0 and px is not None:
            assert seq.sequences()[0].tolist() == reference(target, ids, px, 20)
        assert len(seq.tokens) == 20


@pytest.mark.parametrize("quant", ["auto", "none"], ids=["int8-draft", "float-draft"])
@pytest.mark.parametrize("method,options", [("chain", {}), ("static", {}), ("dynamic", {}), METHODS[-1]],
                         ids=METHOD_IDS[1:])
def test_seeded_sampled_rows_equal_each_row_alone(target, drafts, method, options, quant):
    """A seeded sampled row emits the same tokens in a batch as alone: its tree, and so what its
    generator draws, does not depend on the other rows (an int8 draft's activation scale too,
    which spans the tokens a draft forward computes logits for)."""
    dec = SpeculativeDecoder(target, drafts["perturbed"], method=method, draft_quant=quant, **options)
    reqs = requests()
    kw = [dict(do_sample=k != 1, temperature=0.8, seed=100 + k) for k in range(len(reqs))]
    news = [40, 25, 33, 18]
    alone = []
    for k, r in enumerate(reqs):
        seq = dec.start(*r, max_new_tokens=news[k], **kw[k])
        while not seq.finished:
            dec.step([seq])
        alone.append(seq.tokens)
    seqs = {}
    for step in range(200):  # rows join one per step (continuous batching)
        if step < len(reqs):
            seqs[step] = dec.start(*reqs[step], max_new_tokens=news[step], **kw[step])
        if all(s.finished for s in seqs.values()):
            break
        dec.step(list(seqs.values()))
    assert [seqs[k].tokens for k in range(len(reqs))] == alone
    assert any(len(s.stats.hist) > 2 for s in seqs.values())  # paths of 2+ draft tokens: pending chains fed


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-sampled"])
def test_calibrated_plain_steps_in_a_batch_equal_each_row_alone(target, sampled):
    """A draft that is seldom right: the calibrated dynamic tree then verifies the root alone on
    many steps (`Calibrator.draft_pays`), without feeding the draft. Rows making such plain steps
    beside drafted ones emit what each does alone."""
    dec = SpeculativeDecoder(target, tiny_llava(123, hidden=32, layers=1), method="dynamic")
    reqs = requests()
    kw = [dict(do_sample=sampled, temperature=0.3, seed=100 + k) if sampled else {} for k in range(len(reqs))]
    news = [40, 25, 33, 18]
    alone = [dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=new, **k)
             for (ids, px), new, k in zip(reqs, news, kw)]
    seqs = run_batched(dec, reqs, news, join_late=(3,)) if not sampled else None
    if sampled:
        seqs = {}
        for step in range(200):
            if step < len(reqs):
                seqs[step] = dec.start(*reqs[step], max_new_tokens=news[step], **kw[step])
            if all(s.finished for s in seqs.values()):
                break
            dec.step(list(seqs.values()))
        seqs = [seqs[k] for k in range(len(reqs))]
    assert [s.sequences().tolist() for s in seqs] == [a.sequences.tolist() for a in alone]
    nodes = [n for s in seqs for n in s.stats.nodes]
    assert nodes.count(0) > 5 and max(nodes) > 0  # plain steps and drafted ones


def test_greedy_rows_take_plain_steps_together_and_sampled_rows_keep_their_trees(target):
    """A seldom-right draft in a batch: its greedy rows find that drafting does not pay at this batch
    size and take plain steps together (the calibrated cost model knows the batch); a greedy row
    joining then holds from its first step, beside a seeded sampled row that drafts every step with
    the trees it grows alone. Every row emits what it emits alone."""
    dec = SpeculativeDecoder(target, tiny_llava(123, hidden=32, layers=1), method="dynamic")
    reqs = requests() + [llava_prompt(4, text_len=7)]
    kw = [{}, {}, {}, dict(do_sample=True, temperature=1.0, seed=7), {}]
    news = [60, 60, 60, 60, 30]

    def alone(k):
        seq = dec.start(*reqs[k], max_new_tokens=news[k], **kw[k])
        while not seq.finished:
            dec.step([seq])
        return seq

    alone = [alone(k) for k in range(len(reqs))]
    seqs = {}
    for step in range(400):
        for k in range(len(reqs)):
            if step == (20 if k == 4 else 0):
                seqs[k] = dec.start(*reqs[k], max_new_tokens=news[k], **kw[k])
        if all(s.finished for s in seqs.values()):
            break
        dec.step(list(seqs.values()))
    seqs = [seqs[k] for k in range(len(reqs))]
    assert [s.sequences().tolist() for s in seqs] == [a.sequences().tolist() for a in alone]
    assert seqs[3].stats.nodes == alone[3].stats.nodes  # the sampled row's trees do not follow the batch
    together = [all(seqs[k].stats.nodes[i] == 0 for k in (0, 1, 2)) for i in range(20, 50)]
    assert sum(together) > 20  # the greedy rows' plain steps coincide


def test_a_held_row_that_never_drafted_steps_beside_a_drafting_row(target):
    """A greedy row held from its first step (its batch's greedy rows found drafting does not pay)
    has never fed its draft; a sampled row beside it drafts. Both emit what they emit alone."""
    dec = SpeculativeDecoder(target, tiny_llava(123, hidden=32, layers=1), method="dynamic")
    reqs = [llava_prompt(0), llava_prompt(1, text_len=11)]
    kw = [{}, dict(do_sample=True, temperature=1.0, seed=7)]
    alone = [dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=24, **k).sequences.tolist()
             for (ids, px), k in zip(reqs, kw)]
    seqs = [dec.start(ids, px, max_new_tokens=24, **k) for (ids, px), k in zip(reqs, kw)]
    for _ in range(8):  # held: the sampled row's deeper trees feed frontiers beside it
        seqs[0].drafter.hold()
        dec.step(seqs)
    assert seqs[0].stats.nodes == [0] * 8 and max(seqs[1].stats.nodes) > 4
    while not all(s.finished for s in seqs):
        dec.step(seqs)
    assert [s.sequences().tolist() for s in seqs] == alone


def test_cancel_and_time_limit_between_steps(target, drafts):
    dec = SpeculativeDecoder(target, drafts["perturbed"], method="dynamic")
    reqs = requests()
    a = dec.start(*reqs[0], max_new_tokens=40)
    b = dec.start(*reqs[1], max_new_tokens=40, max_time=1e-9)
    c = dec.start(*reqs[2], max_new_tokens=40)
    results = dec.step([a, b, c])
    assert b.finish_reason == "time_limit" and [r.sequence for r in results] == [a, c]
    a.finish("cancelled")
    assert [r.sequence for r in dec.step([a, b, c])] == [c] and a.finish_reason == "cancelled"
    while not c.finished:
        dec.step([a, b, c])
    assert c.sequences()[0].tolist() == dec.generate(*reqs[2], max_new_tokens=40).sequences[0].tolist()


# -- the Python API: generate() on a padded batch -------------------------------------------------
def padded(reqs, side="left"):
    """What a processor returns for a list of prompts: padded input_ids, attention_mask and the
    images of the rows that have one, stacked."""
    width = max(ids.shape[1] for ids, _ in reqs)
    rows, masks = [], []
    for ids, _ in reqs:
        pad = torch.zeros(1, width - ids.shape[1], dtype=torch.long)
        ones = torch.ones_like(ids)
        rows.append(torch.cat([pad, ids] if side == "left" else [ids, pad], 1))
        masks.append(torch.cat([pad, ones] if side == "left" else [ones, pad], 1))
    pixels = torch.cat([px for _, px in reqs if px is not None])
    return dict(input_ids=torch.cat(rows), attention_mask=torch.cat(masks), pixel_values=pixels)


@pytest.mark.parametrize("method", ["ar", "dynamic"])
def test_generate_on_a_padded_batch_equals_transformers_batched_generate(target, drafts, method):
    reqs = [r for r in requests() if r[1] is not None]
    inputs = padded(reqs)
    dec = SpeculativeDecoder(target, None if method == "ar" else drafts["perturbed"], method=method)
    # an EOS id that the first row emits early: that row stops and is padded, as in generate()
    eos = dec.generate(input_ids=reqs[0][0], pixel_values=reqs[0][1], max_new_tokens=8).sequences[0, -3].item()
    out = dec.generate(**inputs, max_new_tokens=24, eos_token_id=eos)
    with torch.inference_mode():
        ref = target.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert out.sequences.shape == ref.shape and torch.equal(out.sequences, ref)
    assert out.stats["rows"][0]["finish_reason"] == "eos" and len(out.stats["rows"]) == len(reqs)


def test_generate_on_a_batch_with_text_only_rows_and_right_padding(target, drafts):
    reqs = requests()
    dec = SpeculativeDecoder(target, drafts["perturbed"], method="dynamic")
    out = dec.generate(**padded(reqs, side="right"), max_new_tokens=16)
    width = max(ids.shape[1] for ids, _ in reqs)
    for b, (ids, px) in enumerate(reqs):
        alone = dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=16).sequences[0, ids.shape[1]:]
        assert out.sequences[b, width:].tolist() == alone.tolist()


@pytest.mark.parametrize("change, message", [
    (lambda x: dict(x, pixel_values=x["pixel_values"][:1]), "pixel_values holds 1 images but 3 rows"),
    (lambda x: dict(x, attention_mask=x["attention_mask"] * torch.tensor([1, 0, 1] + [1] * 30)[: x["input_ids"].shape[1]]),
     "padding inside the prompt"),
    (lambda x: dict(x, attention_mask=x["attention_mask"][:, 1:]), "attention_mask must have input_ids' shape"),
], ids=["images", "inner-padding", "mask-shape"])
def test_bad_batches_are_refused(target, drafts, change, message):
    inputs = change(padded([r for r in requests() if r[1] is not None], side="right"))
    with pytest.raises(ValueError, match=message):
        SpeculativeDecoder(target, drafts["perturbed"], method="chain").generate(**inputs, max_new_tokens=4)


def test_a_streamer_takes_one_sequence(target):
    inputs = padded([r for r in requests() if r[1] is not None])
    with pytest.raises(ValueError, match="streamer takes one sequence"):
        SpeculativeDecoder(target, method="ar").generate(**inputs, max_new_tokens=4, streamer=object())


# -- sampling: each row of a batch has the target's distribution ----------------------------------
V = 8
N_TOKENS = 3
DEEP = dict(min_path_conf=0.0, min_feed_mass=0.0, node_budget=12, max_depth=3, max_children=3, frontier=4)
ROWS = [(text_prompt(5, length=6, vocab=V), SamplingParams(True, 1.0, 0, 1.0)),
        (text_prompt(9, length=3, vocab=V), SamplingParams(True, 1.3, 0, 0.8))]


@pytest.fixture(scope="module")
def pair():
    return tiny_lm(11, vocab=V, hidden=32, layers=1, init=0.6), tiny_lm(12, vocab=V, hidden=32, layers=1, init=0.6)


def sample_rows(pair, n):
    target, draft = pair
    dec = SpeculativeDecoder(target, draft, method="dynamic", **DEEP)
    counts = [Counter() for _ in ROWS]
    for i in range(n):
        seqs = [dec.start(ids, max_new_tokens=N_TOKENS, do_sample=True, temperature=p.temperature, top_k=p.top_k,
                          top_p=p.top_p, seed=1000 + 7 * i + k) for k, (ids, p) in enumerate(ROWS)]
        while not all(s.finished for s in seqs):
            dec.step(seqs)
        assert max(seqs[0].stats.batch, default=2) == 2  # its steps were batched
        for c, s in zip(counts, seqs):
            c[tuple(s.tokens)] += 1
    return counts


def test_sampled_rows_of_a_batch_match_the_target_distribution(pair):
    for (ids, params), counts in zip(ROWS, sample_rows(pair, 1000)):
        pval = chi2_pvalue(counts, exact_sequence_probs(pair[0], ids, params, N_TOKENS))
        assert pval > 1e-3, f"a batched row's samples differ from the target's distribution (p-value {pval:.2e})"


@pytest.mark.slow  # many sampled runs to reject the wrong rule
def test_the_batched_check_fails_on_a_wrong_acceptance_rule(pair, monkeypatch):
    monkeypatch.setattr(batch_module, "verify_sampling", wrong_verify_sampling)
    monkeypatch.setattr(decoder_module, "verify_sampling", wrong_verify_sampling)  # a row left alone
    ids, params = ROWS[0]
    counts = sample_rows(pair, 3000)[0]
    pval = chi2_pvalue(counts, exact_sequence_probs(pair[0], ids, params, N_TOKENS))
    assert pval < 1e-6, f"the batched losslessness check did not catch a wrong rule (p-value {pval:.2e})"


# -- load-aware trees ---------------------------------------------------------------------------
def test_load_aware_budgets_change_the_trees_not_the_output(target, drafts):
    """batch_budgets: full trees alone, smaller ones in pairs, plain decoding from 3 on; every row
    still equals generate()."""
    reqs, news = requests(), [30, 22, 26, 18]
    dec = SpeculativeDecoder(target, drafts["perturbed"], method="dynamic", batch_budgets={1: 24, 2: 3, 3: 0})
    seqs = run_batched(dec, reqs, news, join_late=(3,))
    for (ids, px), new, seq in zip(reqs, news, seqs):
        if px is not None:
            assert seq.sequences()[0].tolist() == reference(target, ids, px, new)
    stats = seqs[0].stats
    sizes = [(b, n) for b, n in zip(stats.batch, stats.nodes)]
    assert all(n == 0 for b, n in sizes if b >= 3) and any(b >= 3 for b, _ in sizes)  # plain decoding at 3+
    assert all(n <= 3 for b, n in sizes if b == 2)
    assert any(b == 1 and n > 3 for b, n in sizes)  # the longest request ends alone, with the budget for 1


def test_batch_budget_table_is_checked(target, drafts):
    with pytest.raises(ValueError, match="batch_budgets"):
        SpeculativeDecoder(target, drafts["perturbed"], method="dynamic", batch_budgets={0: 4})


def test_batch_node_budgets_shrink_with_the_batch():
    from specllava.tuning.budget import AcceptanceProfile, CostCurve, batch_node_budgets

    # a target whose forward costs 40 ms plus 1.2 ms per token (weights read once, then compute)
    sizes = [1, 2, 4, 8, 16, 32, 64, 96]
    cost = CostCurve(sizes, [0.040 + 0.0012 * n for n in sizes], 160, {})
    budgets = list(range(1, 33))
    tau = [1 + 2.0 * (1 - 0.9 ** b) for b in budgets]  # diminishing returns of more nodes
    profile = AcceptanceProfile(budgets, tau, rest_s=0.010, steps=100, key={})
    table = batch_node_budgets(cost, profile, (1, 2, 4, 8, 64))
    assert table[1] >= table[2] >= table[4] >= table[8] >= table[64]
    assert table[1] > table[8] and table[64] == 0  # at a high load plain batched decoding wins
    # drafting that costs each row what it costs alone (compute-bound, as on a CPU): plain sooner
    slow = batch_node_budgets(cost, profile, (1, 2, 4, 8, 64), {b: 0.010 * b for b in (1, 2, 4, 8, 64)})
    assert slow[1] == table[1]  # alone: the same drafting time, the same budget
    assert slow[4] == 0 < table[4]


def test_measured_batch_rest_is_the_lone_rest_scaled_by_the_batch(tiny_pair):
    from random_models import llava_prompt
    from specllava.tuning.budget import AcceptanceProfile, measure_batch_rest

    target, draft = tiny_pair
    ids, px = llava_prompt(3)
    profile = AcceptanceProfile([1, 2], [1.5, 2.0], rest_s=0.004, steps=10, key={})
    rest = measure_batch_rest(target, draft, {"input_ids": ids, "pixel_values": px}, profile,
                              {"min_path_conf": 0.0}, (1, 4), steps=3)
    assert set(rest) == {1, 4} and rest[1] == pytest.approx(0.004)  # B = 1: the profile's own
    assert rest[4] > 0
