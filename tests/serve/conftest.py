"""Fixtures of the serving tests: the tiny pair (built once per session) and a live server on it."""

import pytest

from serve_helpers import assemble_tiny, load_tiny, running_server


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    return assemble_tiny(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="session")
def served_models(tiny_paths):
    """(target, draft, processor)"""
    return load_tiny(tiny_paths)


@pytest.fixture(scope="module")
def server(served_models):
    """(base URL, engine, app) of a server on the tiny pair: one worker, dynamic trees."""
    with running_server(*served_models) as live:
        yield live
