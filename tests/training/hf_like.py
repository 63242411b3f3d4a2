"""Random-weight stand-ins for the llava-hf checkpoints users train drafts for, saved as model folders
with a processor: a LLaVA-1.5-7B-shaped target (real widths, one layer) and a tiny LLaVA-NeXT one.

Their tokenizer is a word-level one built here that, like Vicuna's, adds ``<s>`` itself, and whose
chat template (llava-hf's shape: ``USER: <image>\\n... ASSISTANT:``, no ``<s>``) lives only on the
processor, as in the llava-hf folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{{ ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
WORDS = ("USER ASSISTANT : Describe this image . A picture number with dots What color ? red a the "
         "0 1 2 3 4 5 6 7 8 9").split()


def word_tokenizer(n_words: int) -> PreTrainedTokenizerFast:
    """<unk> <s> </s>, WORDS, fillers up to ``n_words`` ids, then <image> and <pad>; adds <s> in front."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    while len(vocab) < n_words:
        vocab[f"w{len(vocab)}"] = len(vocab)
    vocab["<image>"], vocab["<pad>"] = n_words, n_words + 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tok.chat_template is None  # the template is the processor's, as in llava-hf folders
    return tok


def _text_config(vocab, hidden, intermediate, heads, n_words) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=n_words + 1,
                       tie_word_embeddings=False)


def _save(model, processor, folder: Path, dtype) -> Path:
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.to(dtype).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def llava_1_5_7b_shaped(folder: Path, seed: int = 0) -> Path:
    """llava-1.5-7b-hf's shapes with one layer each: Llama hidden 4096 (32 heads, MLP 11008), 32064-token
    vocabulary with <image> at 32000; CLIP ViT-L/14 at 336 px (hidden 1024, 16 heads), 576 image tokens,
    vision_feature_layer -2. Saved in bf16 (about 1 GB)."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=1, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    cfg = LlavaConfig(vision_config=vision, text_config=_text_config(32064, 4096, 11008, 32, 32000),
                      image_token_id=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=576)
    with torch.device("cpu"):
        model = LlavaForConditionalGeneration(cfg).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(images, word_tokenizer(32000), patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return _save(model, processor, folder, torch.bfloat16)


PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def tiny_llava_next(folder: Path, seed: int = 0) -> Path:
    """A tiny LLaVA-NeXT (anyres over 16 px tiles, grid pinpoints up to 32x32; 16 tokens a tile)."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=32)
    cfg = LlavaNextConfig(vision_config=vision, text_config=_text_config(128, 64, 128, 4, 126), image_token_id=126,
                          projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
                          image_grid_pinpoints=PINPOINTS, image_seq_length=16)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    images = LlavaNextImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                     image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(images, word_tokenizer(126), patch_size=4, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return _save(model, processor, folder, torch.float32)


def dataset(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """``folder/data.json``: one answered record per image size (W, H), random pixels."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        records.append({"id": f"rec{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe this image."},
            {"from": "gpt", "value": f"A picture number {i} with dots."}]})
    (folder / "data.json").write_text(json.dumps(records))
    return folder / "data.json"
