"""The EAGLE-style head (`core.eagle`): lossless decoding with it, and the decoder feeding it
exactly what training feeds it (the target's features one position back, its own predictions
deeper in the tree)."""

import pytest
import torch

from random_models import IMAGE_TOKEN, N_IMAGE_TOKENS, llava_prompt, text_prompt, tiny_llava, tiny_lm
from specllava import SpeculativeDecoder
from specllava.core.eagle import EagleHead, unroll_mask


@pytest.fixture(scope="module")
def target():
    return tiny_llava(0)


@pytest.fixture(scope="module")
def head(target):
    torch.manual_seed(5)
    head = EagleHead.from_target(target, token_ranking=list(range(40)))
    with torch.no_grad():  # a head that is not the target's last layer: proposals differ from its argmax
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return head.eval()


@pytest.mark.parametrize("method, options", [("chain", {}), ("static", {}), ("dynamic", {}),
                                             ("dynamic", dict(min_path_conf=0.0, min_feed_mass=0.0, node_budget=16))])
@pytest.mark.parametrize("quant", ["auto", "none"])
def test_greedy_with_a_head_equals_generate(target, head, method, options, quant):
    for seed in range(2):
        ids, px = llava_prompt(seed)
        with torch.inference_mode():
            ref = target.generate(input_ids=ids, pixel_values=px, max_new_tokens=40, do_sample=False)
        dec = SpeculativeDecoder(target, head, method=method, draft_quant=quant, **options)
        out = dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=40)
        assert out.sequences.tolist() == ref.tolist()
        assert out.stats["draft_forwards"] > 0


def test_greedy_with_a_head_through_transformers_forward(target, head):
    """target_lean=False: the features come from the model's own output_hidden_states."""
    ids, px = llava_prompt(2)
    with torch.inference_mode():
        ref = target.generate(input_ids=ids, pixel_values=px, max_new_tokens=30, do_sample=False)
    dec = SpeculativeDecoder(target, head, method="dynamic", target_lean=False, draft_quant="none")
    assert dec.target_backend.kind == "transformers"
    assert dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=30).sequences.tolist() == ref.tolist()


def _check_against_training(target, head, ids, px=None, max_new_tokens=24, target_lean=True):
    """Decode with a 3-guess chain; at every step compare the guesses' path confidences with the
    unrolled training forward over the same text. Returns (steps checked, decode stats)."""
    steps = []
    dec = SpeculativeDecoder(target, head, method="chain", chain_length=3, draft_quant="none", draft_vocab=None,
                             target_lean=target_lean)
    out = dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=max_new_tokens,
                       on_step=lambda tree, v: steps.append((tree, len(v.emitted(tree)))))
    text = out.sequences[0].tolist()
    rows = target.get_output_embeddings().weight.detach()
    end, checked = ids.shape[1] + 1, 0  # the text up to the first step's root: the prompt and the first token
    for tree, emitted in steps:
        seq = torch.tensor([text[:end] + tree.tokens[1:3].tolist()])
        root = end - 1
        end += emitted
        if px is not None and int((seq == IMAGE_TOKEN).sum()) != N_IMAGE_TOKENS:
            continue  # the random target wrote its image token
        with torch.inference_mode():
            feats = target(input_ids=seq, pixel_values=px, output_hidden_states=True).hidden_states[-1]
            outs = [o @ rows.T for o in head.teacher_forced(target, seq, feats, passes=3)]
        want, conf = [], 1.0
        for s, logits in enumerate(outs):  # pass s+1 at position root+s gives the guess at depth s+1
            conf *= float(torch.softmax(logits[0, root + s], -1)[tree.tokens[s + 1]])
            want.append(conf)
        torch.testing.assert_close(tree.score[1:4].tolist(), want, rtol=1e-4, atol=1e-6)
        checked += 1
    return checked, out.stats


@pytest.mark.parametrize("target_lean", [True, False])
def test_decoder_feeds_the_head_as_training_does(target, head, target_lean):
    """A VLM target: the head's first input features come from generate()'s prefill, the later
    ones from the exact lean path or from transformers' forward."""
    ids, px = llava_prompt(1)
    checked, _ = _check_against_training(target, head, ids, px, target_lean=target_lean)
    assert checked >= 3


def test_decoder_feeds_accepted_tokens_their_target_features():
    """A head that is nearly the target (its one layer, reading the embedding plus a little of the
    feature) has most guesses accepted, so every step re-feeds several accepted tokens with the
    target's features; the draft probabilities must still equal training's."""
    target = tiny_lm(3, layers=1)
    head = EagleHead.from_target(target)
    h = head.shape.hidden
    torch.manual_seed(0)
    with torch.no_grad():
        head.fc.weight.copy_(torch.cat([torch.eye(h), 0.003 * torch.randn(h, h)], 1))
        head.fc.bias.zero_()
    checked, stats = _check_against_training(target, head, text_prompt(4, length=10), max_new_tokens=40)
    assert checked >= 5 and stats["mean_accepted"] > 1.5, stats


def test_unroll_mask_is_the_tree_view():
    m = unroll_mask(4, 3)  # pass 3: pass 1 up to j-2, pass 2 at j-1, pass 3 at j
    assert m.shape == (4, 12)
    assert m[3].nonzero().flatten().tolist() == [0, 1, 4 + 2, 8 + 3]
    assert unroll_mask(4, 1).equal(torch.ones(4, 4, dtype=torch.bool).tril())


def test_sampling_with_a_head_is_lossless():
    """Chi-square against the target's exact distribution of 3 sampled tokens (as
    tests/core/test_sampling_lossless.py does for draft models)."""
    from collections import Counter

    from random_models import chi2_pvalue, exact_sequence_probs
    from specllava.core.sampling import SamplingParams

    V = 8
    target = tiny_lm(11, vocab=V, hidden=32, layers=1, init=0.6)
    torch.manual_seed(2)
    head = EagleHead.from_target(target)
    ids = text_prompt(5, length=6, vocab=V)
    params = SamplingParams(True, 1.0, 0, 1.0)
    probs = exact_sequence_probs(target, ids, params, 3)
    dec = SpeculativeDecoder(target, head, method="dynamic", draft_quant="none", min_path_conf=0.0,
                             min_feed_mass=0.0, node_budget=12, max_depth=3, max_children=3, frontier=4)
    counts = Counter()
    for i in range(1200):
        out = dec.generate(input_ids=ids, max_new_tokens=3, do_sample=True, seed=1000 + i)
        counts[tuple(out.sequences[0, ids.shape[1]:].tolist())] += 1
    assert chi2_pvalue(counts, probs) > 1e-3


def test_head_file_round_trip_and_shape_check(tmp_path, target, head):
    path = head.save(tmp_path / "eagle_head.safetensors")
    assert EagleHead.is_head_file(path) and EagleHead.is_head_file(tmp_path)
    back = EagleHead.load(tmp_path)
    assert back.token_ranking == list(range(40))
    for name, value in head.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="trained for a target of shape"):
        SpeculativeDecoder(tiny_llava(0, hidden=32), back)
    other = tiny_llava(0)
    other.config.text_config.hidden_act = "gelu"  # not a SiLU MLP: not a Llama-style target
    with pytest.raises(ValueError, match="Llama-style targets only"):
        SpeculativeDecoder(other, back)
