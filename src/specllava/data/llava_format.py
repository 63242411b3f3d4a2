"""The LLaVA conversation JSON format, and the train/test split by image.

A dataset is a JSON list of records, as in ``llava_v1_5_mix665k.json``::

    {"id": "openclipart/animals/bat_orlando_karam_",
     "image": "images/openclipart/animals/bat_orlando_karam_.png",   # relative to the data folder
     "conversations": [{"from": "human", "value": "<image>\\nDescribe this image."},
                       {"from": "gpt", "value": "The image shows ..."}],
     "meta": {...}}                                                  # extra keys are allowed

Rules (checked by :func:`validate_record`): turns alternate human/gpt starting with human; the
first human turn holds exactly one ``<image>`` token (at its start, followed by a newline, as LLaVA
writes it) and no other turn holds one; all values are non-empty strings. Evaluation prompts with
no reference answer (the out-of-domain photos) end with an unanswered human turn.

Split: :func:`split_of` assigns an *image* to train or test from a hash of (seed, image path), so
every record that shares an image lands on the same side, the assignment of one image does not
depend on which other images exist (a larger ``--limit`` only adds records, never moves them), and
the same seed always gives the same split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

IMAGE_TOKEN = "<image>"
HUMAN, GPT = "human", "gpt"


def make_record(id: str, image: str, turns: list[tuple[str, str | None]], **extra) -> dict:
    """A LLaVA record from (question, answer) pairs; ``<image>\\n`` goes before the first question.

    An answer of None leaves the question unanswered (allowed for the last turn only).
    """
    conversations = []
    for i, (question, answer) in enumerate(turns):
        conversations.append({"from": HUMAN, "value": (f"{IMAGE_TOKEN}\n" if i == 0 else "") + question})
        if answer is not None:
            conversations.append({"from": GPT, "value": answer})
    return {"id": id, "image": image, "conversations": conversations, **extra}


def validate_record(rec: dict, data_dir: Path | None = None) -> None:
    """Raise ValueError naming the problem if ``rec`` is not a valid LLaVA record."""
    rid = rec.get("id", "?")
    for key in ("id", "image", "conversations"):
        if key not in rec:
            raise ValueError(f"record {rid}: missing key {key!r}")
    conv = rec["conversations"]
    if not conv:
        raise ValueError(f"record {rid}: no conversation turns")
    for i, turn in enumerate(conv):
        want = HUMAN if i % 2 == 0 else GPT
        if turn.get("from") != want:
            raise ValueError(f"record {rid}: turn {i} is from {turn.get('from')!r}, expected {want!r}")
        if not isinstance(turn.get("value"), str) or not turn["value"].strip():
            raise ValueError(f"record {rid}: turn {i} has an empty value")
        if turn["value"].count(IMAGE_TOKEN) != (1 if i == 0 else 0):
            raise ValueError(f"record {rid}: {IMAGE_TOKEN} must appear once, in the first turn only")
    if not conv[0]["value"].startswith(IMAGE_TOKEN + "\n"):
        raise ValueError(f"record {rid}: the first turn must start with '{IMAGE_TOKEN}\\n'")
    if Path(rec["image"]).is_absolute():
        raise ValueError(f"record {rid}: image path must be relative to the data folder")
    if data_dir is not None and not (Path(data_dir) / rec["image"]).is_file():
        raise ValueError(f"record {rid}: image {rec['image']} not found under {data_dir}")


def split_of(image: str, seed: int, test_fraction: float = 0.1) -> str:
    """'train' or 'test' for an image path, from a seeded hash (stable, independent of the others)."""
    digest = hashlib.sha256(f"{seed}:{image}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return "test" if u < test_fraction else "train"


def split_records(records: list[dict], seed: int, test_fraction: float = 0.1) -> tuple[list, list]:
    """(train, test) lists; records that share an image always go to the same side."""
    train, test = [], []
    for rec in records:
        (test if split_of(rec["image"], seed, test_fraction) == "test" else train).append(rec)
    return train, test


def save_json(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")


def load_json(path: Path, validate: bool = True) -> list[dict]:
    """Read a LLaVA JSON file (validating each record unless told not to)."""
    records = json.loads(Path(path).read_text())
    if validate:
        for rec in records:
            validate_record(rec)
    return records


def qa_pairs(rec: dict) -> list[tuple[str, str | None]]:
    """(question, answer) pairs of a record, ``<image>`` removed; answer None for an open question."""
    conv = rec["conversations"]
    return [(conv[i]["value"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip(),
             conv[i + 1]["value"] if i + 1 < len(conv) else None) for i in range(0, len(conv), 2)]
