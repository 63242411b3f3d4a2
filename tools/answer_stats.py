"""How repetitive a target's answers are: the `answers.jsonl` that `train-draft --regenerate` writes,
or the `hf` outputs (plain `generate()`) of a `specllava bench` run's `results.json`.

    .venv/bin/python tools/answer_stats.py runs/draft3/answers.jsonl runs/draft4/answers.jsonl
    .venv/bin/python tools/answer_stats.py runs/bench/default/results.json --vocab 4096 8192 16384

An answer *loops* when one word 4-gram occurs at least 4 times in it ("a stylized representation
of a stylized representation of ..."). Looping text is easy to draft, so the share of looping
answers matters when comparing acceptance or speed across targets. Prints one line per file:
answers, mean words, the share that loops, and one looping example (for results.json, one line
per benchmark section; the tokens are decoded with the default pair's tokenizer).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from specllava.core.vocab import draft_vocab_ids


def loops(text: str, n: int = 4, times: int = 4) -> bool:
    words = text.split()
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def bench_tokens(path: str) -> dict[str, list[list[int]]]:
    """Section name -> token ids of the `hf` method's outputs (first repeat) in a bench results.json."""
    with open(path) as f:
        sections = json.load(f)["sections"]
    return {name: [r["tokens"] for r in sec["records"] if r["method"] == "hf" and r["repeat"] == 0]
            for name, sec in sections.items()}


def decode(sections: dict[str, list[list[int]]]) -> dict[str, list[str]]:
    """Section name -> texts of `bench_tokens`' outputs, decoded with the default pair's tokenizer."""
    from transformers import AutoTokenizer

    from specllava.models import assemble_default_models

    tokenizer = AutoTokenizer.from_pretrained(assemble_default_models().target_dir)  # no model loaded
    return {name: [tokenizer.decode(t, skip_special_tokens=True) for t in runs]
            for name, runs in sections.items()}


VOCAB_SIZE = 49152  # the default pair's (SmolLM2) vocabulary


def default_ranking() -> list[int]:
    """The shipped default draft's token ranking (read from its file's metadata; no model loaded)."""
    from safetensors import safe_open

    from specllava.models.shipped import DEFAULT_ASSETS_DIR, DRAFT_WEIGHTS

    with safe_open(str(DEFAULT_ASSETS_DIR / DRAFT_WEIGHTS), "pt") as f:
        return json.loads(f.metadata()["token_ranking"])


def report(name: str, answers: list[str]) -> None:
    if not answers:
        print(f"{name}: no answers")
        return
    looping = [a for a in answers if loops(a)]
    words = sum(len(a.split()) for a in answers) / len(answers)
    example = repr(looping[0][:80]) if looping else "-"
    print(f"{name}: {len(answers)} answers, {words:.1f} words on average, "
          f"{len(looping)} loop ({len(looping) / len(answers):.0%}); e.g. {example}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="answers.jsonl files (one {'id', 'answer'} per line) or bench results.json")
    ap.add_argument("--vocab", type=int, nargs="*", default=[], metavar="K",
                    help="results.json: also the share of the target's tokens that a draft vocabulary "
                         "of K ids cannot propose: the K lowest ids, and the default draft's ranked "
                         "K (--draft-vocab K, specllava.core.vocab)")
    args = ap.parse_args(argv)
    ranking = default_ranking() if args.vocab else None
    for path in args.files:
        if path.endswith(".json"):
            sections = bench_tokens(path)
            for section, answers in decode(sections).items():
                report(f"{path} [{section}]", answers)
            for section, runs in sections.items():
                tokens = [t for run in runs for t in run]
                for k in args.vocab:
                    low = sum(t >= k for t in tokens) / max(len(tokens), 1)
                    kept = set(draft_vocab_ids(k, VOCAB_SIZE, ranking).tolist())
                    ranked = sum(t not in kept for t in tokens) / max(len(tokens), 1)
                    print(f"{path} [{section}]: of {len(tokens)} tokens, {low:.1%} have ids >= {k}; "
                          f"{ranked:.1%} lie outside the ranked {k} ({len(ranking)} ranked ids)")
            continue
        with open(path) as f:
            report(path, [json.loads(line)["answer"] for line in f if line.strip()])


if __name__ == "__main__":
    main()
