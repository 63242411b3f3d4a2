"""Synthetic openclipart-style SVGs, so the data tests never need the Debian package."""

from pathlib import Path

import pytest

SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     width="{w}" height="{h}">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:description>{desc}</dc:description>
    <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>Some Author</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata>
  {body}
</svg>
"""
DRAWN = '<circle cx="{cx}" cy="{cy}" r="{r}" fill="red" stroke="black"/>'


def write_svg(path: Path, title: str, keywords=(), desc: str = "", body: str | None = None,
              w: int = 200, h: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if body is None:
        body = DRAWN.format(cx=w // 2, cy=h // 2, r=min(w, h) // 3)
    kws = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    path.write_text(SVG.format(title=title, desc=desc, keywords=kws, body=body, w=w, h=h))
    return path


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
