"""`specllava` command line: generate, and the subcommands of the other parts of the package.

    specllava generate --image photo.jpg --prompt "Describe this image."     # default pair
    specllava generate --target DIR --draft DIR --image IMG --prompt TEXT [--method dynamic] ...
    specllava generate ... --budget auto        # node budget calibrated for this machine (cached)

Text streams to stdout as it is accepted and the stats go to stderr; `--json` prints one JSON
object (`text`, `stats`, ...) instead.

Every command checks its arguments while parsing them (`cli_args`), before anything loads. Exit
status: 0 done, 2 bad arguments or input, 1 a failure while running, 130 interrupted; errors are
one line, and `--debug` anywhere shows the traceback instead (docs/inputs.md).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import cli_args
from .cli_args import budget as budget_arg  # noqa: F401  (a name other modules import from here)

METHODS = ("ar", "chain", "static", "dynamic")  # core.config.METHODS, without importing torch for --help
QUANT_CHOICES = ("auto", "int8", "none")  # core.quant.QUANT_CHOICES, likewise
TREE_FIELDS = ("max_depth", "node_budget", "max_children", "child_mass", "min_path_conf", "frontier",
               "min_feed_mass", "score_temperature", "chain_length", "choices")  # TreeConfig's, likewise


def raw_tree_option(text: str) -> tuple[str, object]:
    """`name=value` with a JSON value (or else the plain string), unchecked: for tools/ scripts whose
    options mix tree fields with other decoder options. The commands use `cli_args.tree_option`."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"option {text!r} must look like name=value, e.g. node_budget=48")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate text for an image with speculative decoding",
        description="Decode with a target VLM and a draft, lossless: the output is the target's own "
        "(greedy at --temperature 0, the target's distribution otherwise). Without --target/--draft the "
        "embedded default pair is assembled (first use) and used.",
    )
    p.add_argument("--target", type=cli_args.model_source, help="target model directory or hub id (default: the embedded default target)")
    p.add_argument("--draft", type=cli_args.draft_source, help="draft model directory or hub id (default: the embedded "
                   "default draft; given alone, it drafts for the default target); or an EAGLE head (train-eagle's "
                   "eagle_head.safetensors or its folder)")
    p.add_argument("--image", type=cli_args.image_file, help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", type=cli_args.prompt_text, required=True, help="user message; goes through the processor's chat template")
    p.add_argument("--method", choices=METHODS, default="dynamic", help="decoding method (default: dynamic)")
    p.add_argument("--max-new-tokens", type=cli_args.positive_int, default=128, help="most tokens to generate (default: 128)")
    p.add_argument("--temperature", type=cli_args.non_negative_float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=cli_args.non_negative_int, default=0, help="top-k filter when sampling (0 = off)")
    p.add_argument("--top-p", type=cli_args.probability, default=1.0, help="nucleus filter when sampling (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    from .models.options import add_load_args  # imports torch: the parser is built only when a command runs

    add_load_args(p)
    p.add_argument("--threads", type=cli_args.positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--tree-option", type=cli_args.tree_option, action="append", default=[], metavar="NAME=VALUE",
        help=f"a TreeConfig field, repeatable (e.g. node_budget=48); fields: {', '.join(TREE_FIELDS)}",
    )
    p.add_argument(
        "--draft-vocab", type=cli_args.positive_int, default=None, metavar="K",
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
        "--budget", type=cli_args.budget, default=None, metavar="auto|N",
        help="dynamic tree node budget: N, or 'auto' = the budget that maximises expected speed on this "
        "machine (first run: times the target's verification cost and profiles acceptance on this prompt, "
        "about a minute; then read from ~/.cache/specllava/calibration). Overrides --tree-option node_budget",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (text, stats) instead of streaming")
    return p


def _load(args):
    from .models.hf import load_pair
    from .models.options import LoadOptions

    need_draft = args.method != "ar"
    target, draft, processor, _ = load_pair(
        args.target, args.draft, LoadOptions.from_args(args), need_draft, why=f"--method {args.method} (or use --method ar)"
    )
    return target, draft, processor


def _open_image(path: str | None):
    """The --image file (already checked by cli_args.image_file) as RGB."""
    if path is None:
        return None
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def check_tree_args(args) -> None:
    """--method, --budget and --tree-option together (`generate`, `serve`), before anything loads
    (ValueError: exit 2)."""
    if args.budget == "auto" and args.method != "dynamic":
        raise ValueError(f"--budget auto calibrates the dynamic tree; --method {args.method} has no node budget to choose")
    from .core.config import TreeConfig

    TreeConfig.from_options(**dict(args.tree_option))  # the options together (each is checked alone at parse time)


def resolve_tree_options(args, target, draft, inputs: dict, draft_vocab, prefix: str = "") -> dict:
    """--tree-option with --budget's node budget: N, or auto = calibrated (`tuning.budget`, cached)
    on `inputs` (the processor's tensors) with this draft vocabulary; says what it chose on stderr."""
    options = dict(args.tree_option)
    if args.budget == "auto" and args.method == "dynamic":
        import time

        from .tuning.budget import auto_node_budget

        t = time.perf_counter()
        inp = {k: v.to(target.dtype) if k == "pixel_values" else v for k, v in inputs.items()}
        options["node_budget"], _ = auto_node_budget(target, draft, [inp], options, draft_vocab=draft_vocab,
                                                     draft_quant=args.draft_quant)
        print(f"{prefix}--budget auto: node_budget = {options['node_budget']} ({time.perf_counter() - t:.1f} s)",
              file=sys.stderr, flush=True)
    elif args.budget is not None and args.budget != "auto":
        options["node_budget"] = args.budget
    return options


def run_generate(args) -> int:
    check_tree_args(args)
    import torch

    from .core.decoder import SpeculativeDecoder
    from .core.sampling import sampling_args
    from .core.vocab import default_draft_vocab
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
    tree_options = resolve_tree_options(args, target, draft, inputs, draft_vocab)
    decoder = SpeculativeDecoder(target, draft, method=args.method, draft_vocab=draft_vocab,
                                 draft_quant=args.draft_quant, **tree_options)

    streamer = None
    if not args.json:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    try:
        out = decoder.generate(
            **inputs,  # input_ids, pixel_values and whatever else the processor returned (image_sizes, ...)
            max_new_tokens=args.max_new_tokens,
            **sampling_args(args.temperature, args.top_k, args.top_p),
            seed=args.seed,
            streamer=streamer,
        )
    except KeyboardInterrupt:
        if streamer is not None:  # print the text accepted so far that the streamer still holds
            streamer.end()
        raise
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


# command -> (module that defines it, its one-line help). The top-level parser lists every command
# from this table and imports only the module of the command being run, so `specllava --help` and
# `specllava generate --help` do not import torch or transformers (tests check the help lines
# against the modules' own).
COMMANDS = {
    "generate": ("specllava.cli", "generate text for an image with speculative decoding"),
    "assemble": ("specllava.models.cli", "assemble the default target/draft VLM pair into the local cache"),
    "build-data": ("specllava.data.cli", "build the offline image-text training data (LLaVA JSON format)"),
    "train-target": ("specllava.training.cli", "train the default target's projector (and optional LoRA) on LLaVA JSON"),
    "eval-target": ("specllava.training.cli", "does a trained target look at the image? (real vs blank image)"),
    "ship-default": ("specllava.training.cli", "copy trained default weights into the package assets and reassemble"),
    "train-draft": ("specllava.training.cli", "distil a draft VLM for any Hugging Face LLaVA target"),
    "train-eagle": ("specllava.training.cli", "train an EAGLE-style draft head that reads the target's hidden states"),
    "bench": ("specllava.bench.cli", "benchmark hf / hf-assisted / specllava methods side by side"),
    "serve": ("specllava.serve.cli", "serve an OpenAI-compatible chat API (images, streaming, metrics) and a live web page"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (argparse prints the whole usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `specllava` parser. command=None: every command's full parser (imports every module);
    a command name: that command's module only, the others as placeholders (their help line);
    "": placeholders only (the top-level help)."""
    import importlib

    parser = OneLineParser(
        prog="specllava", description="Lossless speculative decoding with a dynamic token tree for LLaVA-family VLMs.",
        epilog="Exit status: 0 done, 2 bad arguments or input, 1 a failure while running, 130 interrupted. "
        "Errors are one line; add --debug anywhere to see the traceback instead.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers = {}
    wanted = {m for name, (m, _) in COMMANDS.items() if command is None or name == command}
    for name, (module_name, help_line) in COMMANDS.items():
        if module_name not in wanted:
            sub.add_parser(name, help=help_line, add_help=False)
    if "specllava.cli" in wanted:
        add_generate_parser(sub)
        handlers["generate"] = run_generate
    for module_name in sorted(wanted - {"specllava.cli"}):
        module = importlib.import_module(module_name)
        before = set(sub.choices)
        module.add_parser(sub)
        for name in set(sub.choices) - before:
            handlers[name] = module.run
    parser.set_defaults(_handlers=handlers)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The command named in argv (the first word that is one), or None."""
    return next((a for a in argv if a in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done; 2 bad arguments or input (one line, nothing loaded when
    the arguments alone show it); 1 a failure while running (one line); 130 interrupted (Ctrl-C).
    --debug (anywhere) shows the traceback instead of the one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(_command_in(argv) or "")  # "": no command named, no module imported
    args = parser.parse_args(argv)
    return run_guarded(f"specllava {args.command}", lambda: args._handlers[args.command](args), debug)


def run_guarded(prog: str, work, debug: bool = False) -> int:
    """Run `work()` and turn what it raises into one line on stderr and an exit status (see main)."""
    import warnings

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr if file is None else file)

    try:
        with warnings.catch_warnings():
            if not debug:  # one line per warning, without the source line that raised it
                warnings.showwarning = one_line
            result = work()
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, argparse.ArgumentTypeError) as err:
        if debug:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001  (any failure becomes one line; --debug shows it all)
        if debug:
            raise
        print(f"{prog}: error: {_describe(err)}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


def _describe(err: Exception) -> str:
    """An exception as one line: its message, named by its type when the message alone is unclear."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename}"
    elif not isinstance(err, (RuntimeError, OSError)):
        text = f"{type(err).__name__}: {text}"
    return text if len(text) <= 500 else text[:497] + "..."


if __name__ == "__main__":
    sys.exit(main())
