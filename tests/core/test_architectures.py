"""Exactness for the architecture families users run: LLaVA-NeXT (anyres, image_sizes) with a
text-only draft and with a LLaVA-NeXT draft sharing the vision features; Mistral-style sliding
windows smaller than prompt + output; a target dispatched by accelerate with CPU and disk
offload; and what is refused at construction (flash-attention, mixed attention kinds)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from random_models import IMAGE_TOKEN, N_IMAGE_TOKENS, VOCAB, _finish, llama_config, perturbed_copy, text_prompt, tiny_lm
from specllava import SpeculativeDecoder
from specllava.core.backends import exact_backend, unsupported_exact
from specllava.core.model_info import is_dispatched
from specllava.core.runner import ModelRunner
from specllava.core.vision import capture_projector_input, draft_image_inputs, shares_vision_tower

PINPOINTS = [[16, 32], [32, 16], [32, 32]]
METHODS = [("chain", {}), ("static", {}), ("dynamic", {}), ("dynamic", dict(min_feed_mass=0.0, max_depth=5))]
METHOD_IDS = ["chain", "static", "dynamic", "dynamic-deep"]


def _vision():
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=16, patch_size=4, projection_dim=32)


def tiny_llava_next(seed: int, **kw) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaNextConfig(vision_config=_vision(), text_config=llama_config(**kw), image_token_id=IMAGE_TOKEN,
                          projector_hidden_act="gelu", vision_feature_select_strategy="default",
                          vision_feature_layer=-1, image_grid_pinpoints=PINPOINTS, image_seq_length=N_IMAGE_TOKENS)
    model = _finish(LlavaNextForConditionalGeneration(cfg))
    with torch.no_grad():  # a visible newline embedding (it is zeros-ish at init)
        model.model.image_newline.normal_(generator=torch.Generator().manual_seed(seed))
    return model


def next_inputs(model, height: int, width: int, seed: int = 0) -> dict:
    """What LLaVA-NeXT's processor returns for one image of height x width and a short text:
    input_ids with as many image tokens as the anyres features, pixel_values [1, patches, 3, 16, 16]
    and image_sizes [1, 2]."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                      image_grid_pinpoints=PINPOINTS)
    pixels = dict(proc(images=image, return_tensors="pt"))
    with torch.inference_mode():
        feats = model.model.get_image_features(pixels["pixel_values"], pixels["image_sizes"], vision_feature_layer=-1,
                                               vision_feature_select_strategy="default")
    n = sum(f.shape[0] for f in feats.pooler_output)
    text = rng.integers(3, IMAGE_TOKEN, 6).tolist()
    ids = torch.tensor([[1, *text[:2], *([IMAGE_TOKEN] * n), *text[2:]]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels}


def sharing_next_draft(target, seed=3):
    draft = tiny_llava_next(seed, hidden=32, layers=1)
    draft.model.vision_tower.load_state_dict(target.model.vision_tower.state_dict())
    return draft


def reference(model, inputs, max_new_tokens):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)


# -- LLaVA-NeXT ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def next_target():
    return tiny_llava_next(0)


@pytest.fixture(scope="module")
def next_drafts(next_target):
    return {
        "text-only": tiny_lm(77, hidden=32, layers=1),
        "next-sharing": sharing_next_draft(next_target),
        "next-perturbed": perturbed_copy(next_target, 0.05, seed=1),  # its own (perturbed) vision tower
    }


@pytest.mark.parametrize("size", [(20, 40), (30, 30)], ids=["20x40", "30x30"])
@pytest.mark.parametrize("draft_kind", ["text-only", "next-sharing", "next-perturbed"])
@pytest.mark.parametrize("method, options", METHODS, ids=METHOD_IDS)
def test_llava_next_greedy_equals_generate(next_target, next_drafts, size, draft_kind, method, options):
    inputs = next_inputs(next_target, *size)
    assert inputs["pixel_values"].dim() == 5 and "image_sizes" in inputs
    dec = SpeculativeDecoder(next_target, next_drafts[draft_kind], method=method, **options)
    assert dec.shares_vision == (draft_kind == "next-sharing")
    out = dec.generate(**inputs, max_new_tokens=24)
    assert torch.equal(out.sequences, reference(next_target, inputs, 24))
    if draft_kind == "next-perturbed":
        assert out.stats["mean_accepted"] > 1.2  # the draft did take part


def test_the_two_image_sizes_give_different_token_counts(next_target):
    a, b = next_inputs(next_target, 20, 40), next_inputs(next_target, 30, 30)
    assert a["pixel_values"].shape[1] != b["pixel_values"].shape[1]
    assert a["input_ids"].shape[1] != b["input_ids"].shape[1]


@torch.inference_mode()
def test_llava_next_shared_features_give_the_drafts_own_prefill(next_target):
    draft = sharing_next_draft(next_target)
    assert shares_vision_tower(next_target, draft)
    inputs = next_inputs(next_target, 20, 40)
    with capture_projector_input(next_target) as seen:
        next_target(**inputs)
    assert len(seen) == 1
    own, reused = ModelRunner(draft), ModelRunner(draft)
    a = own.prefill(inputs["input_ids"], pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    b = reused.prefill(inputs["input_ids"],
                       mm_encoder_outputs=draft_image_inputs(draft, seen[0], inputs["image_sizes"]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_llava_next_sampling_runs_with_image_sizes(next_target, next_drafts):
    inputs = next_inputs(next_target, 30, 30)
    dec = SpeculativeDecoder(next_target, next_drafts["next-sharing"], method="dynamic")
    a = dec.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=0.8, seed=5)
    b = dec.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=0.8, seed=5)
    assert torch.equal(a.sequences, b.sequences) and a.stats["new_tokens"] == 12


def test_unknown_model_inputs_are_refused_by_generate(next_target, next_drafts):
    inputs = next_inputs(next_target, 20, 40)
    dec = SpeculativeDecoder(next_target, next_drafts["text-only"], method="chain")
    with pytest.raises((ValueError, TypeError)):
        dec.generate(**inputs, max_new_tokens=4, not_a_model_input=torch.ones(1))


# -- sliding windows (Mistral) -------------------------------------------------------------------
def mistral_config(window: int, vocab=VOCAB, hidden=48, layers=2) -> MistralConfig:
    return MistralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.15, sliding_window=window, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)


def tiny_mistral(seed: int, window: int, **kw) -> MistralForCausalLM:
    torch.manual_seed(seed)
    return _finish(MistralForCausalLM(mistral_config(window, **kw)))


def tiny_llava_mistral(seed: int, window: int, **kw) -> LlavaForConditionalGeneration:
    """llava-v1.6-mistral's language model under a LLaVA-1.5 wrapper: a window of `window`."""
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=_vision(), text_config=mistral_config(window, **kw), image_token_id=IMAGE_TOKEN,
                      projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
                      image_seq_length=N_IMAGE_TOKENS)
    return _finish(LlavaForConditionalGeneration(cfg))


@pytest.mark.parametrize("method, options", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("prompt_len, new", [(5, 3), (10, 30)], ids=["inside-window", "beyond-window"])
@pytest.mark.parametrize("draft_kind", ["mistral-perturbed", "llama"])
def test_sliding_window_greedy_equals_generate(method, options, prompt_len, new, draft_kind):
    window = 8
    target = tiny_mistral(0, window)
    draft = perturbed_copy(target, 0.05, seed=1) if draft_kind == "mistral-perturbed" else tiny_lm(5, hidden=32, layers=1)
    ids = text_prompt(prompt_len, prompt_len)
    dec = SpeculativeDecoder(target, draft, method=method, **options)
    out = dec.generate(ids, max_new_tokens=new)
    assert torch.equal(out.sequences, reference(target, {"input_ids": ids}, new))
    if draft_kind == "mistral-perturbed" and prompt_len + new > window:
        assert out.stats["mean_accepted"] > 1.2


def test_the_window_matters_in_this_test():
    """The same weights without the window emit something else: the window is really crossed."""
    windowed, full = tiny_mistral(0, 8), tiny_mistral(0, None)
    ids = text_prompt(10, 10)
    assert not torch.equal(reference(windowed, {"input_ids": ids}, 30), reference(full, {"input_ids": ids}, 30))


def test_llava_with_a_windowed_language_model_equals_generate():
    from random_models import llava_prompt

    target = tiny_llava_mistral(0, window=12)  # the 16 image tokens alone exceed it
    draft = perturbed_copy(target, 0.05, seed=1)
    ids, px = llava_prompt(1)
    for method in ("chain", "dynamic"):
        out = SpeculativeDecoder(target, draft, method=method).generate(ids, px, max_new_tokens=20)
        assert torch.equal(out.sequences, reference(target, {"input_ids": ids, "pixel_values": px}, 20))


# -- accelerate-dispatched targets -----------------------------------------------------------------
def _offloaded(model, tmp_path):
    """`model` dispatched by accelerate: embeddings and the first layer on the CPU, the second
    layer offloaded to disk (loaded by a hook at each forward), the rest on the CPU."""
    from accelerate import dispatch_model

    lm = "model.language_model"
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", f"{lm}.embed_tokens": "cpu",
                  f"{lm}.layers.0": "cpu", f"{lm}.layers.1": "disk", f"{lm}.norm": "cpu",
                  f"{lm}.rotary_emb": "cpu", "lm_head": "cpu"}
    return dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path / "offload"))


@pytest.mark.parametrize("method", ["chain", "dynamic"])
def test_offloaded_target_equals_generate(tmp_path, method):
    from random_models import llava_prompt, tiny_llava

    plain = tiny_llava(0)
    draft = perturbed_copy(plain, 0.05, seed=1)
    ids, px = llava_prompt(3)
    expected = reference(plain, {"input_ids": ids, "pixel_values": px}, 16)
    target = _offloaded(plain, tmp_path)
    assert is_dispatched(target) and "accelerate" in unsupported_exact(target)
    assert exact_backend(target) is None  # refused up front, the self-check never runs
    dec = SpeculativeDecoder(target, draft, method=method)
    assert dec.target_backend.kind == "transformers"
    out = dec.generate(ids, px, max_new_tokens=16)
    assert torch.equal(out.sequences, expected)
    assert torch.equal(out.sequences, reference(target, {"input_ids": ids, "pixel_values": px}, 16))


# -- refused at construction ------------------------------------------------------------------------
def test_flash_attention_targets_and_drafts_are_refused_at_construction():
    target, draft = tiny_lm(0), tiny_lm(1, hidden=32, layers=1)
    target.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        SpeculativeDecoder(target, draft, method="dynamic")
    SpeculativeDecoder(target, method="ar")  # plain decoding uses no tree mask
    target, draft = tiny_lm(0), tiny_lm(1, hidden=32, layers=1)
    draft.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="draft.*sdpa"):
        SpeculativeDecoder(target, draft, method="chain")


def test_mixed_attention_kinds_are_refused_at_construction():
    target = tiny_mistral(0, 8)
    target.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="several attention kinds"):
        SpeculativeDecoder(target, tiny_lm(1, hidden=32, layers=1), method="dynamic")


def test_offloaded_target_with_an_eagle_head_equals_generate(tmp_path):
    """The EAGLE head reads a dispatched target's features (from its last layer, wherever that sits)."""
    from random_models import llava_prompt, tiny_llava

    from specllava.core.eagle import EagleHead

    plain = tiny_llava(0)
    head = EagleHead.from_target(plain, token_ranking=list(range(40)))
    ids, px = llava_prompt(3)
    expected = reference(plain, {"input_ids": ids, "pixel_values": px}, 16)
    target = _offloaded(plain, tmp_path)
    dec = SpeculativeDecoder(target, head, method="dynamic")
    assert dec.target_backend.kind == "transformers" and dec.draft_backend.kind == "eagle-head"
    out = dec.generate(ids, px, max_new_tokens=16)
    assert torch.equal(out.sequences, expected) and out.stats["mean_accepted"] > 1
