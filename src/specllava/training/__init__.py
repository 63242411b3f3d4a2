"""Training: the default target (projector, optional LoRA), draft distillation for any LLaVA-family
target, and EAGLE-style draft heads.

- `loop`: the one training loop every trainer runs (learning-rate schedule, checkpoints and resume,
  progress, time budget).
- `answers`: answers written by the target (greedy or sampled, cached, resumable) to train on.
- `target`: `train_target` (cross-entropy on assistant tokens, cached frozen vision features) and
  `evaluate_grounding` (does the trained target look at the image?).
- `distill`: `train_draft` (KL(target || draft) along the answers, drafts from the target's own
  layers or of a published shape, any device and dtype, LLaVA-1.5 and LLaVA-NeXT targets; final
  mean accepted length on held-out prompts).
- `eagle`: `train_eagle` (a one-layer head reading the target's hidden states).
- `common`: LLaVA JSON loading/tokenisation, the vision-feature cache, checkpoints, plots.
- `cli`: ``specllava train-target`` / ``train-draft`` / ``train-eagle`` (also ``python -m specllava.training``).
"""
