"""Synthetic openclipart-style SVGs, so the data tests never need the Debian package."""

from pathlib import Path

import pytest
from svg_helpers import write_svg


@pytest.fixture
def clipart_root(tmp_path) -> Path:
    """A tiny openclipart tree: named drawings, an icon set, a blank and a broken file."""
    root = tmp_path / "svg"
    names = ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum"]
    for name in names:
        write_svg(root / "food" / f"{name}.svg", name.title(), ["food", "fruit", name],
                  desc=f"A ripe {name}")
    for i in range(8):  # an icon set whose files all carry the set's name as title
        write_svg(root / "computer" / "icons" / f"arrow_{i}_up.svg", "Lemon SVG theme", ["icon"])
    write_svg(root / "misc" / "blank.svg", "Nothing", ["empty"], body="")
    (root / "misc" / "broken.svg").write_text("<svg><this is not xml")
    (root / "food" / "alias").mkdir()
    (root / "food" / "alias" / "apple.svg").symlink_to(root / "food" / "apple.svg")
    return root
