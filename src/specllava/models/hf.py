"""Loading any Hugging Face target/draft by path or hub id, the same way for every command.

A model whose config has a `vision_config` loads as an image-text-to-text model (LLaVA and
relatives), anything else as a causal LM. `import specllava.models` has already registered the
default pair's EfficientNet vision tower, so its cached directories load here too.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def load_model(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise ValueError(
            f"cannot load a model config from {path!r}: give a local model directory "
            f"(with config.json) or a hub id reachable from this machine ({err})"
        ) from err
    cls = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=dtype)
    model.eval()
    return model


def load_processor(path: str):
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return AutoTokenizer.from_pretrained(path)


def chat_inputs(processor, prompt: str, image=None) -> dict:
    """Tokenised chat prompt (+ pixel_values) the way LLaVA-1.5 expects: the processor's chat
    template with an image entry before the text, then the processor itself."""
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    conversation = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    if image is None:
        tok = getattr(processor, "tokenizer", processor)
        return dict(tok(text, return_tensors="pt", add_special_tokens=False))
    return dict(processor(images=image, text=text, return_tensors="pt", add_special_tokens=False))


def load_pair(target: str | None, draft: str | None, dtype: torch.dtype, need_draft: bool, why: str = ""):
    """(target, draft, processor, info) for the CLI commands: both paths, or neither for the
    embedded default pair; a draft path alone drafts for the default target. `need_draft` False
    skips loading a draft; `why` names what needs one.
    A draft path that holds an EAGLE head (`core.eagle`, from `train-eagle`) loads the head; it
    goes with any target of its shape, the default one included."""
    from ..core.eagle import EagleHead

    if draft is not None and EagleHead.is_head_file(draft):
        head = EagleHead.load(draft)
        loaded, _, processor, info = load_pair(target, None, dtype, need_draft=False)
        head.check_target(loaded)
        return loaded, (head if need_draft else None), processor, {**info, "draft": str(draft), "draft_kind": "eagle-head"}
    if target is None:  # the default target; with the default draft unless one is given
        from . import load_default_models

        m = load_default_models(dtype=dtype, draft=need_draft and draft is None)
        info = {"target": "default", "draft": "default", "trained": dict(m.paths.trained)}
        if draft is None or not need_draft:
            return m.target, m.draft, m.processor, info
        return m.target, load_model(draft, dtype), m.processor, {**info, "draft": draft}
    if need_draft and draft is None:
        raise ValueError(f"{why or 'this method'} needs --draft")
    loaded_draft = load_model(draft, dtype) if need_draft else None
    return load_model(target, dtype), loaded_draft, load_processor(target), {"target": target, "draft": draft}



def leading_special_ids(tokenizer, text: str) -> list[int]:
    """The special token ids the tokenizer puts before a text by default (a Llama tokenizer's BOS;
    none for most chat-tuned BPE tokenizers), minus those `text` (a chat template's output) already
    starts with. Prompts are encoded as the model card's usage encodes them, the templated text with
    the tokenizer's special tokens, so llava-hf's template (which writes no `<s>`) keeps its BOS:
    `leading_special_ids(tok, text) + tok(text, add_special_tokens=False).input_ids`."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a", add_special_tokens=True)["input_ids"]
    n = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
    prefix = []
    for tid in full[:n]:
        token = str(tok.convert_ids_to_tokens(int(tid)))
        if text.startswith(token):
            text = text[len(token):]
        else:
            prefix.append(int(tid))
    return prefix
