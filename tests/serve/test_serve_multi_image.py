"""Several images in one request, for a target that takes them (LLaVA-NeXT): a tiny LLaVA-NeXT
with a real processor (anyres tiles, each image expanded to its own number of tokens), served and
called through the openai client; the answer equals the target's own generate() on the
processor's inputs. LLaVA-1.5 keeps one image per request."""

import io

import openai
import pytest
import torch
from PIL import Image
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, LlavaNextProcessor)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from serve_helpers import data_url, image_bytes, running_server
from tiny_llava import tiny_tokenizer

from specllava.models.builders import CHAT_TEMPLATE

PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def _llama(vocab: int, hidden: int, layers: int, seed: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       initializer_range=0.3, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


@pytest.fixture(scope="module")
def next_pair():
    """(target, draft, processor): a tiny LLaVA-NeXT (CLIP tower, 16 px tiles of 4 px patches) and
    a text-only 1-layer draft, on the byte-level tiny tokenizer plus an <image> token."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    vocab = len(tok)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = LlavaNextConfig(vision_config=vision, text_config=_llama(vocab, 64, 2, 0), image_token_id=image_id,
                              projector_hidden_act="gelu", vision_feature_select_strategy="default",
                              vision_feature_layer=-1, image_grid_pinpoints=PINPOINTS)
        target = LlavaNextForConditionalGeneration(cfg).eval()
        target.model.image_newline.data.normal_()
        draft = LlamaForCausalLM(_llama(vocab, 32, 1, 1)).eval()
    target.generation_config.eos_token_id = draft.generation_config.eos_token_id = 2
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                                   image_grid_pinpoints=PINPOINTS),
        tokenizer=tok, patch_size=4, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return target, draft, proc


def _image(seed, size):
    return Image.open(io.BytesIO(image_bytes(seed, size=size))).convert("RGB")


def test_two_images_in_one_request_answer_as_the_target(next_pair):
    target, draft, proc = next_pair
    a, b = image_bytes(1, size=(20, 30)), image_bytes(2, size=(30, 18))
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Compare them."},
        {"type": "image_url", "image_url": {"url": data_url(a)}},
        {"type": "image_url", "image_url": {"url": data_url(b)}}]}]  # fmt: skip
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": "Compare them."}]}]
    text = proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=[_image(1, (20, 30)), _image(2, (30, 18))], text=text, return_tensors="pt",
                  add_special_tokens=False)
    assert inputs["pixel_values"].shape[0] == 2  # one row of tiles per image
    with torch.inference_mode():
        ref = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = proc.tokenizer.decode(ref[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    with running_server(target, draft, proc, max_tokens=12) as (url, engine, app):
        assert engine.max_images == 16 and app.state.limits.max_images == 4
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="specllava", messages=messages, max_tokens=12)
        assert r.choices[0].message.content == expected
        assert r.usage.prompt_tokens == inputs["input_ids"].shape[1] and r.usage.completion_tokens > 1
        five = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(a)}}] * 5}]
        with pytest.raises(openai.BadRequestError, match="at most 4 per request"):
            c.chat.completions.create(model="specllava", messages=five, max_tokens=3)


def test_llava_1_5_keeps_one_image_per_request(server):
    url, engine, app = server
    assert engine.max_images == 1 and app.state.limits.max_images == 1
