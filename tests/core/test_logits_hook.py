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
