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


SHARING_TYPES = ("llava", "llava_next")  # LLaVA-1.5 and LLaVA-NeXT (anyres)


def _llava_parts(model):
    """(vision_tower, multi_modal_projector) of a LLaVA or LLaVA-NeXT model that accepts
    precomputed image features, else None. Checked once per model pair (`shares_vision_tower`)."""
    if getattr(model.config, "model_type", None) not in SHARING_TYPES:
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
    if t is None or d is None or target.config.model_type != draft.config.model_type:
        return False
    for name in ("vision_feature_layer", "vision_feature_select_strategy", "image_grid_pinpoints"):
        if getattr(target.config, name, None) != getattr(draft.config, name, None):
            return False
    if target.config.vision_config.to_dict() != draft.config.vision_config.to_dict():
        return False
    ts, ds = t[0].state_dict(), d[0].state_dict()
    if ts.keys() != ds.keys():
        return False
    return all(  # weights that accelerate offloaded (on the meta device) cannot be compared: no sharing
        a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and a.device.type != "meta"
        and torch.equal(a, b)
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


def draft_image_inputs(draft, selected: torch.Tensor, image_sizes: torch.Tensor | None = None) -> dict:
    """The draft's `mm_encoder_outputs` for the target's selected vision features
    [images or patches, tokens, width]: through the draft's own projector, and for LLaVA-NeXT
    through its own anyres packing (`pack_image_features` with its `image_newline`), as the
    draft's `get_image_features` would do with the same features."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    feats = _projector(draft)(selected.to(draft.device, draft.dtype))  # [images or patches, tokens, hidden]
    if draft.config.model_type != "llava_next":
        return {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = draft.config
    patches = [image_size_to_num_patches(image_size=size, grid_pinpoints=cfg.image_grid_pinpoints,
                                         patch_size=cfg.vision_config.image_size) for size in image_sizes]
    packed, _ = draft.model.pack_image_features(torch.split(feats, patches, dim=0), image_sizes,
                                                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                                image_newline=draft.model.image_newline)
    return {"image": BaseModelOutputWithPooling(pooler_output=packed)}
