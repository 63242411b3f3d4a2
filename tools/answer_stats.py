"""How repetitive a target's answers are: the `answers.jsonl` that `train-draft --regenerate` writes.

    .venv/bin/python tools/answer_stats.py runs/draft3/answers.jsonl runs/draft4/answers.jsonl

An answer *loops* when one word 4-gram occurs at least 4 times in it ("a stylized representation
of a stylized representation of ..."). Looping text is easy to draft, so the share of looping
answers matters when comparing acceptance or speed across targets. Prints one line per file:
answers, mean words, the share that loops, and one looping example.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter


def loops(text: str, n: int = 4, times: int = 4) -> bool:
    words = text.split()
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="answers.jsonl files (one {'id', 'answer'} per line)")
    args = ap.parse_args(argv)
    for path in args.files:
        with open(path) as f:
            answers = [json.loads(line)["answer"] for line in f if line.strip()]
        if not answers:
            print(f"{path}: no answers")
            continue
        looping = [a for a in answers if loops(a)]
        words = sum(len(a.split()) for a in answers) / len(answers)
        example = repr(looping[0][:80]) if looping else "-"
        print(f"{path}: {len(answers)} answers, {words:.1f} words on average, "
              f"{len(looping)} loop ({len(looping) / len(answers):.0%}); e.g. {example}")


if __name__ == "__main__":
    main()
