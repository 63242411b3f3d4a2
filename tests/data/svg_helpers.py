"""Synthetic openclipart-style SVGs (imported by name: pytest puts tests/data on sys.path)."""

from pathlib import Path

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
