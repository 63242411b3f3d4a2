"""The options the commands share, each declared once: a frozen dataclass with `add_args(parser)`
and `from_args(args)`.

    LoadOptions      where and how the models load: --dtype, --device, --device-map, --attn-implementation
    DecodingOptions  what decodes and how: --target, --draft, --method, --draft-vocab, --draft-quant,
                     --tree-option, --budget, and (generate, bench) --max-new-tokens, --temperature,
                     --top-k, --top-p, --seed

`generate`, `serve` and `bench` (and the training commands, for the load options) declare their
flags through these, so a flag has one name, one check, one default and one help text everywhere:

    DecodingOptions.add_args(parser)                 # generate
    DecodingOptions.add_args(parser, sampling=False) # serve: requests bring their own sampling
    opts = DecodingOptions.from_args(args)
    opts.check()                                     # the flags together, before anything loads

Cheap to import (no torch, no transformers): building a parser for `--help` stays fast. The
choices below mirror `core.config.METHODS`, `core.quant.QUANT_CHOICES`, `TreeConfig`'s fields and
`models.options.DTYPES` without importing them; a test checks that they agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

from . import cli_args

METHODS = ("ar", "chain", "static", "dynamic")
QUANT_CHOICES = ("auto", "int8", "none")
TREE_FIELDS = ("max_depth", "node_budget", "max_children", "child_mass", "min_path_conf", "frontier",
               "min_feed_mass", "score_temperature", "calibrate", "draft_cost", "chain_length", "choices")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
ATTN_CHOICES = ("sdpa", "eager", "flash_attention_2")

Parser = argparse.ArgumentParser | argparse._ArgumentGroup


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model: dtype ("auto" or a name), device ("cpu", "cuda", "cuda:1", ...; None =
    `models.options.default_device()`), an accelerate `device_map` for the target ("auto",
    "balanced", ...; None = the whole model on `device`), and transformers' `attn_implementation`
    (None = its default)."""

    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    attn_implementation: str | None = None

    @staticmethod
    def add_args(parser: Parser) -> None:
        """`--dtype`, `--device`, `--device-map` and `--attn-implementation`."""
        parser.add_argument(
            "--dtype", default="auto", choices=DTYPE_CHOICES,
            help="model dtype; auto (default) = bfloat16 on a CUDA GPU that supports it (float16 on older ones) "
            "and on a CPU with native bf16 (avx512_bf16 / AMX), float32 elsewhere",
        )
        parser.add_argument("--device", default=None, help="device to load the models on: cpu, cuda, cuda:1, ... "
                            "(default: cuda when available, else cpu)")
        parser.add_argument("--device-map", default=None, metavar="MAP",
                            help="accelerate device map for the target, e.g. auto to shard it over the visible GPUs "
                            "(and offload what does not fit); default: the whole target on --device")
        parser.add_argument("--attn-implementation", default=None, choices=ATTN_CHOICES,
                            help="transformers' attention implementation (default: the model's own, sdpa for most)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LoadOptions":
        return cls(
            dtype=getattr(args, "dtype", "auto") or "auto",
            device=getattr(args, "device", None),
            device_map=getattr(args, "device_map", None),
            attn_implementation=getattr(args, "attn_implementation", None),
        )

    @property
    def resolved_device(self) -> str:
        from .models.options import default_device

        return self.device or default_device()

    @property
    def torch_dtype(self):
        from .models.options import resolve_dtype

        return resolve_dtype(self.dtype, self.resolved_device)


@dataclass(frozen=True)
class DecodingOptions:
    """How a command decodes; every field is a flag (`add_args`) and a `SpeculativeDecoder` or
    `generate()` argument.

    target, draft: model folders or hub ids (None: the embedded default pair); the draft may be an
            EAGLE head file or folder.
    method: "ar" | "chain" | "static" | "dynamic".
    draft_vocab: K token ids the draft proposes from; None = the decoder's "auto" (from the
            draft's token ranking, one size for greedy and one for sampled requests).
    draft_quant: "auto" | "int8" | "none", the draft's int8 decode steps.
    tree_options: TreeConfig fields as (name, value) pairs, each checked at parse time.
    budget: the dynamic tree's node budget, an int or "auto" (calibrated, `tuning.budget`); None =
            the tree options' (or TreeConfig's) own.
    max_new_tokens, temperature, top_k, top_p, seed: one request's generation settings.
    """

    target: str | None = None
    draft: str | None = None
    method: str = "dynamic"
    draft_vocab: int | None = None
    draft_quant: str = "auto"
    tree_options: tuple[tuple[str, object], ...] = ()
    budget: int | str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @staticmethod
    def add_args(parser: Parser, *, method: bool = True, sampling: bool = True, several_temperatures: bool = False,
                 seed: int | None = None, budget_calibrates_on: str = "this prompt") -> None:
        """Declare the decoding flags on `parser` (or an argument group). method=False leaves
        --method out (bench declares --methods); sampling=False leaves out --max-new-tokens and the
        sampling flags (serve: each request brings its own); several_temperatures: --temperature
        takes one value or more (bench: a section each); seed: --seed's default;
        budget_calibrates_on: what `--budget auto` profiles acceptance on, for the help."""
        parser.add_argument("--target", type=cli_args.model_source,
                            help="target model directory or hub id (default: the embedded default target)")
        parser.add_argument("--draft", type=cli_args.draft_source,
                            help="draft model directory or hub id, or an EAGLE head (train-eagle's eagle_head.safetensors "
                            "or its folder); default: the embedded default draft; given without --target, it drafts "
                            "for the default target")
        if method:
            parser.add_argument("--method", choices=METHODS, default="dynamic", help="decoding method (default: dynamic)")
        if sampling:
            parser.add_argument("--max-new-tokens", type=cli_args.positive_int, default=128,
                                help="most tokens to generate (default: 128)")
            if several_temperatures:
                parser.add_argument("--temperature", type=cli_args.non_negative_float, nargs="+", default=[0.0],
                                    help="0 = greedy (default); > 0 samples; several values run one section each")
            else:
                parser.add_argument("--temperature", type=cli_args.non_negative_float, default=0.0,
                                    help="0 = greedy (default); > 0 samples")
            parser.add_argument("--top-k", type=cli_args.non_negative_int, default=0, help="top-k filter when sampling (0 = off)")
            parser.add_argument("--top-p", type=cli_args.probability, default=1.0,
                                help="nucleus filter when sampling (1.0 = off)")
            parser.add_argument("--seed", type=cli_args.seed, default=seed,
                                help=f"random seed for sampling, an integer (default: {seed})")
        parser.add_argument(
            "--draft-vocab", type=cli_args.positive_int, default=None, metavar="K",
            help="let the draft propose only K token ids: its token ranking (the ids of its training answers, most "
            "frequent first) if it has one, then the lowest ids (a much cheaper draft head; lossless). "
            "Default: for a draft with a token ranking (the default draft, any train-draft output) the ranking's "
            "length rounded up to a power of two at temperature 0 (2048 for the default pair), twice that when "
            "sampling; the full vocabulary for a draft without one",
        )
        parser.add_argument(
            "--draft-quant", choices=QUANT_CHOICES, default="auto",
            help="the draft's decode steps with int8 linears: auto (default) = on a CPU with torch's quantized "
            "kernels, where it about halves the draft's cost; int8; none. Lossless: it changes only what is proposed",
        )
        parser.add_argument(
            "--tree-option", type=cli_args.tree_option, action="append", default=[], metavar="NAME=VALUE",
            help=f"a TreeConfig field, repeatable (e.g. node_budget=48); fields: {', '.join(TREE_FIELDS)}",
        )
        parser.add_argument(
            "--budget", type=cli_args.budget, default=None, metavar="auto|N",
            help="dynamic tree node budget: N, or 'auto' = the budget that maximises expected speed on this "
            f"machine (first run: times the target's verification cost and profiles acceptance on {budget_calibrates_on}, "
            "about a minute; then read from ~/.cache/specllava/calibration). Overrides --tree-option node_budget",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> "DecodingOptions":
        """The options `add_args` declared, read back from parsed `args` (fields a command did not
        declare keep their defaults), with `overrides` on top (bench: one temperature a section)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        values["tree_options"] = tuple(getattr(args, "tree_option", ()))
        return cls(**{**values, **overrides})

    @property
    def needs_draft(self) -> bool:
        return self.method != "ar"

    def check(self) -> None:
        """The flags together, before anything loads (ValueError: exit 2); each was checked alone
        while parsing."""
        if self.budget == "auto" and self.method != "dynamic":
            raise ValueError(f"--budget auto calibrates the dynamic tree; --method {self.method} has no node budget to choose")
        from .core.config import TreeConfig

        TreeConfig.from_options(**dict(self.tree_options))

    def decoder_kwargs(self, draft=None) -> dict:
        """`SpeculativeDecoder`'s keyword arguments besides the models and the tree options. The
        draft vocabulary: --draft-vocab; else, given the `draft`, its default at this temperature
        (a decoder for one request builds one draft head); else "auto" (a server's decoder, for
        greedy and sampled requests)."""
        vocab = self.draft_vocab_for(draft, self.temperature) if draft is not None else self.draft_vocab
        return {"method": self.method, "draft_vocab": "auto" if vocab is None and draft is None else vocab,
                "draft_quant": self.draft_quant}

    def draft_vocab_for(self, draft, temperature: float) -> int | None:
        """--draft-vocab, or its default for this draft at this temperature (`core.vocab`)."""
        if self.draft_vocab is not None:
            return self.draft_vocab
        from .core.vocab import default_draft_vocab

        return default_draft_vocab(draft, temperature)

    def resolve_tree_options(self, target, draft, inputs: list[dict], prefix: str = "") -> dict:
        """--tree-option with --budget's node budget: N, or auto = calibrated (`tuning.budget`, cached)
        on `inputs` (prompts' tensors from the processor) with the draft vocabulary of this
        temperature; says what it chose on stderr."""
        options = dict(self.tree_options)
        if self.budget == "auto" and self.method == "dynamic":
            import time

            from .tuning.budget import auto_node_budget

            t = time.perf_counter()
            inputs = [{k: v.to(target.dtype) if k == "pixel_values" else v for k, v in inp.items()} for inp in inputs]
            options["node_budget"], _ = auto_node_budget(target, draft, inputs, options,
                                                         draft_vocab=self.draft_vocab_for(draft, self.temperature),
                                                         draft_quant=self.draft_quant)
            print(f"{prefix}--budget auto: node_budget = {options['node_budget']} ({time.perf_counter() - t:.1f} s)",
                  file=sys.stderr, flush=True)
        elif self.budget is not None and self.budget != "auto":
            options["node_budget"] = self.budget
        return options


def add_load_args(parser: Parser) -> None:
    """`LoadOptions.add_args`, under the name the commands have used."""
    LoadOptions.add_args(parser)
