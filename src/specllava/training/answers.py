"""Answers written by the target, for every trainer (`train-draft`, `train-eagle`).

Contract:

- `regenerate_answers(...)` answers each record's first question with the target (greedy, or
  sampled at T=1 with ``do_sample``) and returns one-turn records with those answers. Answers are
  appended to a JSONL cache (``{"id", "answer"}``) as they are produced, so a restart generates only
  what is missing. Prompts are batched with left padding and keep the tokenizer's special tokens
  (BOS included), as the model card's usage does.
- `sampled_answers(...)`: ``n`` answers sampled at T=1 to a seeded choice of the records (cached in
  ``<out>/sampled_answers.jsonl``); more answers than records gives each record several.
- `answers_ranking(path, tokenizer)`: the token ranking (`specllava.core.vocab.rank_tokens`) of one
  or several such caches.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from specllava.core.vocab import rank_tokens
from specllava.training.common import encode_prompts, model_inputs, prompt_text, record_id


def first_question(rec: dict) -> dict:
    return {**rec, "conversations": rec["conversations"][:1]}


def _read_cache(path: Path) -> dict[str, str]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill
            done[row["id"]] = row["answer"]
    return done


@torch.no_grad()
def regenerate_answers(target, processor, records: list[dict], image_root: Path, cache_path: Path,
                       max_new_tokens: int, batch_size: int, log=print, do_sample: bool = False) -> list[dict]:
    """Each record's first question answered by the target (see the module docstring)."""
    from PIL import Image

    done = _read_cache(cache_path)
    ids = [record_id(r, i) for i, r in enumerate(records)]
    todo = [(i, r) for i, r in enumerate(records) if ids[i] not in done]
    log(f"regenerate: {len(done)} answers cached, {len(todo)} to generate -> {cache_path}")
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"  # batched generation: every prompt ends where its answer starts
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {}
    try:
        with cache_path.open("a") as f, tqdm(total=len(todo), desc="regenerate answers", mininterval=15) as bar:
            for k in range(0, len(todo), batch_size):
                chunk = todo[k : k + batch_size]
                texts = [prompt_text(tok, r["conversations"][:1]) for _, r in chunk]
                # the images of the records that have one, in order (a text-only record is asked without)
                images = [Image.open(image_root / r["image"]).convert("RGB") for _, r in chunk if r.get("image")]
                enc = model_inputs(target, encode_prompts(processor, images or None, texts, padding=True))
                out = target.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample, **sampling)
                for (i, _), row in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                    answer = tok.decode(row, skip_special_tokens=True)  # unstripped: the target wrote it
                    done[ids[i]] = answer
                    f.write(json.dumps({"id": ids[i], "answer": answer}) + "\n")
                f.flush()
                bar.update(len(chunk))
    finally:
        tok.padding_side = side
    out = []
    for i, rec in enumerate(records):
        answer = done[ids[i]]
        if answer:
            out.append({**first_question(rec), "conversations": [rec["conversations"][0], {"from": "gpt", "value": answer}]})
    return out


def sampled_answers(target, processor, records: list[dict], image_root: Path, out: Path, n: int, seed: int,
                    max_new_tokens: int, batch_size: int, log=print) -> list[dict]:
    """`n` answers the target samples at T=1 to a seeded choice of `records` (cached in
    ``<out>/sampled_answers.jsonl``), as one-turn records; [] for n = 0. With more answers than
    records, every record is answered once, then again in further seeded rounds (round k's
    answers cached under ``<id>#<k>``), so a prompt gets several sampled answers."""
    if not n or not len(records):
        return []
    pick = random.Random(seed + 1).sample(records, min(n, len(records)))
    rounds = 1
    while len(pick) < n:
        more = random.Random(seed + 1 + rounds).sample(range(len(records)), min(n - len(pick), len(records)))
        pick += [{**records[i], "id": f"{record_id(records[i], i)}#{rounds}"} for i in more]
        rounds += 1
    return regenerate_answers(target, processor, pick, image_root, out / "sampled_answers.jsonl",
                              max_new_tokens, batch_size, log, do_sample=True)


def answers_ranking(path: Path | list, tokenizer) -> list[int] | None:
    """The token ranking of a run's ``answers.jsonl`` (the target's regenerated answers; several
    such files ranked together when given a list), for a draft trained before drafts carried one;
    None without any of the files."""
    answers = []
    for p in path if isinstance(path, list) else [path]:
        if Path(p).is_file():
            with open(p) as f:
                answers += [json.loads(line)["answer"] for line in f if line.strip()]
    if not answers:
        return None
    return rank_tokens(t for a in answers for t in tokenizer(a, add_special_tokens=False).input_ids)
