"""`generate(on_logits=...)`: the target's raw logits behind every emitted token (the server's
logprobs), equal to the target's own generate() scores, one row per token."""

import pytest
import torch

from random_models import llava_prompt, perturbed_copy, tiny_llava
from specllava import SpeculativeDecoder


@pytest.mark.parametrize("method", ["ar", "chain", "dynamic"])
def test_logits_rows_are_the_targets_own_per_emitted_token(method):
    target = tiny_llava(0)
    draft = perturbed_copy(target, 0.05, seed=1)
    ids, px = llava_prompt(0)
    rows = []
    out = SpeculativeDecoder(target, draft, method=method).generate(ids, px, max_new_tokens=15,
                                                                     on_logits=lambda lg: rows.append(lg.clone()))
    new = out.sequences[0, ids.shape[1]:]
    with torch.inference_mode():
        ref = target.generate(input_ids=ids, pixel_values=px, max_new_tokens=15, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    got = torch.cat(rows)  # one row per emitted token
    assert out.stats["mean_accepted"] > 1 or method == "ar"
    assert got.argmax(-1).tolist() == new.tolist()
    torch.testing.assert_close(got.float(), torch.cat(ref.logits).float(), atol=1e-4, rtol=1e-4)


def test_step_results_carry_each_sequences_own_logits():
    """Two sequences stepped together (`start(keep_logits=True)`, `step`): each StepResult's rows
    are that request's own target logits, as generate() reports them alone."""
    target = tiny_llava(0)
    decoder = SpeculativeDecoder(target, perturbed_copy(target, 0.05, seed=1), method="dynamic")
    prompts = [llava_prompt(0), llava_prompt(1)]
    seqs = [decoder.start(ids, px, max_new_tokens=12, keep_logits=True) for ids, px in prompts]
    rows = [[s.first_logits] for s in seqs]
    while not all(s.finished for s in seqs):
        for result in decoder.step(seqs):
            assert result.logits.shape[0] == len(result.tokens)
            rows[seqs.index(result.sequence)].append(result.logits)
    for (ids, px), seq, got in zip(prompts, seqs, rows):
        with torch.inference_mode():
            ref = target.generate(input_ids=ids, pixel_values=px, max_new_tokens=12, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
        assert seq.tokens == ref.sequences[0, ids.shape[1]:].tolist()
        torch.testing.assert_close(torch.cat(got).float(), torch.cat(ref.logits).float(), atol=1e-4, rtol=1e-4)
    assert decoder.start(*prompts[0], max_new_tokens=3).first_logits is None  # only when asked
