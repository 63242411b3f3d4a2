"""Training: the default target (projector, optional LoRA) and draft distillation for any LLaVA target.

- `target`: `train_target` (cross-entropy on assistant tokens, cached frozen vision features) and
  `evaluate_grounding` (does the trained target look at the image?).
- `distill`: `train_draft` (KL(target || draft) along the answers, optional regeneration of the
  answers by the target, checkpoints/resume, final mean accepted length on held-out prompts).
- `common`: LLaVA JSON loading/tokenisation, the vision-feature cache, checkpoints, plots.
- `cli`: ``specllava train-target`` / ``specllava train-draft`` (also ``python -m specllava.training``).
"""
