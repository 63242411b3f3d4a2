"""One request with several images (LLaVA-NeXT: pixel_values [images, tiles, C, H, W] and one
image_sizes row per image; each image expands to its own tokens): greedy output equals the
target's generate(), with a draft sharing the vision features and with an unrelated one."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from random_models import IMAGE_TOKEN
from specllava import SpeculativeDecoder
from test_architectures import PINPOINTS, reference, sharing_next_draft, tiny_llava_next


@pytest.fixture(scope="module")
def two_image_inputs():
    target = tiny_llava_next(0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((20, 30), (30, 18))]
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                      image_grid_pinpoints=PINPOINTS)
    px = dict(proc(images=images, return_tensors="pt"))
    with torch.inference_mode():
        feats = target.model.get_image_features(px["pixel_values"], px["image_sizes"], vision_feature_layer=-1,
                                                vision_feature_select_strategy="default")
    n = [f.shape[0] for f in feats.pooler_output]
    ids = torch.tensor([[1, 5, *([IMAGE_TOKEN] * n[0]), 7, *([IMAGE_TOKEN] * n[1]), 9, 11]])
    return target, {"input_ids": ids, "attention_mask": torch.ones_like(ids), **px}


@pytest.mark.parametrize("method", ["chain", "dynamic"])
@pytest.mark.parametrize("draft_kind", ["sharing", "unrelated"])
def test_two_images_greedy_equals_generate(two_image_inputs, method, draft_kind):
    target, inputs = two_image_inputs
    assert inputs["pixel_values"].shape[0] == 2 and n_distinct(inputs["image_sizes"]) == 2
    draft = sharing_next_draft(target) if draft_kind == "sharing" else tiny_llava_next(5, hidden=32, layers=1)
    out = SpeculativeDecoder(target, draft, method=method).generate(**inputs, max_new_tokens=20)
    assert out.sequences.tolist() == reference(target, inputs, 20).tolist()


def n_distinct(sizes: torch.Tensor) -> int:
    return len({tuple(s) for s in sizes.tolist()})
