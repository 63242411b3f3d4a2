"""Test-session settings and the fixtures shared by every test folder.

    tiny_pair        a tiny random LLaVA target and a draft that mostly agrees with it (in memory,
                     fresh for every test, milliseconds to build): `random_models.tiny_llava_pair()`
    assembled_pair   a tiny default-style pair assembled on disk once per session (random 2-layer
                     Llama, EfficientNet tower, real processor): `AssembledModels` with
                     `target_dir` and `draft_dir`, for the command-line tests

Helpers live in plain modules imported by name (`random_models`, `tiny_llava`, ...), which pytest's
`pythonpath` setting in pyproject.toml puts on the import path.
"""

import warnings

import pytest
import torch

from random_models import tiny_llava_pair

# Tiny models run fastest on one thread (and the tests then leave the other core free).
torch.set_num_threads(1)


@pytest.fixture
def tiny_pair():
    """(target, draft): `tiny_llava(0)` and a copy of it with 5 % relative weight noise (seed 1).
    Built per test, since decoders may attach hooks or tests may change a model's dtype."""
    return tiny_llava_pair()


@pytest.fixture(scope="session")
def assembled_pair(tmp_path_factory):
    """The tiny default-style pair assembled to disk, without trained weights (so its draft is
    untrained): `AssembledModels(target_dir, draft_dir, manifest)`."""
    from tiny_llava import tiny_sources

    from specllava.models.assemble import assemble_models

    root = tmp_path_factory.mktemp("assembled_pair")
    (root / "assets").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "trained weights are missing" is expected here
        return assemble_models(root / "cache", tiny_sources(), assets_dir=root / "assets")
