"""A reduced draft vocabulary: which K ids `draft_vocab=K` keeps (ranked first, then lowest ids)."""

import pytest
import torch

from random_models import llava_prompt, perturbed_copy, tiny_llava
from specllava import SpeculativeDecoder
from specllava.core.vocab import draft_vocab_ids, rank_tokens


def test_rank_tokens_orders_by_count_then_id():
    assert rank_tokens([7, 3, 7, 5, 3, 7, 9]) == [7, 3, 5, 9]


def test_ranked_ids_come_first_then_the_lowest_free_ids():
    ids = draft_vocab_ids(6, size=20, ranking=[15, 2, 15, 30, -1, 11])  # repeats and bad ids skipped
    assert ids.tolist() == [0, 1, 2, 3, 11, 15]
    assert draft_vocab_ids(2, size=20, ranking=[15, 2, 11]).tolist() == [2, 15]  # K cuts the ranking
    assert draft_vocab_ids(4, size=20).tolist() == [0, 1, 2, 3]  # no ranking: the K lowest ids
    with pytest.raises(ValueError, match="between 1 and the vocabulary size 20"):
        draft_vocab_ids(21, size=20)


def test_decoder_takes_the_drafts_ranking_and_stays_exact():
    """A draft whose ranking lists high ids proposes those; the output is still generate()'s."""
    target = tiny_llava(0)
    draft = perturbed_copy(target, 0.0, seed=0)
    ids, px = llava_prompt(4)
    with torch.inference_mode():
        ref = target.generate(input_ids=ids, pixel_values=px, max_new_tokens=24, do_sample=False)
    answer = ref[0, ids.shape[1]:].tolist()
    draft.config.token_ranking = rank_tokens(answer)
    k = len(set(answer))
    dec = SpeculativeDecoder(target, draft, method="dynamic", draft_vocab=k)
    assert set(dec.draft_vocab.tolist()) == set(answer)
    out = dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=24)
    assert out.sequences.tolist() == ref.tolist()
    assert out.stats["mean_accepted"] > 2.0  # an identical draft that can propose every answer token


def test_cli_default_vocabulary_follows_the_drafts_ranking():
    from specllava.core.vocab import default_draft_vocab

    draft = tiny_llava(1)  # 96-token vocabulary
    assert default_draft_vocab(draft, 0.0) is None and default_draft_vocab(None, 0.0) is None  # no ranking
    draft.config.token_ranking = list(range(3, 23))  # 20 ids -> 32 at T=0, 64 when sampling
    assert default_draft_vocab(draft, 0.0) == 32 and default_draft_vocab(draft, 1.0) == 64
    draft.config.token_ranking = list(range(70))  # 128 would exceed the vocabulary
    assert default_draft_vocab(draft, 0.0) == 96 and default_draft_vocab(draft, 0.7) == 96


def test_api_auto_vocabulary_uses_one_path_per_temperature(tiny_pair):
    target, draft = tiny_pair
    ids, px = llava_prompt(2)
    assert SpeculativeDecoder(target, draft, method="dynamic").draft_vocab is None  # no ranking: full vocabulary
    draft.config.token_ranking = list(range(3, 23))  # 20 ids: 32 greedy, 64 sampled
    dec = SpeculativeDecoder(target, draft, method="dynamic")  # draft_vocab="auto" is the default
    assert dec.draft_vocab.numel() == 32 and dec.sampled_draft_vocab.numel() == 64
    assert dec.draft_backend.vocab_ids.numel() == 32 and dec.sampled_draft_backend.vocab_ids.numel() == 64
    seen = []
    with torch.inference_mode():
        ref = target.generate(input_ids=ids, pixel_values=px, max_new_tokens=24, do_sample=False)
    out = dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=24, on_step=lambda t, v: seen.append(t.tokens[1:]))
    assert out.sequences.tolist() == ref.tolist()
    assert set(torch.cat(seen).tolist()) <= set(dec.draft_vocab.tolist())
    seen.clear()
    dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=24, do_sample=True, seed=0,
                 on_step=lambda t, v: seen.append(t.tokens[1:]))
    drawn = set(torch.cat(seen).tolist())
    assert drawn <= set(dec.sampled_draft_vocab.tolist()) and drawn - set(dec.draft_vocab.tolist())  # the wider path
    with pytest.raises(ValueError, match="draft_vocab must be 'auto'"):
        SpeculativeDecoder(target, draft, method="dynamic", draft_vocab="all")
    assert SpeculativeDecoder(target, draft, method="dynamic", draft_vocab=None).draft_vocab is None
