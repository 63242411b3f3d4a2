import numpy as np
import pytest

from specllava.data.openclipart import (DEFAULT_ROOT, caption, clean_text, find_svgs, load_catalog,
                                        read_metadata)


def test_read_metadata_from_rdf(clipart_root):
    meta = read_metadata(clipart_root / "food" / "apple.svg", clipart_root)
    assert meta.id == "openclipart/food/apple"
    assert meta.title == "Apple"  # the work's title, not the creator's (also a dc:title)
    assert meta.keywords == ["food", "fruit", "apple"]
    assert meta.description == "A ripe apple"
    assert meta.category == "food"
    assert caption(meta) == 'A clip-art drawing titled "Apple". Keywords: food, fruit.'


def test_broken_file_gives_empty_metadata(clipart_root):
    meta = read_metadata(clipart_root / "misc" / "broken.svg", clipart_root)
    assert meta.title == "" and meta.keywords == []


@pytest.mark.parametrize("raw, clean", [
    ("Clipart by Nicu Buculei - arrow08_4", "arrow"),
    ("  red_apple  ", "red apple"),
    ("Crawfish (B and W)", "Crawfish (B and W)"),
])
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_find_svgs_skips_symlinks(clipart_root):
    files = find_svgs(clipart_root)
    assert len(files) == 10 + 8 + 2
    assert not any(p.is_symlink() for p in files)


def test_missing_package_error_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y openclipart-svg"):
        find_svgs(tmp_path / "nowhere")


def test_icon_set_titles_become_file_names_and_sets_are_thinned(clipart_root):
    metas = load_catalog(clipart_root, max_per_title=3, seed=0)
    icons = [m for m in metas if m.collection]
    assert len(icons) == 3 and all(m.collection == "Lemon SVG theme" for m in icons)
    assert all(m.title.startswith("arrow") for m in icons)
    assert [m.id for m in load_catalog(clipart_root, max_per_title=3, seed=0)] == [m.id for m in metas]


def test_render_png_square_white_and_skips_blank_or_broken(clipart_root):
    pytest.importorskip("cairosvg")
    from specllava.data.openclipart import render_png

    img = render_png(clipart_root / "food" / "apple.svg", size=224)
    assert img.size == (224, 224) and img.mode == "RGB"
    assert img.getpixel((2, 2)) == (255, 255, 255)  # wide drawing: padded with white, not stretched
    assert img.getpixel((112, 112))[0] > 200  # red circle in the middle
    assert render_png(clipart_root / "misc" / "blank.svg") is None
    assert render_png(clipart_root / "misc" / "broken.svg") is None


@pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason="Debian package openclipart-svg not installed")
def test_real_openclipart_metadata():
    files = find_svgs()
    assert len(files) > 5000
    metas = [read_metadata(p) for p in files[:200]]
    assert sum(bool(m.title) for m in metas) > 150
    assert sum(bool(m.keywords) for m in metas) > 150


def test_render_time_limit_stops_a_busy_loop():
    from specllava.data.openclipart import RenderTimeout, time_limit

    with pytest.raises(RenderTimeout):
        with time_limit(0.2):
            while True:
                pass
    with time_limit(5):  # and a finished block leaves no timer behind
        pass


def test_small_drawing_on_a_big_page_is_cropped_to_fill_the_image(tmp_path):
    pytest.importorskip("cairosvg")
    from svg_helpers import write_svg

    from specllava.data.openclipart import render_png

    body = '<rect x="40" y="60" width="40" height="40" fill="blue"/>'  # 4% of a 1000 px page
    img = render_png(write_svg(tmp_path / "corner.svg", "Box", body=body, w=1000, h=1000))
    blue = (np.asarray(img)[..., 2] > 200) & (np.asarray(img)[..., 0] < 60)
    assert blue.mean() > 0.8  # the square now fills the picture (minus the margin)
