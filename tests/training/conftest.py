"""A tiny assembled LLaVA (EfficientNet tower + 2-layer random Llama, see tests/models/tiny_llava.py)
saved with its processor, and a tiny LLaVA-JSON dataset of random images: seconds to build."""

import warnings

import pytest
import torch
from tiny_llava import tiny_sources  # tests/models, on pytest's pythonpath (pyproject.toml)

import specllava.models  # noqa: F401  (registers the vision tower)
from specllava.models.assemble import assemble_models


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """Paths of an assembled tiny target/draft (random projector, untrained draft)."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "assets").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return assemble_models(root / "cache", tiny_sources(), assets_dir=root / "assets")


@pytest.fixture
def tiny_models(tiny_pair):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    target = LlavaForConditionalGeneration.from_pretrained(tiny_pair.target_dir, dtype=torch.float32).eval()
    return target, AutoProcessor.from_pretrained(tiny_pair.target_dir)
