"""Openclipart drawings (Debian package ``openclipart-svg``): metadata, rendering, short captions.

The package installs ~7.5k public-domain SVG files under ``/usr/share/openclipart/svg/<category>/...``
(plus ~660 symlinks that file the same drawing under a second category; we skip those). Each SVG
carries its metadata as RDF inside ``<metadata>``::

    <cc:Work><dc:title>Paperbag</dc:title><dc:description>...</dc:description>
      <dc:subject><rdf:Bag><rdf:li>container</rdf:li>...</rdf:Bag></dc:subject> ...

(the creator and publisher are ``<cc:Agent><dc:title>`` too, so only the ``cc:Work``'s own title is
the drawing's title). The folder path (``animals/mammals/bears``) is a category we keep as well.

Contract:

- :func:`find_svgs` lists the drawings (sorted, symlinks skipped) or raises a clear error when the
  package is missing.
- :func:`read_metadata` never raises on a malformed file: it returns what it could read.
- :func:`render_png` draws one SVG onto a white square (aspect ratio kept, centred) and returns an
  RGB PIL image, or None when the file does not render or the drawing is nearly blank.
- :func:`caption` turns metadata into a short caption (or None when the metadata says nothing).
"""

from __future__ import annotations

import io
import re
import signal
import threading
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_ROOT = Path("/usr/share/openclipart/svg")

_NS = {
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "cc": "http://web.resource.org/cc/",
}
_CC_ALT = "http://creativecommons.org/ns#"  # newer Inkscape files use this cc namespace


@dataclass
class ClipartMeta:
    """What an openclipart SVG says about itself (all cleaned, possibly empty)."""

    id: str  # stable id derived from the path, e.g. "openclipart/animals/bat_orlando_karam_"
    path: str  # path relative to the package root
    title: str = ""
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    category: str = ""  # the folder path, e.g. "animals/mammals/bears"
    collection: str = ""  # set name when the file's title named its icon set, not the drawing

    def to_dict(self) -> dict:
        return {"title": self.title, "description": self.description, "keywords": self.keywords,
                "category": self.category, "collection": self.collection, "svg": self.path}


def find_svgs(root: Path = DEFAULT_ROOT) -> list[Path]:
    """All openclipart SVG files under ``root``, sorted, without the category symlinks."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"openclipart SVGs not found at {root}. Install the Debian package: "
            "`apt-get update && apt-get install -y openclipart-svg` (or pass --clipart-root)."
        )
    return sorted(p for p in root.rglob("*.svg") if p.is_file() and not p.is_symlink())


# Titles often carry the uploader or the file name rather than the subject, e.g.
# "Clipart by Nicu Buculei - arrow08_4" or "blueberry - iconset"; strip what we can recognise.
_TITLE_PREFIX = re.compile(r"^\s*(clip\s*art|clipart|drawing)\s+by\s+[^-]+-\s*", re.I)


def clean_text(text: str) -> str:
    """Collapse whitespace, turn file-name separators into spaces, drop trailing numbering."""
    text = _TITLE_PREFIX.sub("", text or "")
    text = re.sub(r"[_]+", " ", text)
    text = re.sub(r"\s+", " ", text).strip(" -.,;:")
    text = re.sub(r"(\s*\d+)+$", "", text).strip(" -.,;:")  # "arrow08 4" -> "arrow08" ... -> "arrow"
    text = re.sub(r"(?<=[a-z])\d+$", "", text)
    return text.strip()


def _texts(elem: ET.Element | None, path: str) -> list[str]:
    if elem is None:
        return []
    return [(e.text or "").strip() for e in elem.findall(path, _NS)]


def read_metadata(svg: Path, root: Path = DEFAULT_ROOT) -> ClipartMeta:
    """Title, description, keywords and category of one SVG (empty fields where absent)."""
    svg, root = Path(svg), Path(root)
    rel = svg.relative_to(root).as_posix() if svg.is_relative_to(root) else svg.name
    meta = ClipartMeta(id="openclipart/" + rel.removesuffix(".svg"), path=rel,
                       category=str(Path(rel).parent.as_posix()).strip("."))
    try:
        tree = ET.parse(svg)
    except (ET.ParseError, OSError, ValueError):
        return meta
    work = tree.find(".//cc:Work", _NS)
    if work is None:  # newer Inkscape namespace for Creative Commons
        work = tree.find(f".//{{{_CC_ALT}}}Work")
    title = _texts(work, "dc:title")
    desc = _texts(work, "dc:description")
    keywords = _texts(work, "dc:subject/rdf:Bag/rdf:li")
    if not title:  # fall back to the SVG's own <title>
        title = [(e.text or "").strip() for e in tree.iter() if e.tag.endswith("}title")][:1]
    meta.title = clean_text(title[0]) if title else ""
    meta.description = re.sub(r"\s+", " ", desc[0]).strip() if desc else ""
    seen: set[str] = set()
    for kw in keywords:
        kw = clean_text(kw).lower()
        if kw and kw not in seen:
            seen.add(kw)
            meta.keywords.append(kw)
    return meta


class RenderTimeout(Exception):
    """A render took longer than its `time_limit`."""


@contextmanager
def time_limit(seconds: float):
    """Raise RenderTimeout after ``seconds`` of CPU time (main thread only; elsewhere no limit).

    cairosvg spends minutes on a few files (big blur filters, huge paths); it is pure Python between
    cairo calls, so a signal-raised exception stops it cleanly, without a process per file. CPU time
    (ITIMER_PROF), not wall time, so that a busy machine does not change which files are skipped.
    """
    def on_alarm(signum, frame):
        raise RenderTimeout

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGPROF, on_alarm)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def render_png(svg: Path, size: int = 224, min_ink: float = 0.01, timeout: float = 10.0,
               supersample: int = 2, margin: float = 0.04) -> Image.Image | None:
    """Render ``svg`` onto a white ``size`` x ``size`` square; None if it fails or is nearly blank.

    Many drawings sit small in a big page (an A4 canvas with a logo in one corner), so the drawing
    is rendered at ``supersample`` times the size, cropped to its ink with a ``margin``, and scaled
    to fit the square, centred, aspect ratio kept. ``min_ink`` is the smallest share of the final
    pixels that must differ visibly from white: empty, off-canvas or white-on-transparent files
    render blank and teach nothing. Files that take more than ``timeout`` CPU seconds (~250x the
    usual) are skipped too.
    """
    import cairosvg  # optional dependency (the `data` extra); imported here so the rest works without

    big = size * supersample
    try:
        with time_limit(timeout):
            png = cairosvg.svg2png(url=str(svg), output_width=big)
            img = Image.open(io.BytesIO(png))
            if img.height > big:  # taller than wide: fit the height instead
                png = cairosvg.svg2png(url=str(svg), output_height=big)
                img = Image.open(io.BytesIO(png))
            img = img.convert("RGBA")
    except Exception:  # cairosvg raises many kinds (XML, parsing, cairo, recursion); all mean "skip"
        return None
    if img.width == 0 or img.height == 0:
        return None
    flat = Image.new("RGBA", img.size, (255, 255, 255, 255))
    flat.alpha_composite(img)
    flat = flat.convert("RGB")
    ink = (np.asarray(flat) < 240).any(axis=-1)  # [H, W] visible (non-white) pixels
    if not ink.any():
        return None
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    pad = int(margin * max(rows[-1] - rows[0], cols[-1] - cols[0]))
    box = (max(cols[0] - pad, 0), max(rows[0] - pad, 0),
           min(cols[-1] + 1 + pad, flat.width), min(rows[-1] + 1 + pad, flat.height))
    crop = flat.crop(box)
    scale = size / max(crop.size)
    crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                       Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(crop, ((size - crop.width) // 2, (size - crop.height) // 2))
    share = (np.asarray(canvas) < 240).any(axis=-1).mean()
    return canvas if share >= min_ink else None


def subject(meta: ClipartMeta) -> str:
    """The best short name for what the drawing shows: title, else first keyword, else ''."""
    title = meta.title
    if title and re.search(r"[a-zA-Z]{3}", title) and not re.fullmatch(r"[\w.-]*\d[\w.-]*", title):
        return title
    return meta.keywords[0] if meta.keywords else ""


def caption(meta: ClipartMeta) -> str | None:
    """A short caption from the metadata, e.g. 'A clip-art drawing titled "Paperbag". Keywords: container.'

    Quoting the title keeps the sentence grammatical whatever the title is (a noun, a phrase, a name).
    """
    name = subject(meta)
    if not name:
        return None
    text = f'A clip-art drawing titled "{name}".'
    extra = [k for k in meta.keywords if k.lower() not in name.lower()][:4]
    if extra:
        text += " Keywords: " + ", ".join(extra) + "."
    return text


def load_catalog(root: Path = DEFAULT_ROOT, max_per_title: int = 40, seed: int = 0,
                 collection_min: int = 8) -> list[ClipartMeta]:
    """Metadata of all drawings, with icon-set titles replaced and big sets thinned out.

    Many files carry their collection's name as title ("gramastar" x1375 star shapes, "Part of the
    Flat Icon Collection (...)" x550, "Lemon SVG theme" x416): a title shared by at least
    ``collection_min`` files is moved to ``collection`` and the file name becomes the title
    ("1downarrow", "star 49pt05step"). Then at most ``max_per_title`` drawings per original title
    are kept (a seeded choice), so that near-identical sets do not swamp the data.
    """
    import random
    from collections import defaultdict

    metas = [read_metadata(p, root) for p in find_svgs(root)]
    by_title: dict[str, list[ClipartMeta]] = defaultdict(list)
    for m in metas:
        by_title[m.title.lower()].append(m)
    rng = random.Random(seed)
    kept: list[ClipartMeta] = []
    for title, group in sorted(by_title.items()):
        if len(group) >= collection_min:
            for m in group:
                m.collection = m.title
                m.title = clean_text(Path(m.path).stem)
        if len(group) > max_per_title:
            group = rng.sample(group, max_per_title)
        kept.extend(group)
    return sorted(kept, key=lambda m: m.id)
