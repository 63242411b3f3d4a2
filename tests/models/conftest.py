import pytest


@pytest.fixture
def no_assets(tmp_path):
    """An empty shipped-weights folder: the "not trained yet" state."""
    path = tmp_path / "assets"
    path.mkdir()
    return path
