"""Fixtures of the bench tests, imported by the test modules that use them."""

import pytest


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """Assembled tiny default-style pair (random 2-layer Llama, EfficientNet tower, real processor):
    (target_dir, draft_dir)."""
    import warnings

    from tiny_llava import tiny_sources  # tests/models, on pytest's pythonpath

    from specllava.models.assemble import assemble_models

    root = tmp_path_factory.mktemp("tiny_pair")
    (root / "assets").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "trained weights are missing" is expected here
        paths = assemble_models(root / "cache", tiny_sources(), assets_dir=root / "assets")
    return paths.target_dir, paths.draft_dir


@pytest.fixture(scope="session")
def llava_json(tmp_path_factory):
    """Two records in the LLaVA conversation format with small images beside them."""
    import json

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("llava_json")
    (root / "imgs").mkdir()
    records = []
    for i in range(2):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
        records.append({"id": f"rec{i}", "image": f"imgs/{i}.png",
                        "conversations": [{"from": "human", "value": f"<image>\nDescribe picture {i}."},
                                          {"from": "gpt", "value": "A picture."}]})
    path = root / "set.json"
    path.write_text(json.dumps(records))
    return path
