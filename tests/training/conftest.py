"""The training tests' fixture on top of the root conftest's `assembled_pair` (a tiny assembled
LLaVA, EfficientNet tower + 2-layer random Llama, saved with its processor): its target loaded."""

import pytest
import torch

import specllava.models  # noqa: F401  (registers the vision tower)


@pytest.fixture
def tiny_models(assembled_pair):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    target = LlavaForConditionalGeneration.from_pretrained(assembled_pair.target_dir, dtype=torch.float32).eval()
    return target, AutoProcessor.from_pretrained(assembled_pair.target_dir)
