"""What specllava reads off a transformers model: its kind, vocabulary, attention, devices."""

from __future__ import annotations

import inspect

import torch


def is_vlm(model) -> bool:
    return getattr(model.config, "vision_config", None) is not None


def image_token_id(model) -> int | None:
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        val = getattr(cfg, name, None)
        if val is not None:
            return int(val)
    return None


def vocab_size(model) -> int:
    """Size of the output distribution (rows of the LM head), the vocabulary that matters here."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def sliding_window(model) -> int | None:
    """The language model's attention window (Mistral's `sliding_window`) when every layer uses
    it, None for full attention. Models that mix windowed and full layers are refused by
    `unsupported_attention`."""
    cfg = model.config.get_text_config(decoder=True)
    kinds = set(getattr(cfg, "layer_types", None) or [])
    if kinds:
        return int(cfg.sliding_window) if kinds == {"sliding_attention"} else None
    window = getattr(cfg, "sliding_window", None)
    return None if window is None else int(window)


def unsupported_attention(model) -> str | None:
    """Why a tree forward through `model` would not be exact, or None: flash-attention kernels
    take no arbitrary 4D mask, and per-layer attention kinds would need one mask per kind."""
    cfg = model.config.get_text_config(decoder=True)
    impl = getattr(cfg, "_attn_implementation", None) or ""
    if "flash" in impl:
        return (f"attn_implementation {impl!r} does not honour the 4D tree attention mask; load the model with "
                "attn_implementation='sdpa' (or 'eager')")
    kinds = set(getattr(cfg, "layer_types", None) or [])
    if len(kinds) > 1:
        return f"layers of several attention kinds ({', '.join(sorted(kinds))}) are not supported"
    if kinds - {"full_attention", "sliding_attention"}:
        return f"attention kind {', '.join(sorted(kinds))} is not supported"
    return None


def is_dispatched(model) -> bool:
    """True for a model that accelerate spread over several devices or offloaded (`hf_device_map`
    with more than one entry, or weights left on the meta device until a hook loads them)."""
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    if len(devices) > 1 or "disk" in devices:
        return True
    return any(p.device.type == "meta" for p in model.parameters())


def input_device(model) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings (for an offloaded one, the
    device accelerate runs it on), which for a model on one device is `model.device`."""
    emb = model.get_input_embeddings()
    hook = getattr(emb, "_hf_hook", None)
    run_on = getattr(hook, "execution_device", None)
    if run_on is not None:
        return torch.device(f"cuda:{run_on}" if isinstance(run_on, int) else run_on)
    device = emb.weight.device
    return torch.device("cpu") if device.type == "meta" else device


def cache_kwarg(model) -> str:
    """transformers >= 5.2x names the cache argument `cache`; earlier 5.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
