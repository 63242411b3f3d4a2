"""The memory a draft's training holds for its whole run, counted on the meta device (nothing allocated).

Contract:

- `llava_1_5_7b_config()`: the config of llava-hf/llava-1.5-7b-hf (Vicuna-7B: 32 layers, hidden
  4096, 32 heads, MLP 11008, 32064-token vocabulary; CLIP ViT-L/14 at 336 px, 576 image tokens).
- `training_memory(target_config, cfg)` builds the target (in ``dtype``) and the draft
  `train-draft` would make for it (`specllava.training.distill.make_draft`: ``draft_layers``,
  ``draft_preset`` or ``draft_init``) on the meta device and counts, in bytes: the target's
  parameters (the frozen teacher), the draft's own parameters (trained ones in float32; the
  frozen tower, embedding and head are the target's tensors, no copy), their gradients (float32)
  and AdamW's two float32 moments. Their sum is the memory held from the first step to the last;
  activations (which grow with the batch and sequence length) come on top, and with several
  processes the gradients' all-reduce holds one more float32 copy of them during each step.
"""

from __future__ import annotations

import torch

GB = 1e9


def llava_1_5_7b_config():
    """The config of llava-hf/llava-1.5-7b-hf (shapes only; no download)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=32001, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def training_memory(target_config, cfg, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Bytes held by a `train-draft` run for a target of ``target_config`` in ``dtype`` with the draft
    ``cfg`` (a `DistillConfig`) asks for (see the module docstring)."""
    from transformers import AutoModelForImageTextToText

    from specllava.training.distill import make_draft, trainable_parameters

    with torch.device("meta"):
        target = AutoModelForImageTextToText.from_config(target_config).to(dtype)
    draft, embeddings_frozen = make_draft(target, cfg, device="meta")
    trained = trainable_parameters(draft, embeddings_frozen)
    own = [p for p in draft.parameters() if not getattr(p, "shared_storage", False)]  # not the target's tensors
    out = {
        "target_parameters": _bytes(target.parameters()),
        "draft_parameters": _bytes(own),
        "gradients": _bytes(trained.values()),
        "optimizer": 2 * sum(p.numel() * 4 for p in trained.values()),  # AdamW: exp_avg, exp_avg_sq in float32
        "trained_parameters": sum(p.numel() for p in trained.values()),
        "draft_parameters_total": sum(p.numel() for p in draft.parameters()),
    }
    out["total"] = out["target_parameters"] + out["draft_parameters"] + out["gradients"] + out["optimizer"]
    return out


def memory_table(target_config, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """`training_memory` for the default draft (the target's first 2 layers) and both presets."""
    from specllava.training.distill import DistillConfig

    rows = []
    for name, cfg in (("2 target layers (default)", DistillConfig(data=None)),
                      ("llava-68m", DistillConfig(data=None, draft_preset="llava-68m")),
                      ("llava-160m", DistillConfig(data=None, draft_preset="llava-160m"))):
        rows.append({"draft": name, **training_memory(target_config, cfg, dtype)})
    return rows
