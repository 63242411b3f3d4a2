"""`specllava bench`: compare hf, hf-assisted and specllava's methods on the same prompts.

    specllava bench                                   # default pair, in-domain set, T=0
    specllava bench --set in-domain out-of-domain --temperature 0 1 --limit 10 --max-new-tokens 128
    specllava bench --target DIR --draft DIR --data my.json --image-root imgs/ --methods hf,dynamic
    specllava bench --budget auto                     # calibrated dynamic node_budget
    specllava bench --throughput --set out-of-domain --limit 8 --max-new-tokens 64   # vs concurrency

Writes to --out (default runs/bench/<timestamp>/): results.json (settings, machine, every run),
table.md, and bench_speedup.png / bench_acceptance.png / bench_time.png (plus
bench_calibration.png with --budget auto). One section per (set, temperature).

--throughput (`bench.throughput`): tokens/s and p50/p95 request latency against the number of
concurrent requests (--concurrency, default 1 2 4 8) for hf (transformers' batched generate()),
batched ar and batched dynamic (or --methods among hf, ar, chain, static, dynamic), greedy; writes
throughput.json, throughput.md and bench_throughput.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from .. import cli_args
from ..options import QUANT_CHOICES, TREE_FIELDS, DecodingOptions, LoadOptions

# bench.methods.ALL_METHODS, without importing torch to build the parser (a test checks they agree)
ALL_METHODS = ("hf", "hf-assisted", "ar", "chain", "static", "dynamic")


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in ALL_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {','.join(ALL_METHODS)}")
    return names


# variant options that are not TreeConfig fields
DECODER_OPTIONS = ("draft_vocab", "draft_quant", "draft_lean", "target_lean", "draft")


def _variant(text: str) -> tuple[str, tuple[str, dict]]:
    """NAME=METHOD[:opt=val,opt=val] -> (NAME, (METHOD, {opt: val}))."""
    name, sep, rest = text.partition("=")
    base, _, opts = rest.partition(":")
    if not sep or not name.strip() or base not in ("ar", "chain", "static", "dynamic"):
        raise argparse.ArgumentTypeError(
            f"--variant {text!r} must look like NAME=METHOD[:opt=val,...] with METHOD ar, chain, static or dynamic, "
            "e.g. dyn-shallow=dynamic:max_depth=3,min_feed_mass=0.3")
    options = dict(_variant_option(o) for o in opts.split(",") if o.strip())
    if base == "ar" and set(options) - {"target_lean"}:
        raise argparse.ArgumentTypeError(f"--variant {name}: an ar variant takes target_lean only, got {sorted(options)}")
    dv = options.get("draft_vocab")
    if dv is not None and not (isinstance(dv, int) and dv >= 1):
        raise argparse.ArgumentTypeError(f"--variant {name}: draft_vocab must be a positive integer, got {dv!r}")
    dq = options.get("draft_quant")
    if dq is not None and dq not in QUANT_CHOICES:
        raise argparse.ArgumentTypeError(f"--variant {name}: draft_quant must be one of {', '.join(QUANT_CHOICES)}, got {dq!r}")
    if options.get("draft", "eagle") not in ("eagle", "other"):
        raise argparse.ArgumentTypeError(f"--variant {name}: draft is eagle (the --eagle head) or other (the --other-draft "
                                         f"model), got {options['draft']!r}")
    for flag in ("draft_lean", "target_lean"):
        if options.get(flag, True) not in (True, False):
            raise argparse.ArgumentTypeError(f"--variant {name}: {flag} must be true or false, got {options[flag]!r}")
    unknown = sorted(set(options) - set(TREE_FIELDS) - set(DECODER_OPTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"--variant {name}: unknown option(s) {unknown}; known: "
                                         f"{', '.join(TREE_FIELDS + DECODER_OPTIONS)}")
    tree = {k: v for k, v in options.items() if k in TREE_FIELDS}
    if tree:
        from ..core.config import TreeConfig

        try:
            TreeConfig.from_options(**tree)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"--variant {name}: {err}") from None
    return name.strip(), (base, options)


def _variant_option(text: str) -> tuple[str, object]:
    """A variant's opt=val: a TreeConfig field typed and checked as --tree-option, any other value as JSON
    (true/false, numbers) or else the plain string."""
    key, sep, value = text.partition("=")
    if key.strip() in TREE_FIELDS:
        return cli_args.tree_option(text)
    if not sep:
        raise argparse.ArgumentTypeError(f"variant option {text!r} must look like name=value")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value.strip()


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="benchmark hf / hf-assisted / specllava methods side by side",
        description="Time transformers' generate() (plain and assisted) and specllava's methods on the same "
        "(image, prompt) pairs, interleaved, with exact-match checks at T=0. Without --target/--draft the "
        "embedded default pair is used.",
    )
    src = p.add_argument_group("prompts")
    src.add_argument("--set", nargs="+", default=["in-domain"], choices=["in-domain", "out-of-domain"],
                     help="built-in evaluation set(s) (default: in-domain); ignored with --data")
    src.add_argument("--data", type=cli_args.existing_file, help="a LLaVA conversation JSON file instead of the built-in sets")
    src.add_argument("--image-root", type=cli_args.existing_dir, help="folder the --data image paths are relative to (default: the file's folder)")
    src.add_argument("--limit", type=cli_args.positive_int, default=None, help="use the first N prompts of each set")
    decoding = p.add_argument_group("decoding (every method; --seed is the base seed, the same per prompt for every "
                                    "method; --draft-vocab, --draft-quant, --tree-option and --budget: chain, static, dynamic)")
    DecodingOptions.add_args(decoding, method=False, several_temperatures=True, seed=0,
                             budget_calibrates_on="the first prompts of the first set (--calibration-prompts)")
    models = p.add_argument_group("models")
    models.add_argument("--eagle", type=cli_args.draft_source, default=None, metavar="PATH",
                        help="an EAGLE head (train-eagle's eagle_head.safetensors or its folder) for variants with "
                        "draft=eagle, e.g. --variant eagle=dynamic:draft=eagle")
    models.add_argument("--other-draft", type=cli_args.model_source, default=None, metavar="DIR",
                        help="a second draft model (e.g. a new train-draft run's draft/ folder) for variants with "
                        "draft=other, e.g. --variant new=dynamic:draft=other: two drafts compared in one interleaved run")
    LoadOptions.add_args(models)
    run = p.add_argument_group("measurement")
    run.add_argument("--methods", type=_methods, default=ALL_METHODS, metavar="M1,M2",
                     help=f"comma-separated methods (default: {','.join(ALL_METHODS)})")
    run.add_argument("--repeats", type=cli_args.positive_int, default=1, help="timed runs per (prompt, method); medians are reported")
    run.add_argument("--warmup", type=cli_args.non_negative_int, default=1, help="untimed runs of every method before timing (default: 1)")
    run.add_argument("--threads", type=cli_args.positive_int, default=2, help="torch CPU threads, fixed for the whole run (default: 2)")
    run.add_argument("--recalibrate", action="store_true", help="with --budget auto: ignore the calibration cache")
    run.add_argument("--calibration-prompts", type=cli_args.positive_int, default=6, metavar="N",
                     help="with --budget auto: profile acceptance on the first N prompts of the first set (default: 6)")
    run.add_argument(
        "--variant", type=_variant, action="append", default=[], metavar="NAME=METHOD[:opt=val,...]",
        help="an extra method measured alongside the others: chain/static/dynamic with its own tree options "
        "(on top of --tree-option) and optionally its own draft_vocab, draft_quant, draft_lean or target_lean, "
        "or ar with target_lean; repeatable; e.g. dyn-shallow=dynamic:max_depth=3,min_feed_mass=0.3 or "
        "v4k=dynamic:draft_vocab=4096 or bf=dynamic:draft_quant=none or hfpath=dynamic:draft_lean=false or "
        "ar-hf=ar:target_lean=false; draft=eagle drafts with the --eagle head and draft=other with the "
        "--other-draft model instead of the draft model",
    )
    run.add_argument("--throughput", action="store_true",
                     help="throughput mode: tokens/s and request latency against the number of concurrent requests "
                     "(--concurrency) for hf (batched generate()), batched ar and batched dynamic, greedy")
    run.add_argument("--concurrency", type=cli_args.positive_int, nargs="+", default=[1, 2, 4, 8], metavar="N",
                     help="with --throughput: concurrent requests per group (default: 1 2 4 8)")
    run.add_argument("--fixed-budgets", type=cli_args.positive_int, nargs="+", default=[], metavar="N",
                     help="with --throughput: also measure dynamic with each of these fixed node budgets "
                     "(methods dynamic-bN)")
    run.add_argument("--load-aware", action="store_true",
                     help="with --throughput: also measure dynamic-load, dynamic whose node budget per sequence "
                     "follows the batch size (tuning.budget.batch_node_budgets, from the calibrated cost model "
                     "and each batch size's measured drafting time; calibrates on the first "
                     "--calibration-prompts prompts at the first run)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/bench/<timestamp>); one that "
                   "is not empty is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing its results")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _load_models(args):
    from ..models.hf import load_pair

    needs_draft = any(m not in ("hf", "ar") for m in args.methods)
    why = f"methods {','.join(args.methods)} (only hf and ar run without a draft)"
    return load_pair(args.target, args.draft, LoadOptions.from_args(args), needs_draft, why=why)


def _prompt_sets(args) -> dict:
    from .prompts import builtin_set, load_llava_json

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.data is not None:
        return {args.data.stem: load_llava_json(args.data, args.image_root, args.limit)}
    return {name: builtin_set(name, limit=args.limit) for name in args.set}


def machine_info(threads: int) -> dict:
    import torch
    import transformers

    from ..tuning.budget import cpu_model

    return {"cpu": cpu_model(), "cpu_flags": _cpu_flags(), "cores": _cores(), "torch_threads": threads,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _cpu_flags() -> list[str]:
    """The CPU features that decide bf16 speed (AVX-512 bf16, AMX), as the kernel reports them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"))


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: on a shared machine, how contended the cores were."""
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def check_args(args) -> None:
    """Checks that involve several arguments, before anything loads (ValueError: exit 2)."""
    if any(opts.get("draft") == "eagle" for _, (_, opts) in args.variant) and args.eagle is None:
        raise ValueError("a variant has draft=eagle: pass the head with --eagle PATH")
    if any(opts.get("draft") == "other" for _, (_, opts) in args.variant) and args.other_draft is None:
        raise ValueError("a variant has draft=other: pass the second draft model with --other-draft DIR")
    if args.out is not None and args.out.is_file():
        raise ValueError(f"--out {args.out} is a file; give a folder")
    if args.out is not None and args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {args.out} is not empty (an earlier run's results?); pass --overwrite to replace "
                         "them, or give another folder")
    # the tree options together (each is checked alone at parse time); --budget auto is for the dynamic method
    DecodingOptions.from_args(args, temperature=0.0).check()


def run(args) -> int:
    check_args(args)
    if args.throughput:
        return run_throughput_mode(args)
    opts = DecodingOptions.from_args(args, temperature=0.0)  # one section's temperature: see below
    import torch
    from transformers.utils import logging as hf_logging

    from .harness import BenchSettings, prepare_inputs, run_benchmark
    from .methods import Sampling
    from .report import render, summarize, write_json

    torch.set_num_threads(args.threads)
    load_at_start = _loadavg()
    hf_logging.set_verbosity_error()  # assisted generation warns on every call about its own kwargs
    sets = _prompt_sets(args)
    target, draft, processor, model_info = _load_models(args)
    eagle = None
    if args.eagle is not None:
        from ..core.eagle import EagleHead

        eagle = EagleHead.load(args.eagle)
        eagle.check_target(target)
        model_info["eagle"] = str(args.eagle)
    other = None
    if args.other_draft is not None:
        from ..models.hf import load_model

        other = load_model(args.other_draft, LoadOptions.from_args(args), role="draft")
        model_info["other_draft"] = str(args.other_draft)
    tree_options = dict(opts.tree_options)
    out_dir = args.out or Path("runs/bench") / time.strftime("%Y%m%d-%H%M%S")  # made when the first file is written

    calibration = None
    if args.budget == "auto":
        if draft is None:
            raise ValueError("--budget auto needs a draft model")
        from ..tuning.budget import auto_node_budget
        from .report import plot_calibration

        first = next(iter(sets.values()))[: args.calibration_prompts]
        from ..core.model_info import input_device

        inputs = [prepare_inputs(processor, p, target.dtype, input_device(target)) for p in first]
        vocab = opts.draft_vocab_for(draft, 0.0)  # calibrated at T=0
        budget, calibration = auto_node_budget(target, draft, inputs, tree_options, refresh=args.recalibrate,
                                               max_new_tokens=args.max_new_tokens, draft_vocab=vocab,
                                               draft_quant=opts.draft_quant)
        calibration["profiled_on"] = [p.id for p in first]
        tree_options["node_budget"] = budget
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_calibration(calibration, out_dir / "bench_calibration.png")
        print(f"--budget auto: node_budget = {budget} (calibrated in {calibration['seconds']:.1f} s)", file=sys.stderr)
    elif args.budget is not None:
        tree_options["node_budget"] = args.budget

    sections, summaries, draft_vocabs = {}, {}, {}
    for set_name, prompts in sets.items():
        for temp in args.temperature:
            name = f"{set_name} T={temp:g}"
            variants = dict(args.variant)
            # as `specllava generate` runs it: the default vocabulary depends on the draft and T
            vocab = opts.draft_vocab_for(draft, temp)
            draft_vocabs[name] = vocab
            settings = BenchSettings(
                methods=tuple(args.methods) + tuple(variants), variants=variants, max_new_tokens=args.max_new_tokens,
                sampling=Sampling(temp, args.top_k, args.top_p), repeats=args.repeats,
                warmup=args.warmup, seed=args.seed, tree_options=tree_options, draft_vocab=vocab,
                draft_quant=opts.draft_quant, eagle=eagle, other_draft=other,
            )
            sections[name] = run_benchmark(target, draft, processor, prompts, settings,
                                           progress=not args.no_progress, label=name)
            sections[name]["prompts"] = [{"id": p.id, "prompt": p.prompt, "image": str(p.image)} for p in prompts]
            summaries[name] = summarize(sections[name])

    result = {
        "command": " ".join(["specllava"] + sys.argv[1:]),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "machine": machine_info(torch.get_num_threads()),
        "models": {**model_info, "dtype": str(target.dtype).removeprefix("torch."), "device": str(target.device)},
        "tree_options": tree_options,
        "draft_vocab": draft_vocabs,  # per section
        "draft_quant": opts.draft_quant,
        "calibration": calibration,
        "summary": summaries,
        "sections": sections,
    }
    result["machine"].update(load_average_at_start=load_at_start, load_average_at_end=_loadavg())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(result, out_dir / "results.json")
    md = render(result, out_dir)
    (out_dir / "table.md").write_text(md)
    print(md)
    print(f"results in {out_dir}", file=sys.stderr)
    return 0


def run_throughput_mode(args) -> int:
    """`--throughput`: `bench.throughput` on the first prompts of the first set."""
    methods = ("hf", "ar", "dynamic") if tuple(args.methods) == ALL_METHODS else tuple(args.methods)
    bad = [m for m in methods if m not in ("hf", "ar", "chain", "static", "dynamic")]
    if bad:
        raise ValueError(f"--throughput measures hf, ar, chain, static and dynamic; not {', '.join(bad)}")
    opts = DecodingOptions.from_args(args, temperature=0.0)
    import torch
    from transformers.utils import logging as hf_logging

    from ..core.decoder import SpeculativeDecoder
    from .report import write_json
    from .throughput import markdown, plot, run_throughput

    torch.set_num_threads(args.threads)
    load_at_start = _loadavg()
    hf_logging.set_verbosity_error()
    set_name, prompts = next(iter(_prompt_sets(args).items()))
    if len(prompts) < max(args.concurrency):
        raise ValueError(f"--concurrency {max(args.concurrency)} needs at least that many prompts; the set has "
                         f"{len(prompts)} (raise --limit)")
    args.methods = methods
    target, draft, processor, model_info = _load_models(args)
    tree_options = dict(opts.tree_options)
    if isinstance(args.budget, int):
        tree_options["node_budget"] = args.budget
    vocab = opts.draft_vocab_for(draft, 0.0)
    decoders = {m: None if m == "hf" else SpeculativeDecoder(target, None if m == "ar" else draft, method=m,
                                                             draft_vocab=vocab, draft_quant=opts.draft_quant,
                                                             **({} if m == "ar" else tree_options))
                for m in methods}
    for budget in args.fixed_budgets:
        decoders[f"dynamic-b{budget}"] = SpeculativeDecoder(target, draft, method="dynamic", draft_vocab=vocab,
                                                            draft_quant=opts.draft_quant,
                                                            **{**tree_options, "node_budget": budget})
    calibration = None
    if args.load_aware:
        from ..core.model_info import input_device
        from ..tuning.budget import (acceptance_profile, batch_node_budgets, batch_speed, measure_batch_rest,
                                     verify_cost_curve)
        from .harness import prepare_inputs

        inputs = [prepare_inputs(processor, p, target.dtype, input_device(target))
                  for p in prompts[: args.calibration_prompts]]
        cost = verify_cost_curve(target, refresh=args.recalibrate)
        profile = acceptance_profile(target, draft, inputs, tree_options, cost, refresh=args.recalibrate,
                                     max_new_tokens=args.max_new_tokens, draft_vocab=vocab, draft_quant=opts.draft_quant)
        # every batch size up to the largest: as rows finish, a group steps at the sizes in between
        sizes = range(1, max(args.concurrency) + 1)
        rest = measure_batch_rest(target, draft, inputs[0], profile, tree_options, sizes, draft_vocab=vocab,
                                  draft_quant=opts.draft_quant)
        table = batch_node_budgets(cost, profile, sizes, rest)
        calibration = {"batch_budgets": table, "rest_ms_by_batch": {c: 1e3 * r for c, r in rest.items()},
                       "expected_tokens_per_s": {
                           c: {b: batch_speed(cost, profile, c, b, rest.get(c))
                               for b in [0] + sorted(set(args.fixed_budgets) | {table[c]})}
                           for c in sorted(set(args.concurrency))}}
        print(f"--load-aware: node budget per sequence by batch size {table}", file=sys.stderr)
        decoders["dynamic-load"] = SpeculativeDecoder(target, draft, method="dynamic", draft_vocab=vocab,
                                                      draft_quant=opts.draft_quant, batch_budgets=table,
                                                      **tree_options)
    result = run_throughput(target, decoders, processor, prompts, sorted(set(args.concurrency)), args.max_new_tokens,
                            warmup=args.warmup, progress=not args.no_progress)
    out_dir = args.out or Path("runs/bench") / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info(torch.get_num_threads())
    machine.update(load_average_at_start=load_at_start, load_average_at_end=_loadavg())
    write_json({"command": " ".join(["specllava"] + sys.argv[1:]), "set": set_name, "machine": machine,
                "models": {**model_info, "dtype": str(target.dtype).removeprefix("torch.")},
                "tree_options": tree_options, "draft_vocab": vocab, "load_aware": calibration, **result},
               out_dir / "throughput.json")
    md = markdown(result["summary"])
    if result["divergences"]:
        md += "\nDivergences from hf's tokens for the same prompt alone (target's top-2 logit margin there):\n\n"
        md += "\n".join(f"- {d['method']} c={d['concurrency']} {d['prompt']}: position {d['position']}, "
                         f"margin {d['margin']:.4f}" for d in result["divergences"]) + "\n"
    (out_dir / "throughput.md").write_text(md)
    plot(result["summary"], out_dir / "bench_throughput.png",
         title=f"{set_name}, {args.max_new_tokens} new tokens, {str(target.dtype).removeprefix('torch.')}, "
               f"{args.threads} threads")
    print(md)
    print(f"results in {out_dir}", file=sys.stderr)
    return 0

