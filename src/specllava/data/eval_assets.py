"""Export the small held-out evaluation subset shipped in ``src/specllava/assets/eval/``.

Benchmarks must run without rebuilding the data, so a few held-out images travel with the package:

    assets/eval/descriptions.json   in-domain: held-out drawings with SmolLM2's detailed description
    assets/eval/photos.json         out-of-domain: real photos, "Describe this image.", no answer
    assets/eval/easyvqa.json        in-domain: held-out easy-vqa images with their short QA turns
    assets/eval/images/*.png        224x224 RGB
    assets/example.jpg              the README demo photo (scikit-image's astronaut)

Both JSON files are in the LLaVA conversation format with image paths relative to ``assets/eval``.
The in-domain records are the first ``n_in_domain`` test-split drawings in the order SmolLM2
described them (so the choice stays put as the description job progresses).

    python -m specllava.data.eval_assets --data data
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

from .llava_format import load_json, save_json, validate_record

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# photos picked for variety: people, objects, animals, scenes, greyscale, space
OOD_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "retina"]


def _copy(rec: dict, data: Path, out: Path) -> dict:
    """Copy a record's image into ``out/images`` (re-compressed PNG) and point the record at it."""
    name = rec["image"].removeprefix("images/").replace("/", "_")  # e.g. openclipart_food_x.png
    dst = out / "images" / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(data / rec["image"]) as im:
        im.convert("RGB").save(dst, optimize=True)
    return {**rec, "image": f"images/{name}"}


def export(data: Path, out: Path = ASSETS / "eval", n_in_domain: int = 24, seed: int = 0,
           clipart_root: Path | None = None, n_easyvqa: int = 8) -> dict:
    from .build import select_clipart_for_descriptions
    from .openclipart import DEFAULT_ROOT

    test_desc = {r["id"].removesuffix("#describe"): r for r in load_json(data / "test_descriptions.json")}
    order = [m.id for m in select_clipart_for_descriptions(clipart_root or DEFAULT_ROOT, None, seed)]
    chosen = [test_desc[i] for i in order if i in test_desc][:n_in_domain]
    if len(chosen) < n_in_domain:
        raise SystemExit(f"only {len(chosen)} held-out descriptions in {data}; wait for the "
                         "description job or lower --n")
    photos = {r["id"].split("/")[-1]: r for r in load_json(data / "photos.json")}
    missing = [p for p in OOD_PHOTOS if p not in photos]
    if missing:
        raise SystemExit(f"photos missing from {data}/photos.json: {missing}")

    if (out / "images").exists():
        shutil.rmtree(out / "images")  # stale images from an earlier export
    in_domain = [_copy(r, data, out) for r in chosen]
    ood = [_copy(photos[p], data, out) for p in OOD_PHOTOS]
    vqa = sorted((r for r in load_json(data / "test.json") if r["meta"]["source"] == "easy-vqa"),
                 key=lambda r: r["id"])[:n_easyvqa]
    vqa = [_copy(r, data, out) for r in vqa]
    for rec in in_domain + ood + vqa:
        validate_record(rec, out)
    save_json(in_domain, out / "descriptions.json")
    save_json(ood, out / "photos.json")
    save_json(vqa, out / "easyvqa.json")

    import skimage.data

    example = Image.fromarray(skimage.data.astronaut()).resize((336, 336), Image.LANCZOS)
    example.save(out.parent / "example.jpg", quality=88, optimize=True)

    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"descriptions": len(in_domain), "photos": len(ood), "easyvqa": len(vqa), "bytes": size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="export the shipped evaluation subset")
    parser.add_argument("--data", type=Path, default=Path("data"), help="built data folder")
    parser.add_argument("--out", type=Path, default=ASSETS / "eval")
    parser.add_argument("--n", type=int, default=24, help="in-domain held-out images")
    parser.add_argument("--seed", type=int, default=0, help="the seed the data was built with")
    args = parser.parse_args(argv)
    print(export(args.data, args.out, args.n, args.seed))


if __name__ == "__main__":
    main()
