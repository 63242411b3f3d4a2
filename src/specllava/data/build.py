"""Build the whole dataset: render, convert, merge, split, write ``train.json`` / ``test.json``.

Output folder layout (default ``data/``, git-ignored)::

    images/openclipart/<category>/<name>.png   224x224 RGB, drawing centred on white
    images/easy-vqa/<train|test>_<n>.png       upscaled from 64 px
    images/photos/skimage_<name>.png           out-of-domain photos
    descriptions.jsonl                         SmolLM2's descriptions (resumable, see describe.py)
    train.json, test.json                      LLaVA conversation JSON, split by image
    test_descriptions.json                     the held-out detailed-description records
    photos.json                                out-of-domain prompts (evaluation only)
    summary.json                               counts per source and split, seconds per stage
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from .llava_format import make_record, save_json, split_records, validate_record
from .openclipart import DEFAULT_ROOT, ClipartMeta, caption, load_catalog, render_png, subject

# Human turns, drawn per record with a seeded hash of its id (stable under --limit changes).
DETAIL_PROMPTS = [
    "Describe this image.",
    "Describe this image in detail.",
    "What is shown in this picture?",
    "What do you see in this picture?",
    "Give a detailed description of this drawing.",
    "Tell me about this picture.",
]
BRIEF_PROMPTS = [  # from LLaVA's brief-caption instructions
    "Describe the image concisely.",
    "Give a short caption for this picture.",
    "Provide a brief description of the given image.",
    "What is this a drawing of? Answer briefly.",
]


@dataclass
class BuildConfig:
    """Knobs of ``specllava build-data`` (defaults = the recipe used for the shipped models)."""

    out: Path = Path("data")
    clipart_root: Path = DEFAULT_ROOT
    limit_clipart: int | None = None  # None = all drawings (after thinning icon sets)
    limit_descriptions: int = 1500  # SmolLM2 descriptions (~1-2 s each on one thread here)
    limit_easyvqa: int | None = None
    describe: bool = True  # False: merge only what descriptions.jsonl already holds
    seed: int = 0
    test_fraction: float = 0.1
    size: int = 224


def pick(options: list[str], key: str, seed: int) -> str:
    """A seeded, per-key choice (independent of iteration order)."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    return options[h % len(options)]


def select_clipart_for_descriptions(root: Path = DEFAULT_ROOT, limit: int | None = None,
                                    seed: int = 0) -> list[ClipartMeta]:
    """The drawings SmolLM2 describes, in a seeded order: the first ``limit`` of them.

    Icon-set members (whose title was a collection name) are left out: their metadata says too
    little ("1downarrow") for a description. The order depends only on the seed and the catalog,
    so a larger ``limit`` later extends the same list and the JSONL file resumes cleanly.
    """
    metas = [m for m in load_catalog(root, seed=seed)
             if not m.collection and subject(m) and (m.keywords or m.description)]
    random.Random(seed).shuffle(metas)
    return metas[:limit] if limit is not None else metas


def clipart_image_path(meta: ClipartMeta) -> str:
    return f"images/{meta.id}.png"  # meta.id = "openclipart/<category>/<name>"


def build_clipart(cfg: BuildConfig) -> tuple[list[dict], dict[str, ClipartMeta]]:
    """Render the drawings (reusing PNGs already there) and make one brief-caption record each.

    Returns the records and the metadata of every drawing that rendered, by id.
    """
    metas = load_catalog(cfg.clipart_root, seed=cfg.seed)
    if cfg.limit_clipart is not None:
        metas = random.Random(cfg.seed).sample(metas, min(cfg.limit_clipart, len(metas)))
        # drawings chosen for descriptions must have an image even under a small limit
        chosen = {m.id for m in metas}
        metas += [m for m in select_clipart_for_descriptions(
            cfg.clipart_root, cfg.limit_descriptions, cfg.seed) if m.id not in chosen]
    records, rendered = [], {}
    for meta in tqdm(sorted(metas, key=lambda m: m.id), desc="render openclipart", mininterval=10):
        rel = clipart_image_path(meta)
        dst = cfg.out / rel
        if not dst.exists():
            img = render_png(cfg.clipart_root / meta.path, cfg.size)
            if img is None:
                continue  # failed to render, or nearly blank
            dst.parent.mkdir(parents=True, exist_ok=True)
            img.save(dst, optimize=True)
        rendered[meta.id] = meta
        text = caption(meta)
        if text:
            records.append(make_record(meta.id, rel, [(pick(BRIEF_PROMPTS, meta.id, cfg.seed), text)],
                                       meta={"source": "openclipart", **meta.to_dict()}))
    return records, rendered


def description_records(cfg: BuildConfig, rendered: dict[str, ClipartMeta]) -> tuple[list, Counter]:
    """Records from descriptions.jsonl, re-filtered from the raw text (filters may have improved).

    Returns the records and a count of rejection reasons.
    """
    from .describe import DESCRIPTIONS_FILE, DescribeConfig, clean_output, degenerate_reason, read_done

    dcfg, reasons, records = DescribeConfig(), Counter(), []
    for rid, row in sorted(read_done(cfg.out / DESCRIPTIONS_FILE).items()):
        if rid not in rendered:
            reasons["image did not render"] += 1
            continue
        text = clean_output(row.get("raw", row["text"]))
        reason = degenerate_reason(text, dcfg.min_words, dcfg.max_words)
        if reason:
            reasons[reason] += 1
            continue
        meta = rendered[rid]
        records.append(make_record(f"{rid}#describe", clipart_image_path(meta),
                                   [(pick(DETAIL_PROMPTS, rid, cfg.seed), text)],
                                   meta={"source": "smollm2-description", **meta.to_dict()}))
    return records, reasons


def build(cfg: BuildConfig) -> dict:
    """Build everything into ``cfg.out``; returns (and writes) the summary."""
    from .easyvqa import build_easyvqa
    from .photos import build_photos

    cfg.out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.time()
    clipart, rendered = build_clipart(cfg)
    seconds["openclipart"] = time.time() - t

    t = time.time()
    if cfg.describe and cfg.limit_descriptions:
        from .describe import DESCRIPTIONS_FILE, DescribeConfig, run_descriptions

        todo = [m for m in select_clipart_for_descriptions(
            cfg.clipart_root, cfg.limit_descriptions, cfg.seed) if m.id in rendered]
        run_descriptions(todo, cfg.out / DESCRIPTIONS_FILE, DescribeConfig())
    described, rejected = description_records(cfg, rendered)
    seconds["descriptions"] = time.time() - t

    t = time.time()
    easyvqa = build_easyvqa(cfg.out, cfg.size, cfg.limit_easyvqa)
    seconds["easy-vqa"] = time.time() - t
    t = time.time()
    photos = build_photos(cfg.out, cfg.size)
    seconds["photos"] = time.time() - t

    records = clipart + described + easyvqa
    for rec in records + photos:
        validate_record(rec, cfg.out)
    train, test = split_records(records, cfg.seed, cfg.test_fraction)
    save_json(train, cfg.out / "train.json")
    save_json(test, cfg.out / "test.json")
    save_json([r for r in test if r["meta"]["source"] == "smollm2-description"],
              cfg.out / "test_descriptions.json")
    save_json(photos, cfg.out / "photos.json")

    counts = {split: dict(Counter(r["meta"]["source"] for r in recs))
              for split, recs in (("train", train), ("test", test), ("photos", photos))}
    images = {split: len({r["image"] for r in recs}) for split, recs in (("train", train), ("test", test))}
    summary = {"counts": counts, "images": images, "rejected_descriptions": dict(rejected),
               "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "config": {k: str(v) for k, v in asdict(cfg).items()}}
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{'source':<22}{'train':>8}{'test':>8}{'photos':>8}"]
    sources = sorted({s for c in summary["counts"].values() for s in c})
    for s in sources:
        lines.append(f"{s:<22}{summary['counts']['train'].get(s, 0):>8}"
                     f"{summary['counts']['test'].get(s, 0):>8}{summary['counts']['photos'].get(s, 0) or '':>8}")
    lines.append(f"{'images':<22}{summary['images']['train']:>8}{summary['images']['test']:>8}")
    if summary["rejected_descriptions"]:
        lines.append("descriptions dropped: " + ", ".join(
            f"{k} {v}" for k, v in sorted(summary["rejected_descriptions"].items())))
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    return "\n".join(lines)
