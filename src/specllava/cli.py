"""`specllava` command line: generate, and the subcommands of the other parts of the package.

    specllava generate --image photo.jpg --prompt "Describe this image."     # default pair
    specllava generate --target DIR --draft DIR --image IMG --prompt TEXT [--method dynamic] ...
    specllava generate ... --budget auto        # node budget calibrated for this machine (cached)

Text streams to stdout as it is accepted and the stats go to stderr; `--json` prints one JSON
object (`text`, `stats`, ...) instead.
"""

from __future__ import annotations

import argparse
import json
import sys

from .core.config import METHODS, TreeConfig
from .core.vocab import default_draft_vocab
from .core.quant import QUANT_CHOICES
from .models.options import LoadOptions, add_load_args


def _tree_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"tree option {text!r} must look like name=value, e.g. node_budget=48")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def budget_arg(text: str):
    """`--budget auto|N`: the dynamic tree's node_budget, or 'auto' to calibrate it."""
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget must be 'auto' or a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--budget must be >= 1, got {value}")
    return value


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate text for an image with speculative decoding",
        description="Decode with a target VLM and a draft, lossless: the output is the target's own "
        "(greedy at --temperature 0, the target's distribution otherwise). Without --target/--draft the "
        "embedded default pair is assembled (first use) and used.",
    )
    p.add_argument("--target", help="target model directory or hub id (default: the embedded default target)")
    p.add_argument("--draft", help="draft model directory or hub id (default: the embedded default draft); or an "
                   "EAGLE head (train-eagle's eagle_head.safetensors or its folder), which also works with the default target")
    p.add_argument("--image", help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True, help="user message; goes through the processor's chat template")
    p.add_argument("--method", choices=METHODS, default="dynamic", help="decoding method (default: dynamic)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="top-k filter when sampling (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus filter when sampling (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    add_load_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--tree-option", type=_tree_option, action="append", default=[], metavar="NAME=VALUE",
        help=f"a TreeConfig field, repeatable (e.g. node_budget=48); fields: {', '.join(TreeConfig.__dataclass_fields__)}",
    )
    p.add_argument(
        "--draft-vocab", type=int, default=None, metavar="K",
        help="let the draft propose only K token ids: its token ranking (the ids of its training answers, most "
        "frequent first) if it has one, then the lowest ids (a much cheaper draft head; lossless). "
        "Default: for a draft with a token ranking (the default draft, any train-draft output) the ranking's "
        "length rounded up to a power of two at temperature 0 (2048 for the default pair), twice that when "
        "sampling; the full vocabulary for a draft without one",
    )
    p.add_argument(
        "--draft-quant", choices=QUANT_CHOICES, default="auto",
        help="the draft's decode steps with int8 linears: auto (default) = on a CPU with torch's quantized "
        "kernels, where it about halves the draft's cost; int8; none. Lossless: it changes only what is proposed",
    )
    p.add_argument(
        "--budget", type=budget_arg, default=None, metavar="auto|N",
        help="dynamic tree node budget: N, or 'auto' = the budget that maximises expected speed on this "
        "machine (first run: times the target's verification cost and profiles acceptance on this prompt, "
        "about a minute; then read from ~/.cache/specllava/calibration). Overrides --tree-option node_budget",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (text, stats) instead of streaming")
    return p


def _load(args):
    from .models.hf import load_pair

    need_draft = args.method != "ar"
    target, draft, processor, _ = load_pair(
        args.target, args.draft, LoadOptions.from_args(args), need_draft, why=f"--method {args.method} (or use --method ar)"
    )
    return target, draft, processor


def _open_image(path: str | None):
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"image file not found: {path}") from None
    except UnidentifiedImageError:
        raise ValueError(f"not an image file PIL can read: {path}") from None


def run_generate(args) -> int:
    import torch

    from . import SpeculativeDecoder
    from .models.hf import chat_inputs

    if args.threads:
        torch.set_num_threads(args.threads)
    image = _open_image(args.image)
    target, draft, processor = _load(args)
    inputs = chat_inputs(processor, args.prompt, image)
    tokenizer = getattr(processor, "tokenizer", processor)
    draft_vocab = args.draft_vocab
    if draft_vocab is None:
        draft_vocab = default_draft_vocab(draft, args.temperature)
    tree_options = dict(args.tree_option)
    TreeConfig.from_options(**tree_options)  # fail on a bad option before any calibration
    if args.budget == "auto" and args.method == "dynamic":
        import time

        from .bench.calibrate import auto_node_budget

        t = time.perf_counter()
        inp = {k: v.to(target.dtype) if k == "pixel_values" else v for k, v in inputs.items()}
        tree_options["node_budget"], _ = auto_node_budget(target, draft, [inp], tree_options, draft_vocab=draft_vocab,
                                                          draft_quant=args.draft_quant)
        print(f"--budget auto: node_budget = {tree_options['node_budget']} ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    elif args.budget == "auto":
        raise ValueError(f"--budget auto calibrates the dynamic tree; --method {args.method} has no node budget to choose")
    elif args.budget is not None:
        tree_options["node_budget"] = args.budget
    decoder = SpeculativeDecoder(target, draft, method=args.method, draft_vocab=draft_vocab,
                                 draft_quant=args.draft_quant, **tree_options)

    streamer = None
    if not args.json:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = decoder.generate(
        **inputs,  # input_ids, pixel_values and whatever else the processor returned (image_sizes, ...)
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        streamer=streamer,
    )
    new = out.sequences[0, inputs["input_ids"].shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    stats = out.stats
    if args.json:
        print(json.dumps({"text": text, "tokens": new.tolist(), "method": args.method, "stats": stats}))
    else:
        decode_tps = stats["new_tokens"] / max(stats["time_decode_s"], 1e-9)
        print(
            f"[{args.method}] {stats['new_tokens']} tokens | mean accepted length {stats['mean_accepted']:.2f} | "
            f"target forwards {stats['target_forwards']} | prefill {stats['time_prefill_s']:.2f} s | "
            f"decode {stats['time_decode_s']:.2f} s ({decode_tps:.1f} tok/s)",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specllava", description="Lossless speculative decoding with a dynamic token tree for LLaVA-family VLMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = {"generate": run_generate}
    add_generate_parser(sub)
    for module in _subcommand_modules():
        before = set(sub.choices)
        module.add_parser(sub)
        for name in set(sub.choices) - before:
            handlers[name] = module.run
    parser.set_defaults(_handlers=handlers)
    return parser


def _subcommand_modules():
    """Subcommands owned by other parts of the package (each module: add_parser + run)."""
    import importlib

    names = ["specllava.models.cli", "specllava.data.cli", "specllava.training.cli", "specllava.bench.cli"]
    for name in names:
        try:
            yield importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or not name.startswith(err.name):  # a missing dependency inside it
                raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args._handlers[args.command](args)
    except ValueError as err:
        print(f"specllava {args.command}: error: {err}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
