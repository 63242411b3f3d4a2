"""``specllava build-data``: build the offline image-text dataset (see :mod:`specllava.data`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .. import cli_args
from .build import BuildConfig, build, format_summary
from .openclipart import DEFAULT_ROOT


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``build-data`` on an argparse subparsers object; returns the new parser."""
    p = subparsers.add_parser(
        "build-data", help="build the offline image-text training data (LLaVA JSON format)",
        description="Render openclipart drawings, convert easy-vqa, merge SmolLM2's descriptions "
                    "(generating missing ones, resumably), split by image and write train.json / "
                    "test.json in the LLaVA conversation format.")
    p.add_argument("--out", type=Path, default=BuildConfig.out, help="data folder (default: data)")
    p.add_argument("--clipart-root", type=cli_args.existing_dir, default=DEFAULT_ROOT,
                   help=f"openclipart SVG folder (default: {DEFAULT_ROOT})")
    p.add_argument("--limit-clipart", type=cli_args.positive_int, default=None, help="drawings to render (default: all)")
    p.add_argument("--limit-descriptions", type=cli_args.non_negative_int, default=BuildConfig.limit_descriptions,
                   help="drawings SmolLM2 describes (default: %(default)s; ~1-2 s each on one thread)")
    p.add_argument("--limit-easyvqa", type=cli_args.positive_int, default=None, help="easy-vqa images (default: all)")
    p.add_argument("--skip-describe", action="store_true",
                   help="do not run SmolLM2; merge only the descriptions already in descriptions.jsonl")
    p.add_argument("--seed", type=int, default=BuildConfig.seed, help="split, order and prompt seed")
    p.add_argument("--test-fraction", type=cli_args.fraction, default=BuildConfig.test_fraction)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> dict:
    cfg = BuildConfig(out=args.out, clipart_root=args.clipart_root, limit_clipart=args.limit_clipart,
                      limit_descriptions=args.limit_descriptions, limit_easyvqa=args.limit_easyvqa,
                      describe=not args.skip_describe, seed=args.seed,
                      test_fraction=args.test_fraction)
    start = time.time()
    summary = build(cfg)
    print(format_summary(summary))
    print(f"wrote {cfg.out}/train.json, test.json, test_descriptions.json, photos.json "
          f"in {time.time() - start:.0f}s")
    return summary


def main(argv: list[str] | None = None) -> int:
    import sys

    from ..cli import OneLineParser, run_guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "build-data":  # `python -m specllava.data --out ...` works too
        argv.insert(0, "build-data")
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = OneLineParser(prog="python -m specllava.data")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_guarded("specllava build-data", lambda: args.func(args), debug)
