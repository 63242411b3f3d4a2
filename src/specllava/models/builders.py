"""The parts of a LLaVA target/draft pair built from a causal Llama LM and the EfficientNet tower.

Contract:

- `build_target(language_model, vision_tower, image_token_id)` returns a stock
  `LlavaForConditionalGeneration` (LLaVA-1.5 architecture: the tower, a two-layer gelu MLP projector,
  the LM) whose LM weights are the given LM's and whose projector is freshly initialised.
- `build_draft_from_target(target, num_layers)` returns a shallower LLaVA with the same vocabulary,
  tower and projector, initialised from the target (the draft-training starting point).
- `repurpose_special_token` and `build_processor` give the tokenizer and the stock `LlavaProcessor`
  that expands ``<image>`` into the tower's (S/32)^2 image tokens, with SmolLM2's chat template
  extended to LLaVA-style content lists (`CHAT_TEMPLATE`).

Nothing here reads files or the network; `assemble` feeds these functions the pretrained parts.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedModel

from specllava.models.efficientnet_vision import EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel

# SmolLM2's chat template (from its GGUF), extended: content may be a string (rendered as before) or a
# list of {"type": "text", "text": ...} / {"type": "image"} items rendered in order, an image as
# "<image>\n" like LLaVA-1.5's prompts. Assistant content sits in {% generation %} so that
# apply_chat_template(..., return_assistant_tokens_mask=True) can mask training losses.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>' }}"
    "{%- endgeneration -%}{%- else -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>' }}"
    "{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)



def repurpose_special_token(tokenizer, old: str, new: str):
    """A copy of ``tokenizer`` in which special token ``old`` is renamed ``new`` (same id).

    The fast tokenizer's JSON is edited rather than calling ``add_tokens``, which can only append ids
    (see `assemble.AssemblyRecipe.repurposed_token` for why an id is reused). ``new`` becomes the tokenizer's
    ``image_token`` (``tokenizer.image_token`` / ``image_token_id``), as in llava-hf tokenizers.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tok_path = Path(tmp) / "tokenizer.json"
        data = json.loads(tok_path.read_text(encoding="utf-8"))
        entries = [t for t in data["added_tokens"] if t["content"] == old and t.get("special")]
        if len(entries) != 1:
            raise ValueError(f"the tokenizer has no special token {old!r} to repurpose as {new!r}")
        if any(t["content"] == new for t in data["added_tokens"]) or new in data["model"].get("vocab", {}):
            raise ValueError(f"the tokenizer already has a token {new!r}")
        entries[0]["content"] = new
        vocab = data["model"].get("vocab")
        if isinstance(vocab, dict) and old in vocab:
            vocab[new] = vocab.pop(old)
        tok_path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        cfg_path = Path(tmp) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        for entry in cfg.get("added_tokens_decoder", {}).values():
            if entry.get("content") == old:
                entry["content"] = new
        cfg_path.write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
        renamed = AutoTokenizer.from_pretrained(tmp, extra_special_tokens={"image_token": new})
    if renamed.convert_tokens_to_ids(new) != tokenizer.convert_tokens_to_ids(old):
        raise RuntimeError(f"renaming {old!r} to {new!r} changed its id")
    return renamed


def build_processor(tokenizer, vision_config: EfficientNetLiteVisionConfig, image_token: str = "<image>"):
    """LlavaProcessor for the EfficientNet tower: ``<image>`` expands to (S/32)^2 image tokens.

    Images are padded to a square with the mean colour (LLaVA-1.5's "pad" preprocessing, so the whole
    image is seen), resized to S x S and normalised as the tower's weights expect.
    """
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    size = vision_config.image_size
    image_processor = LlavaImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(vision_config.image_mean),
        image_std=list(vision_config.image_std),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token=image_token,
        num_additional_image_tokens=0,
    )


def _plain_text_config(config):
    """The LM's config without GGUF loading leftovers, so the saved LLaVA config loads as plain fp32."""
    data = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "dtype", "architectures"):
        data.pop(key, None)
    return type(config).from_dict(data)


def build_target(
    language_model: PreTrainedModel,
    vision_tower: EfficientNetLiteVisionModel,
    image_token_id: int,
    generation_config: GenerationConfig | None = None,
) -> LlavaForConditionalGeneration:
    """LLaVA-1.5-architecture target from a causal Llama LM and the vision tower.

    The projector is freshly (randomly) initialised from the global torch RNG; callers that need
    determinism seed it (the assembly does, in a forked RNG).
    """
    text_config = _plain_text_config(language_model.config)
    if not 0 <= image_token_id < text_config.vocab_size:
        raise ValueError(f"image_token_id {image_token_id} is outside the vocabulary (size {text_config.vocab_size})")
    config = LlavaConfig(
        vision_config=copy.deepcopy(vision_tower.config),
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=vision_tower.config.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    target = LlavaForConditionalGeneration(config)
    target.model.vision_tower.load_state_dict(vision_tower.state_dict())
    target.model.language_model.load_state_dict(language_model.model.state_dict())
    if not config.tie_word_embeddings:
        target.lm_head.load_state_dict(language_model.lm_head.state_dict())
    target.generation_config = copy.deepcopy(generation_config or language_model.generation_config)
    return target.eval()


def build_draft_from_target(target: LlavaForConditionalGeneration, num_layers: int = 1) -> LlavaForConditionalGeneration:
    """A draft LLaVA initialised from the target: same tokenizer, tower and projector, shallower LM.

    The draft's LM has the target's width and heads and ``num_layers`` decoder layers copied from the
    target's first layers; the embedding, final norm and (tied) LM head are copied too, so before any
    training the draft is the target's early-exit and its vocabulary lines up with the target's.
    Returned in eval mode, in the target's dtype.
    """
    depth = target.config.text_config.num_hidden_layers
    if not 1 <= num_layers <= depth:
        raise ValueError(f"num_layers must be in 1..{depth} (the target's depth), got {num_layers}")
    config = copy.deepcopy(target.config)
    config.text_config.num_hidden_layers = num_layers
    draft = LlavaForConditionalGeneration(config)
    source = target.state_dict()
    # The first num_layers layers have the same names in both models, so every draft tensor has a
    # same-named source in the target.
    draft.load_state_dict({name: source[name] for name in draft.state_dict()}, strict=True)
    draft.generation_config = copy.deepcopy(target.generation_config)
    return draft.to(next(target.parameters()).dtype).eval()


