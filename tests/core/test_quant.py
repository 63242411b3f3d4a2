"""The int8 draft path (specllava.core.quant): close to the float draft, never touches the model
it was made from, and changes nothing the target emits."""

import pytest
import torch

from random_models import feed_tree, llava_prompt, perturbed_copy, tiny_llava
from specllava import SpeculativeDecoder
from specllava.core.quant import Int8Linear, batch_rows, int8_decoder, int8_supported, resolve_quant

pytestmark = pytest.mark.skipif(not int8_supported(), reason="no quantized CPU kernels in this torch build")


def test_int8_linear_is_close_to_the_float_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    x = torch.randn(5, 64)
    ref, out = lin(x), Int8Linear(lin.weight, lin.bias)(x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.03, rel
    assert (out - ref).abs().max() > 0  # it really is quantized, not the float path
    # bf16 in, bf16 out: it drops into a bf16 model and its KV cache
    assert Int8Linear(lin.weight)(x.bfloat16()).dtype == torch.bfloat16


def test_int8_rows_of_a_batch_are_quantized_as_each_row_alone():
    torch.manual_seed(0)
    lin = Int8Linear(torch.randn(96, 64))
    x = torch.randn(3, 4, 64)
    x[1] *= 50  # a row with a much wider range must not coarsen the others' rounding
    real = [4, 2, 3]  # row b's first real[b] tokens; the rest are pads
    alone = [lin(x[b : b + 1, :n]) for b, n in enumerate(real)]
    assert not torch.equal(lin(x)[0], alone[0][0])  # quantized together, rows round each other
    for batched in (x, x.reshape(12, 64)):  # [B, n, in] or its rows flattened
        with batch_rows(real):
            out = lin(batched).reshape(3, 4, 96)
        for b, n in enumerate(real):
            assert torch.equal(out[b, :n], alone[b][0])
            assert not out[b, n:].any()
    # right-aligned rows (pads first), and an input of fewer columns (a head on the last token)
    alone = [lin(x[b : b + 1, 4 - n :]) for b, n in enumerate(real)]
    with batch_rows(real, last=True):
        out, head = lin(x), lin(x[:, -1:])
    for b, n in enumerate(real):
        assert torch.equal(out[b, 4 - n :], alone[b][0]) and not out[b, : 4 - n].any()
        assert torch.equal(head[b], lin(x[b : b + 1, -1:])[0])


def test_int8_decoder_copies_the_body_and_leaves_the_model_alone():
    model = tiny_llava(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = int8_decoder(model)
    body = model.get_decoder()
    assert fast is not body
    assert fast.get_input_embeddings() is body.get_input_embeddings()  # shared, not copied
    assert body.get_input_embeddings() is not None
    kinds = {type(m) for m in fast.modules()}
    assert Int8Linear in kinds and torch.nn.Linear not in kinds
    assert any(isinstance(m, torch.nn.Linear) for m in body.modules())  # the original is untouched
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", ["chain", "dynamic"])
def test_int8_draft_is_exact_and_accepts_like_the_float_draft(method):
    """Greedy output equals generate() with the int8 draft, and a draft equal to the target still
    has nearly all its guesses accepted: a wrong cache, mask or position on the int8 path would
    show as collapsed acceptance here (the exactness check alone would not see it)."""
    target = tiny_llava(0)
    ids, px = llava_prompt(3)
    with torch.inference_mode():
        ref = target.generate(input_ids=ids, pixel_values=px, max_new_tokens=40, do_sample=False)
    stats = {}
    for quant in ("none", "int8"):
        opts = dict(min_path_conf=0.0, min_feed_mass=0.0, node_budget=24, max_depth=5, frontier=6) if method == "dynamic" else {}
        dec = SpeculativeDecoder(target, perturbed_copy(target, 0.0, seed=0), method=method,
                                 draft_quant=quant, **opts)
        assert (dec.draft_backend.kind != "transformers") == (quant == "int8")
        out = dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=40)
        assert torch.equal(out.sequences, ref), quant
        stats[quant] = out.stats["mean_accepted"]
    assert stats["int8"] >= 0.8 * stats["none"], stats
    assert stats["none"] > 3.0, stats


def test_int8_with_a_reduced_vocabulary_is_exact(tiny_pair):
    target, draft = tiny_pair
    ids, px = llava_prompt(1)
    with torch.inference_mode():
        ref = target.generate(input_ids=ids, pixel_values=px, max_new_tokens=32, do_sample=False)
    dec = SpeculativeDecoder(target, draft, method="dynamic", draft_vocab=60, draft_quant="int8")
    assert dec.draft_backend.quant == "int8" and dec.draft_backend.vocab_ids.numel() < 60 + 1
    assert torch.equal(dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=32).sequences, ref)


def test_quant_choices_and_errors():
    assert resolve_quant("auto", "cpu") == "int8"
    assert resolve_quant("none", "cpu") is None and resolve_quant(None, "cpu") is None
    assert resolve_quant("auto", "meta") is None  # not a CPU: auto keeps the draft as it is
    with pytest.raises(ValueError, match="needs the draft on a CPU"):
        resolve_quant("int8", "meta")
    with pytest.raises(ValueError, match="unknown draft_quant"):
        resolve_quant("int4", "cpu")
    target = tiny_llava(0)
    with pytest.raises(ValueError, match="unknown draft_quant"):
        SpeculativeDecoder(target, tiny_llava(1), draft_quant="fp8")
    assert SpeculativeDecoder(target, None, method="ar").draft_backend is None


def _tree_logits(model, backend, vocab_ids=None):
    """Logits of a 5-node tree fed on top of a prefilled prompt, through `backend` (None: the model's forward)."""
    from specllava.core.runner import ModelRunner

    ids, px = llava_prompt(2)
    runner = ModelRunner(model, backend)
    with torch.inference_mode():
        runner.prefill(ids, pixel_values=px)
    logits, _ = feed_tree(runner)
    return logits if vocab_ids is None else logits[:, vocab_ids]


def test_draft_paths_compute_the_models_tree_logits():
    """Fed the same tree with the same mask, the float path gives the model's own logits (exactly
    with the full head) and the int8 path gives them to within quantisation error, columns of a reduced vocabulary
    included."""
    from specllava.core.backends import DecoderBackend, draft_backend

    model = tiny_llava(0)
    ref = _tree_logits(model, None)
    full = draft_backend(model, vocab_ids=torch.arange(model.get_output_embeddings().weight.shape[0]), lean=False)
    assert isinstance(full, DecoderBackend) and torch.equal(_tree_logits(model, full), ref)
    sub = torch.tensor([3, 7, 40, 60])
    for lean in (False, True):
        # (a K-row matmul may round differently from the full one in the last bit; the lean path
        # adds and multiplies in another order)
        assert torch.allclose(_tree_logits(model, draft_backend(model, sub, lean=lean)), ref[:, sub], rtol=1e-5, atol=1e-5)
        q = _tree_logits(model, draft_backend(model, quant="int8", lean=lean))
        assert (q - ref).norm() / ref.norm() < 0.05
        assert (q.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
