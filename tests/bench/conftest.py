"""Fixtures of the bench tests (the assembled pair is `assembled_pair` in tests/conftest.py)."""

import pytest


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
