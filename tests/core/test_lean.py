"""The lean decode paths (specllava.core.backends.lean): the model's own numbers step after step
(float32), a faithful KV buffer, the architectures it takes and those it leaves to transformers."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from random_models import feed_tree, llava_prompt, perturbed_copy, text_prompt, tiny_lm, tiny_llava
from specllava import SpeculativeDecoder
from specllava.core.cache import KVBuffer, compact, crop
from specllava.core import backends
from specllava.core.backends import LeanBackend, LeanDecoder, draft_backend, exact_backend, target_backend, unsupported_exact
from specllava.core.checks import CHECKS
from specllava.core.runner import ModelRunner

DEEP = dict(min_path_conf=0.0, min_feed_mass=0.0, node_budget=24, max_depth=5, frontier=6)


def tiny_qwen2(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # q/k/v biases (zero at init) must be carried over too
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def _tree_logits(model, backend, ids, px=None):
    runner = ModelRunner(model, backend)
    with torch.inference_mode():
        runner.prefill(ids, pixel_values=px)
        first, prefix = feed_tree(runner)
        # keep nodes 0 and 2, then feed a causal chain of two (bias None) on top
        compact(runner.cache, prefix, torch.tensor([0, 2]))
        second = runner.forward(torch.tensor([23, 29]), torch.arange(prefix + 2, prefix + 4), None)
    return torch.cat([first, second]), runner


@pytest.mark.parametrize("kind", ["llava", "qwen2"])
def test_lean_path_gives_the_models_logits(kind):
    model = tiny_llava(0) if kind == "llava" else tiny_qwen2()
    ids, px = llava_prompt(2) if kind == "llava" else (text_prompt(2, length=12), None)
    ref, _ = _tree_logits(model, draft_backend(model, lean=False), ids, px)
    lean = LeanBackend(LeanDecoder(model), model.get_output_embeddings(), model.device)  # the full head
    out, runner = _tree_logits(model, lean, ids, px)
    assert runner.backend.kind == "lean" and isinstance(runner.cache, KVBuffer)
    assert runner.length == ids.shape[1] + 4
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_lean_draft_grows_the_same_trees_and_stays_exact(tiny_pair):
    """Whole decodes: with a float32 draft the lean path proposes the trees transformers' path
    proposes, step for step (a wrong position, mask or compaction would change them)."""
    target, draft = tiny_pair
    ids, px = llava_prompt(3)
    with torch.inference_mode():
        ref = target.generate(input_ids=ids, pixel_values=px, max_new_tokens=48, do_sample=False)
    trees = {}
    for lean in (False, True):
        dec = SpeculativeDecoder(target, draft, method="dynamic", draft_quant="none", draft_vocab=90, **DEEP)
        dec.draft_backend = draft_backend(draft, dec.draft_vocab, None, lean=lean)
        seen = []
        out = dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=48,
                           on_step=lambda tree, verdict: seen.append((tree.tokens.tolist(), tree.parents.tolist())))
        assert out.sequences.tolist() == ref.tolist()
        trees[lean] = seen
    assert len(trees[True]) > 5 and trees[True] == trees[False]


def test_default_int8_path_is_lean_and_exact():
    target = tiny_llava(0)
    dec = SpeculativeDecoder(target, perturbed_copy(target, 0.0, seed=0), method="dynamic", draft_quant="int8", **DEEP)
    assert dec.draft_backend.kind == "lean" and not hasattr(dec.draft_backend, "body")  # no int8 copy of the HF decoder
    ids, px = llava_prompt(5)
    with torch.inference_mode():
        ref = target.generate(input_ids=ids, pixel_values=px, max_new_tokens=40, do_sample=False)
    out = dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=40)
    assert out.sequences.tolist() == ref.tolist() and out.stats["mean_accepted"] > 3.0


def test_unsupported_drafts_keep_transformers_path():
    torch.manual_seed(0)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=12)).eval()
    assert "model_type 'qwen3'" in LeanDecoder.unsupported(qwen3)
    backend = draft_backend(qwen3, quant="int8")
    assert backend.kind == "decoder" and backend.body is not None
    with pytest.raises(ValueError, match="no lean path"):
        LeanDecoder(qwen3)
    assert LeanDecoder.unsupported(tiny_lm(0)) is None


def test_kv_buffer_grows_crops_and_compacts():
    k0 = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    buf = KVBuffer([k0.clone()], [-k0.clone()], length=3)  # full: the next write must grow it
    new = torch.full((1, 2, 2, 4), 7.0)
    keys, values = buf.write(0, new, -new)
    buf.advance(2)
    assert buf.keys[0].shape[2] >= 5 and keys.shape[2] == 5 and buf.get_seq_length() == 5
    assert torch.equal(keys[:, :, :3], k0) and torch.equal(values[:, :, 3:], -new)
    compact(buf, 1, torch.tensor([1, 3]))  # keep positions 2 and 4 at 1 and 2
    assert buf.length == 3
    assert torch.equal(buf.keys[0][:, :, :3], torch.cat([k0[:, :, :1], k0[:, :, 2:3], new[:, :, 1:]], dim=2))
    crop(buf, 2)
    assert buf.length == 2


def test_rotary_table_grows_and_matches_the_models_rotary_embedding():
    model = tiny_lm(0)
    lean = LeanDecoder(model)
    for positions in (torch.tensor([3, 9]), torch.tensor([2500, 7])):  # the second outgrows the first table
        cos, sin = lean.rope(positions)
        ref_cos, ref_sin = model.model.rotary_emb(torch.zeros(1), positions[None])
        torch.testing.assert_close(cos, ref_cos)
        torch.testing.assert_close(sin, ref_sin)
    assert lean.rope.size >= 2501


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llava", "qwen2"])
def test_exact_target_path_gives_transformers_logits_bit_for_bit(kind, dtype):
    """The target's lean path must compute exactly what transformers' forward computes: a tree
    under its mask, a compaction, a causal chain and single tokens, in float32 and bfloat16."""
    model = (tiny_llava(0) if kind == "llava" else tiny_qwen2()).to(dtype)
    ids, px = llava_prompt(2) if kind == "llava" else (text_prompt(2, length=12), None)
    px = None if px is None else px.to(dtype)
    outs = []
    for backend in (None, LeanBackend.exact(model)):
        logits, runner = _tree_logits(model, backend, ids, px)
        with torch.inference_mode():
            for token in (31, 37, 41):  # single tokens, no mask: generate()'s own decode step
                logits = torch.cat([logits, runner.forward(torch.tensor([token]), torch.tensor([runner.length]), None)])
        outs.append(logits)
    assert isinstance(runner.cache, KVBuffer) and runner.backend.kind == "exact"
    assert outs[0].dtype == dtype and torch.equal(outs[0], outs[1])


def test_exact_target_path_through_decodes():
    """Whole decodes take the target's lean path by default and stay exact against generate() in
    the same dtype: every method in float32; in bfloat16 plain decoding, whose one-token forwards
    are generate()'s own bit for bit (a tree's forward may flip a bf16 near-tie, so trees are
    checked in float32 only). target_lean=False keeps transformers' forward."""
    for dtype, methods in ((torch.float32, ("ar", "dynamic")), (torch.bfloat16, ("ar",))):
        target = tiny_llava(0).to(dtype)
        ids, px = llava_prompt(3)
        px = px.to(dtype)
        with torch.inference_mode():
            ref = target.generate(input_ids=ids, pixel_values=px, max_new_tokens=40, do_sample=False)
        for method in methods:
            dec = SpeculativeDecoder(target, perturbed_copy(target, 0.05, seed=1), method=method, **DEEP)
            assert dec.target_backend.kind == "exact"
            assert dec.generate(input_ids=ids, pixel_values=px, max_new_tokens=40).sequences.tolist() == ref.tolist()
    assert SpeculativeDecoder(target, method="ar", target_lean=False).target_backend.kind == "transformers"


def test_exact_target_path_needs_sdpa():
    model = tiny_lm(0)
    model.config._attn_implementation = "eager"
    assert "sdpa" in unsupported_exact(model) and exact_backend(model) is None
    assert target_backend(model).kind == "transformers"
    with pytest.raises(ValueError, match="quant must be None"):
        LeanDecoder(tiny_lm(0), quant="int8", exact=True)


def test_exact_target_path_checks_itself_against_transformers(monkeypatch):
    """target_backend compares the exact path with transformers' forward on the model itself and
    keeps transformers' forward (with a warning) when a single logit differs."""
    model = tiny_llava(0).to(torch.bfloat16)
    assert target_backend(model).kind == "exact"
    rms = backends.lean.rms_norm
    monkeypatch.setattr(backends.lean, "rms_norm", lambda x, w, eps: rms(x, w, eps) * (1 + 2**-7))  # one bf16 ulp off
    CHECKS.forget(model)  # the check is cached per model's weights; the code changed, not the weights
    with pytest.warns(UserWarning, match="keeps transformers' own forward"):
        assert target_backend(model).kind == "transformers"
