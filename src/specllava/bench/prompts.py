"""(image, prompt) pairs to benchmark on.

Sources: the shipped evaluation sets (``src/specllava/assets/eval/``, written by
`specllava.data.eval_assets`) or any file in the LLaVA conversation JSON format. The prompt is the
first human turn with ``<image>`` removed; the image path is relative to ``image_root`` (default:
the JSON file's folder). The loader is deliberately more lenient than the training-data validator
(`specllava.data.llava_format.validate_record`): users' files put ``<image>`` before or after the
question, and text-only records (no ``image`` key) are benchmarked without an image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_TOKEN = "<image>"
EVAL_DIR = Path(__file__).resolve().parent.parent / "assets" / "eval"
# name -> file in EVAL_DIR
BUILTIN_SETS = {"in-domain": "descriptions.json", "out-of-domain": "photos.json"}


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    prompt: str
    image: Path | None  # None: a text-only prompt


def builtin_set(name: str, eval_dir: Path = EVAL_DIR, limit: int | None = None) -> list[BenchPrompt]:
    if name not in BUILTIN_SETS:
        raise ValueError(f"unknown evaluation set {name!r}; choose one of {', '.join(BUILTIN_SETS)}")
    path = Path(eval_dir) / BUILTIN_SETS[name]
    if not path.is_file():
        raise ValueError(
            f"the {name} evaluation set is missing ({path}); build it with "
            "`python -m specllava.data.eval_assets --data data`, or pass --data FILE"
        )
    return load_llava_json(path, limit=limit)


def load_llava_json(path: str | Path, image_root: str | Path | None = None, limit: int | None = None) -> list[BenchPrompt]:
    """Prompts of a LLaVA conversation JSON file (a list of records), in file order; with `limit`,
    only the first `limit` records are read (and checked)."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"data file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA records, got {type(records).__name__}")
    root = Path(image_root) if image_root is not None else path.parent
    prompts = [_prompt_of(rec, i, root, path) for i, rec in enumerate(records[:limit])]
    if not prompts:
        raise ValueError(f"{path} holds no records")
    return prompts


def _prompt_of(rec, index: int, root: Path, path: Path) -> BenchPrompt:
    where = f"{path}: record {index}"
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list) or not rec["conversations"]:
        raise ValueError(f"{where} has no 'conversations' list (LLaVA format: "
                         '{"id", "image", "conversations": [{"from": "human", "value": ...}, ...]})')
    first = rec["conversations"][0]
    if not isinstance(first, dict) or first.get("from") != "human" or not isinstance(first.get("value"), str):
        raise ValueError(f"{where}: the first turn must be {{'from': 'human', 'value': '...'}}")
    text = first["value"].replace(IMAGE_TOKEN, "").strip()
    if not text:
        raise ValueError(f"{where}: the first human turn has no text besides {IMAGE_TOKEN}")
    image = None
    if rec.get("image"):
        image = Path(rec["image"]) if Path(rec["image"]).is_absolute() else root / rec["image"]
        if not image.is_file():
            raise ValueError(f"{where}: image {image} not found (set --image-root to the folder the paths are relative to)")
    return BenchPrompt(id=str(rec.get("id", index)), prompt=text, image=image)
