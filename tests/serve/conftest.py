"""Fixtures of the serving tests: the tiny pair (built once per session) and a live server on it."""

import pytest

from serve_helpers import assemble_tiny, load_tiny, running_server


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    return assemble_tiny(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="session")
def tiny_pair(tiny_paths):
    """(target, draft, processor)"""
    return load_tiny(tiny_paths)


@pytest.fixture(scope="module")
def server(tiny_pair):
    """(base URL, engine, app) of a server on the tiny pair: one worker, dynamic trees."""
    with running_server(*tiny_pair) as live:
        yield live
