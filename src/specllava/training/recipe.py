"""Prompt files for distilling and evaluating the default draft (the recipe in docs/training.md).

The default draft is judged on detailed descriptions of held-out drawings, so it is distilled on
the target's own answers to the same kind of request about *training* drawings. This writes, in the
LLaVA conversation format (image paths relative to the data folder, unanswered prompts):

    <out>/distill_train.json   ``drawings`` training-split drawings, one detail prompt each
    <out>/eval_descriptions.json   held-out drawings (test split): first the held-out SmolLM2-described
                                   ones, then the others, in a seeded order; one detail prompt each
    <out>/eval_photos.json     the out-of-domain photos (data/photos.json), prompt "Describe this image."

    python -m specllava.training.recipe --data data --out data/recipe --drawings 400 --seed 0

``specllava train-draft --regenerate`` then answers the training prompts with the target.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from specllava.data.build import DETAIL_PROMPTS, pick


def _prompt(rec: dict, seed: int, image_prefix: str) -> dict:
    question = pick(DETAIL_PROMPTS, rec["id"], seed)
    return {"id": rec["id"].removesuffix("#describe") + "#detail", "image": image_prefix + rec["image"],
            "conversations": [{"from": "human", "value": "<image>\n" + question}], "meta": rec.get("meta", {})}


def _one_per_image(records: list[dict]) -> list[dict]:
    seen, out = set(), []
    for rec in records:
        if rec["image"] not in seen:
            seen.add(rec["image"])
            out.append(rec)
    return out


def write_prompt_files(data: Path, out: Path, drawings: int, seed: int = 0, rendered_only: bool = False) -> dict:
    train = json.loads((data / "train.json").read_text())
    test = json.loads((data / "test.json").read_text())
    # image paths in the written files are relative to `out`
    prefix = Path("..") if out.resolve().parent == data.resolve() else Path(data).resolve()
    prefix_s = f"{prefix.as_posix()}/"

    def drawings_of(records):
        recs = [r for r in records if r.get("meta", {}).get("source") in ("openclipart", "smollm2-description")]
        if rendered_only:  # only drawings whose PNG is already in the data folder (no re-rendering)
            recs = [r for r in recs if (data / r["image"]).is_file()]
        recs.sort(key=lambda r: r["image"])
        random.Random(seed).shuffle(recs)
        return _one_per_image(recs)

    train_prompts = [_prompt(r, seed, prefix_s) for r in drawings_of(train)[:drawings]]
    described = [r for r in test if r.get("meta", {}).get("source") == "smollm2-description"]
    held = _one_per_image(sorted(described, key=lambda r: r["id"]) + drawings_of(test))
    eval_prompts = [_prompt(r, seed, prefix_s) for r in held]
    photos = [{**r, "image": prefix_s + r["image"]} for r in json.loads((data / "photos.json").read_text())]
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in (("distill_train", train_prompts), ("eval_descriptions", eval_prompts), ("eval_photos", photos)):
        (out / f"{name}.json").write_text(json.dumps(recs, indent=1))
    return {"distill_train": len(train_prompts), "eval_descriptions": len(eval_prompts), "eval_photos": len(photos)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data"), help="built data folder (specllava build-data)")
    parser.add_argument("--out", type=Path, default=Path("data/recipe"))
    parser.add_argument("--drawings", type=int, default=400, help="training drawings to distil on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rendered-only", action="store_true",
                        help="choose only among drawings whose image file already exists in --data")
    args = parser.parse_args(argv)
    print(write_prompt_files(args.data, args.out, args.drawings, args.seed, args.rendered_only))


if __name__ == "__main__":
    main()
