"""Read a LLaVA conversation JSON as `train-draft` reads it, and say what it holds: records, text-only
ones, unanswered ones, missing images (with examples), the time the index took and the memory it holds.

    PYTHONPATH=src python tools/check_llava_json.py playground/data/llava_v1_5_mix665k.json
    PYTHONPATH=src python tools/check_llava_json.py data.json --image-folder /data/llava
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

from specllava.training.common import answered_records, load_records, record_image, with_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="the LLaVA JSON file (e.g. llava_v1_5_mix665k.json)")
    parser.add_argument("--image-folder", type=Path, default=None, help="the images' folder (default: the file's)")
    parser.add_argument("--json-load", action="store_true", help="also measure what json.load of the file holds")
    args = parser.parse_args()
    tracemalloc.start()
    t = time.perf_counter()
    records, root = load_records(args.data)
    seconds = time.perf_counter() - t
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    root = args.image_folder or root
    text_only = sum(record_image(records, i) is None for i in range(len(records)))
    print(f"{args.data}: {len(records)} records ({args.data.stat().st_size / 1e6:.0f} MB), {text_only} text-only")
    print(f"index: {seconds:.1f} s (traced), {held / 1e6:.0f} MB held, {peak / 1e6:.0f} MB at most while reading")
    kept = with_images(records, root, log=print)
    print(f"{len(kept)} records usable (image found or text-only), {len(answered_records(kept))} of them answered")
    if args.json_load:
        import json

        tracemalloc.start()
        with open(args.data, encoding="utf-8") as f:
            loaded = json.load(f)
        print(f"json.load: {tracemalloc.get_traced_memory()[0] / 1e6:.0f} MB held for {len(loaded)} records")


if __name__ == "__main__":
    main()
