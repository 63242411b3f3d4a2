"""Fixtures of the serving tests: the tiny pair (built once per session) and a live server on it."""

import pytest

from serve_helpers import running_server, tiny_models


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(tiny_pair):
    """(base URL, engine, app) of a server on the tiny pair: one worker, dynamic trees."""
    with running_server(*tiny_pair) as live:
        yield live
