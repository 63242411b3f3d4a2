"""Loading any Hugging Face target/draft by path or hub id, the same way for every command.

A model whose config has a `vision_config` loads as an image-text-to-text model (LLaVA and
relatives), anything else as a causal LM. `import specllava.models` has already registered the
default pair's EfficientNet vision tower, so its cached directories load here too.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from .options import DTYPES, LoadOptions


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def load_model(path: str, options: LoadOptions | torch.dtype | str = "auto", role: str = "target"):
    """A target or draft from a local directory or a hub id, loaded as `options` say: dtype
    ("auto" picks the hardware's fastest exact-enough one), device, accelerate device_map (the
    target only: a draft is small and goes on `device`) and attn_implementation. A hub id resolves
    from the Hugging Face cache; with HF_HUB_OFFLINE=1 only from there."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    options = _options(options)
    config = _load_config(path)
    cls = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    kwargs = {"dtype": options.torch_dtype, "local_files_only": _local_only(path)}
    if options.attn_implementation is not None:
        kwargs["attn_implementation"] = options.attn_implementation
    device = torch.device(options.resolved_device)
    if options.device_map is not None and role == "target":
        kwargs["device_map"] = options.device_map
    elif device.type != "cpu":
        kwargs["device_map"] = {"": device}  # straight onto the device, no copy in host memory
    try:
        model = cls.from_pretrained(path, **kwargs)
    except ImportError as err:  # e.g. flash_attention_2 without the flash-attn package
        raise ValueError(f"cannot load {path!r} with {kwargs}: {err}") from err
    model.eval()
    return model


def _options(options) -> LoadOptions:
    if isinstance(options, LoadOptions):
        return options
    if isinstance(options, torch.dtype):
        name = next(k for k, v in DTYPES.items() if v == options)
        return LoadOptions(dtype=name, device="cpu")  # a bare dtype: the CPU, as before options existed
    return LoadOptions(dtype=options)


def _load_config(path: str):
    from huggingface_hub import constants
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=_local_only(path))
    except (OSError, ValueError) as err:
        if os.path.isdir(path):
            raise ValueError(_unknown_model_type(path) or f"cannot load a model config from the directory {path!r} "
                             f"({' '.join(str(err).split())})") from err
        unreachable = None if constants.HF_HUB_OFFLINE else hub_unreachable()
        if constants.HF_HUB_OFFLINE or unreachable:
            why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the hub cannot be reached ({unreachable})"
            where = (f"it is not a local folder, {why}, and the Hugging Face cache ({constants.HF_HUB_CACHE}) does not "
                     f"hold it; give a model folder, or download it first where the hub is reachable "
                     f"(huggingface-cli download {path})")
            raise ValueError(f"cannot load a model from {path!r}: {where}") from err
        where = "it is not a local folder, and the hub could not give it"
        raise ValueError(f"cannot load a model from {path!r}: {where} ({type(err).__name__}: "
                         f"{' '.join(str(err).split())})") from err


def _unknown_model_type(path: str) -> str | None:
    """The one-line reason for a config whose model_type transformers does not know, if that is it."""
    import json

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(model_type, str) or model_type in CONFIG_MAPPING:
        return None
    return (f"{Path(path) / 'config.json'} has model_type {model_type!r}, which transformers "
            f"{transformers.__version__} does not know: upgrade transformers (pip install -U transformers), "
            "or check the config")


@functools.cache
def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (one TCP connection to its endpoint, tried once
    per process), or None when it can or when a proxy is set (the proxy then decides). Without this,
    loading a hub id with no network retries for about half a minute before it fails."""
    import socket
    import urllib.request
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    if urllib.request.getproxies().get(url.scheme):
        return None
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
    except OSError as err:
        return f"{url.hostname}: {err.strerror or err}"
    return None


def _local_only(path: str) -> bool:
    """Load `path` from the local Hugging Face cache only: a hub id while the hub cannot be reached."""
    from huggingface_hub import constants

    return not os.path.isdir(path) and not constants.HF_HUB_OFFLINE and hub_unreachable() is not None


def load_processor(path: str):
    from transformers import AutoProcessor, AutoTokenizer

    local = _local_only(path)
    try:
        return AutoProcessor.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError, TypeError):
        return AutoTokenizer.from_pretrained(path, local_files_only=local)


def chat_inputs(processor, prompt: str, image=None) -> dict:
    """Tokenised chat prompt (+ pixel_values, and whatever else the processor returns, e.g.
    LLaVA-NeXT's image_sizes) for one user message, the image entry before the text. The text
    may not hold the processor's image placeholder (`<image>`): the template puts it where the
    image goes, and a second one would ask for an image that is not there."""
    token = getattr(processor, "image_token", None)
    if isinstance(token, str) and token and token in prompt:
        raise ValueError(f"the prompt contains {token!r}, the placeholder the processor puts where the image goes; "
                         "remove it from the text (an image, when given, is placed before the text)")
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    return encode_conversation(processor, [{"role": "user", "content": content}], image)


def encode_conversation(processor, conversation: list[dict], image=None) -> dict:
    """A conversation's prompt tensors as the model card's usage builds them: the processor's chat
    template with the generation prompt, then the processor (its tokenizer for a text-only prompt),
    keeping the tokenizer's special tokens (llava-hf's template writes no `<s>`; the tokenizer adds
    it, `leading_special_ids`)."""
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    tok = getattr(processor, "tokenizer", processor)
    if image is None:
        out = dict(tok(text, return_tensors="pt", add_special_tokens=False))
    else:
        out = dict(processor(images=image, text=text, return_tensors="pt", add_special_tokens=False))
    prefix = leading_special_ids(tok, text)
    if prefix:
        n = out["input_ids"].shape[1]
        for key, value in out.items():  # every per-token tensor gets the leading tokens' entries
            if torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == n:
                lead = torch.tensor([prefix]) if key == "input_ids" else torch.full(
                    (1, len(prefix)), 1 if key == "attention_mask" else 0)
                out[key] = torch.cat([lead.to(value), value], dim=1)
    return out


def load_pair(target: str | None, draft: str | None, options: LoadOptions | torch.dtype | str, need_draft: bool,
              why: str = ""):
    """(target, draft, processor, info) for the CLI commands: both paths (local directories or hub
    ids), or neither for the embedded default pair, loaded as `options` say (`LoadOptions`, or a
    bare dtype). `need_draft` False skips loading a draft; `why` names what needs one. A draft
    path that holds an EAGLE head (`core.eagle`, from `train-eagle`) loads the head; it goes with
    any target of its shape, the default one included."""
    from ..core.eagle import EagleHead

    options = _options(options)
    if draft is not None and EagleHead.is_head_file(draft):
        head = EagleHead.load(draft)
        loaded, _, processor, info = load_pair(target, None, options, need_draft=False)
        head.check_target(loaded)
        return loaded, (head if need_draft else None), processor, {**info, "draft": str(draft), "draft_kind": "eagle-head"}
    if target is None:  # the default target; with the default draft unless one is given
        if options.device_map is not None or options.attn_implementation is not None:
            raise ValueError("--device-map and --attn-implementation apply to --target/--draft models, "
                             "not to the default pair")
        from . import load_default_models

        where = {} if options.device is None else {"device": options.device}
        m = load_default_models(dtype=options.dtype, draft=need_draft and draft is None, **where)
        info = {"target": "default", "draft": "default", "trained": dict(m.paths.trained)}
        if draft is None or not need_draft:
            return m.target, m.draft, m.processor, info
        return m.target, load_model(draft, options, role="draft"), m.processor, {**info, "draft": draft}
    if need_draft and draft is None:
        raise ValueError(f"{why or 'this method'} needs --draft")
    loaded_target = load_model(target, options, role="target")
    loaded_draft = load_model(draft, options, role="draft") if need_draft else None
    return loaded_target, loaded_draft, load_processor(target), {"target": target, "draft": draft}


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
