"""The draft reuses the target's vision features at prefill.

A Spec-LLaVA draft VLM shares the target's vision encoder: only its projector and language model
are its own. When the draft's vision tower has the target's weights (the default pair, and any
draft made by `train-draft`), running it again at the draft's prefill repeats the target's work
for the same result. Instead, the target's prefill records the selected vision features that go
into its projector, and the draft's prefill feeds them through the draft's own projector
(`mm_encoder_outputs`, the transformers hook for precomputed encoder outputs).

Only the draft changes: the target's prefill still runs through `generate()` untouched, so what
is emitted cannot change. When the check below fails (another architecture, different tower
weights or feature selection, an older transformers), the draft runs its own vision tower.
"""

from __future__ import annotations

import inspect
import threading
from contextlib import contextmanager

import torch


def _llava_parts(model):
    """(vision_tower, multi_modal_projector) of a plain LLaVA model that accepts precomputed
    image features, else None. Checked once per decoder (`shares_vision_tower`)."""
    if getattr(model.config, "model_type", None) != "llava":
        return None
    inner = getattr(model, "model", None)
    tower = getattr(inner, "vision_tower", None)
    proj = getattr(inner, "multi_modal_projector", None)
    if tower is None or proj is None or "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:
        return None
    return tower, proj


def _projector(model):
    """The projector of a model that `shares_vision_tower` accepted (per request: no checks)."""
    return model.model.multi_modal_projector


@torch.no_grad()
def shares_vision_tower(target, draft) -> bool:
    """True when `draft` computes exactly the target's vision features: both plain LLaVA models
    with the same feature selection and a vision tower of equal config, dtype and weights."""
    if draft is None:
        return False
    t, d = _llava_parts(target), _llava_parts(draft)
    if t is None or d is None:
        return False
    for name in ("vision_feature_layer", "vision_feature_select_strategy"):
        if getattr(target.config, name, None) != getattr(draft.config, name, None):
            return False
    if target.config.vision_config.to_dict() != draft.config.vision_config.to_dict():
        return False
    ts, ds = t[0].state_dict(), d[0].state_dict()
    if ts.keys() != ds.keys():
        return False
    return all(
        a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and torch.equal(a, b)
        for a, b in ((ts[k], ds[k]) for k in ts)
    )


@contextmanager
def capture_projector_input(target):
    """While active, records the input of the target's projector (the selected vision features)
    in the returned list. Only calls made in this thread are recorded, so concurrent requests
    on the same target cannot mix their images."""
    seen: list[torch.Tensor] = []
    me = threading.get_ident()

    def hook(module, args):
        if threading.get_ident() == me and args:
            seen.append(args[0])

    handle = _projector(target).register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def draft_image_inputs(draft, selected: torch.Tensor) -> dict:
    """The draft's `mm_encoder_outputs` for the target's selected vision features [images, tokens, width]."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    feats = _projector(draft)(selected.to(draft.device, draft.dtype))  # [images, tokens, hidden]
    return {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}
