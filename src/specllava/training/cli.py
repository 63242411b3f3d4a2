"""`specllava train-target`, `train-draft`, `train-eagle`, `eval-target` and `ship-default`.

The main CLI wires these in with `add_parser(subparsers)` and calls `run(args)`; until then they run
as ``python -m specllava.training train-draft ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

from specllava import cli_args


def _per_source(text: str | None) -> dict | None:
    if text is None:
        return None
    out = {}
    for item in text.split(","):
        name, _, cap = item.partition("=")
        if not cap:
            raise argparse.ArgumentTypeError(f"--per-source expects source=N,... (got {item!r})")
        out[name.strip()] = int(cap)
    return out


def source_defaults(module: str, name: str) -> SimpleNamespace:
    """The defaults of the dataclass (or the value of the constant) `name` in `module`, read from
    the module's source rather than imported: the training modules import torch and transformers
    (seconds), and `--help` should not wait for them. A default that is a literal or `Path(...)` of
    literals is read; any other is left out (the flag then gets no default from here). A test checks
    each value read against the imported class."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            fields = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None:
                    try:
                        fields[item.target.id] = _literal(item.value)
                    except ValueError:
                        pass
            return SimpleNamespace(**fields)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return _literal(node.value)
    raise LookupError(f"{module} defines no {name}")


def _literal(node):
    """A literal, or Path(<literals>)."""
    import ast

    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Path" and not node.keywords:
        return Path(*[ast.literal_eval(a) for a in node.args])
    return ast.literal_eval(node)


def add_parser(subparsers) -> None:
    """Register the training commands on an argparse subparsers object."""
    from specllava.options import add_load_args

    DRAFT_PRESETS = source_defaults("specllava.training.distill", "DRAFT_PRESETS")

    t = subparsers.add_parser(
        "train-target", help="train the default target's projector (and optional LoRA) on LLaVA JSON",
        description="Train a LLaVA target's projector (optionally LoRA on its LM) with cross-entropy on the "
                    "assistant tokens of LLaVA conversation JSON; vision features are cached once. Writes "
                    "<out>/target.safetensors (the shipped format), checkpoints, history.json and loss.png.")
    d = source_defaults("specllava.training.target", "TargetTrainConfig")
    t.add_argument("--data", type=cli_args.existing_file, default=d.data, help="training LLaVA JSON (default: %(default)s)")
    t.add_argument("--eval-data", type=cli_args.existing_file, default=d.eval_data, help="held-out LLaVA JSON for the loss curve and grounding eval")
    t.add_argument("--out", type=Path, default=d.out, help="run folder (default: %(default)s)")
    t.add_argument("--init", type=cli_args.existing_dir, default=None, help="LLaVA model folder to start from (default: the assembled default target)")
    t.add_argument("--per-source", type=_per_source, default=None,
                   help="records per meta.source, e.g. 'openclipart=700,easy-vqa=500,smollm2-description=-1' (-1 = all)")
    t.add_argument("--steps", type=cli_args.positive_int, default=d.steps)
    t.add_argument("--batch-size", type=cli_args.positive_int, default=d.batch_size)
    t.add_argument("--lr", type=cli_args.positive_float, default=d.lr, help="projector learning rate (default: %(default)s)")
    t.add_argument("--warmup", type=cli_args.non_negative_int, default=d.warmup, help="linear warm-up steps (default: %(default)s)")
    t.add_argument("--lora-rank", type=cli_args.non_negative_int, default=d.lora_rank, help="LoRA rank on the LM (0 = projector only)")
    t.add_argument("--lora-lr", type=cli_args.positive_float, default=d.lora_lr)
    t.add_argument("--no-bf16", dest="bf16", action="store_false", help="load the model in fp32 (the same as --dtype float32)")
    t.add_argument("--feature-cache-gb", type=cli_args.non_negative_float, default=d.feature_cache_gb, metavar="GB",
                   help="keep the frozen tower's image features on disk in <out>/features/, up to this many GB "
                        "(default: %(default)s = recompute them for every batch)")
    t.add_argument("--threads", type=cli_args.positive_int, default=d.threads)
    t.add_argument("--seed", type=cli_args.torch_seed, default=d.seed)
    t.add_argument("--checkpoint-every", type=cli_args.positive_int, default=d.checkpoint_every)
    t.add_argument("--eval-every", type=cli_args.positive_int, default=d.eval_every)
    t.add_argument("--max-minutes", type=cli_args.positive_float, default=None, help="stop (with a checkpoint) after this many minutes")
    t.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out (without it, and without --resume, such a "
                   "folder is refused)")
    t.add_argument("--grounding-eval", action="store_true",
                   help="afterwards, compare easy-vqa accuracy / keyword recall with the real vs a blank image")
    add_load_args(t.add_argument_group("model loading (the projector and LoRA pairs train in float32 on --device)"))
    t.set_defaults(func=run_target)

    g = subparsers.add_parser(
        "eval-target", help="does a trained target look at the image? (real vs blank image)",
        description="easy-vqa exact-match accuracy and description keyword recall (against each drawing's "
                    "metadata) of a target with trained weights, given the real image and a blank white one.")
    g.add_argument("--weights", type=cli_args.existing_file, required=True, help="target.safetensors from train-target")
    g.add_argument("--init", type=cli_args.existing_dir, default=None, help="model folder the weights apply to (default: the assembled default target)")
    g.add_argument("--data", type=cli_args.existing_file, default=Path("data/test.json"), help="held-out LLaVA JSON with meta.source/keywords")
    g.add_argument("--vqa", type=cli_args.non_negative_int, default=40, help="easy-vqa images (two questions each)")
    g.add_argument("--descriptions", type=cli_args.non_negative_int, default=20, help="drawings to describe")
    g.add_argument("--max-new-tokens", type=cli_args.positive_int, default=64)
    g.add_argument("--threads", type=cli_args.positive_int, default=1)
    g.add_argument("--seed", type=cli_args.torch_seed, default=0)
    g.add_argument("--out", type=Path, required=True, help="JSON file for the result")
    g.set_defaults(func=run_eval_target)

    h = subparsers.add_parser(
        "ship-default", help="copy trained default weights into the package assets and reassemble",
        description="Copy target.safetensors / a train-draft run's draft into src/specllava/assets/default, "
                    "write SHA256SUMS and reassemble the default pair in the local cache.")
    h.add_argument("--target-weights", type=cli_args.existing_file, default=None, help="target.safetensors from train-target")
    h.add_argument("--draft-run", type=cli_args.existing_dir, default=None, help="a train-draft --out folder (its draft/ model)")
    h.add_argument("--draft-layers", type=cli_args.positive_int, default=None, help="ship this early exit of the draft (default: all its layers)")
    h.set_defaults(func=run_ship)

    s = subparsers.add_parser(
        "train-draft", help="distil a draft VLM for any Hugging Face LLaVA target",
        description="Distil a small LLaVA draft from a LLaVA target: KL(target || draft) (or the total variation) "
                    "between their token distributions along the answers of LLaVA conversation JSON (teacher forcing), optionally "
                    "after regenerating the answers with the target. Ends with the mean accepted length "
                    "(dynamic tree, T=0) on held-out prompts, printed and saved as JSON.")
    d = source_defaults("specllava.training.distill", "DistillConfig")
    s.add_argument("--target", type=cli_args.model_source, default=None,
                   help="target model folder or hub id (default: the assembled default target)")
    s.add_argument("--data", type=cli_args.existing_file, required=True, help="training LLaVA JSON (llava_v1_5_mix665k format)")
    s.add_argument("--eval-data", type=cli_args.existing_file, action="append", default=None,
                   help="held-out LLaVA JSON for the final report (repeatable); default: a held-out split of --data")
    s.add_argument("--out", type=Path, default=d.out, help="run folder (default: %(default)s)")
    init = s.add_mutually_exclusive_group()
    init.add_argument("--draft-layers", type=cli_args.positive_int, default=d.draft_layers,
                      help="initialise the draft from the target's first N layers (default: %(default)s)")
    init.add_argument("--draft-init", type=cli_args.existing_path, default=None,
                      help="an existing small LLaVA folder, a draft.safetensors (the shipped format, e.g. git show COMMIT:src/specllava/assets/default/draft.safetensors), or a config.json, to start the draft from")
    init.add_argument("--draft-preset", choices=sorted(DRAFT_PRESETS), default=None,
                      help="a fresh draft of a published shape: llava-68m (Llama, 2 layers, hidden 768, 12 heads, "
                           "intermediate 3072) or llava-160m (12 layers, same width), with the target's vocabulary, "
                           "tokenizer and vision tower")
    s.add_argument("--exits", type=str, default=None,
                   help="also train early exits after these draft layers, e.g. '1,2' (each a shallower draft, "
                        "reported separately; to choose the depth from one run)")
    s.add_argument("--regenerate", action="store_true",
                   help="first answer every record with the target (greedy, cached in <out>/answers.jsonl, resumable)")
    s.add_argument("--regenerate-max-new-tokens", type=cli_args.positive_int, default=d.regenerate_max_new_tokens)
    s.add_argument("--sampled-answers", type=cli_args.non_negative_int, default=0, metavar="N",
                   help="also train on N answers the target samples at T=1 to a seeded choice of the records "
                        "(cached in <out>/sampled_answers.jsonl, resumable): the text a draft continues when sampling; "
                        "N above the number of records gives each record several answers")
    s.add_argument("--on-policy", type=cli_args.non_negative_int, default=d.on_policy, metavar="N",
                   help="also train on N answers the draft itself samples at T=1, scored by the target (on-policy "
                        "data, as DistillSpec), regenerated by the current draft every --on-policy-every steps "
                        "(cached in <out>/on_policy/)")
    s.add_argument("--on-policy-every", type=cli_args.positive_int, default=d.on_policy_every, metavar="STEPS")
    s.add_argument("--loss", choices=("kl", "tvd", "mix"), default=d.loss,
                   help="objective: kl = KL(target || draft); tvd = total variation 1 - sum min(p, q), the "
                        "probability that a sampled draft token is rejected; mix = (1 - w) KL + w TVD, w = --loss-mix "
                        "(default: %(default)s)")
    s.add_argument("--loss-mix", type=cli_args.fraction, default=d.loss_mix, metavar="W",
                   help="TVD weight of --loss mix (default: %(default)s)")
    s.add_argument("--loss-vocab", type=cli_args.non_negative_int, default=d.loss_vocab, metavar="K",
                   help="the TVD term compares p with the draft renormalised over its first K ranked ids, as the "
                        "decoder samples it (0: the full vocabulary; default: the decoder's sampled draft "
                        "vocabulary for the draft's token ranking)")
    s.add_argument("--limit", type=cli_args.positive_int, default=None, help="use at most this many training records (seeded choice)")
    s.add_argument("--held-out-fraction", type=cli_args.fraction, default=d.held_out_fraction)
    s.add_argument("--steps", type=cli_args.positive_int, default=d.steps)
    s.add_argument("--batch-size", type=cli_args.positive_int, default=d.batch_size)
    s.add_argument("--lr", type=cli_args.positive_float, default=d.lr)
    s.add_argument("--warmup", type=cli_args.non_negative_int, default=d.warmup)
    s.add_argument("--threads", type=cli_args.positive_int, default=d.threads)
    s.add_argument("--seed", type=cli_args.torch_seed, default=d.seed)
    s.add_argument("--checkpoint-every", type=cli_args.positive_int, default=d.checkpoint_every)
    s.add_argument("--max-minutes", type=cli_args.positive_float, default=None, help="stop (with a checkpoint) after this many minutes")
    s.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out (without it, and without --resume, such a "
                   "folder is refused)")
    s.add_argument("--eval-prompts", type=cli_args.non_negative_int, default=d.eval_prompts,
                   help="held-out prompts per eval file (0: no mean-accepted-length report)")
    s.add_argument("--eval-max-new-tokens", type=cli_args.positive_int, default=d.eval_max_new_tokens)
    s.add_argument("--image-folder", type=cli_args.existing_dir, default=None,
                   help="the folder the records' image paths are relative to (default: the --data file's folder; "
                        "for llava_v1_5_mix665k.json the one holding coco/, gqa/, ocr_vqa/, textvqa/ and vg/)")
    s.add_argument("--feature-cache-gb", type=cli_args.non_negative_float, default=d.feature_cache_gb, metavar="GB",
                   help="keep the frozen tower's image features on disk in <out>/features/, up to this many GB "
                        "(default: %(default)s = recompute them for every batch; nothing is kept in memory)")
    s.add_argument("--no-bf16", dest="bf16", action="store_false", help="run the teacher and draft in fp32 "
                   "(the same as --dtype float32)")
    add_load_args(s.add_argument_group("target loading (the draft trains on --device, in float32 under autocast "
                                       "to the target's dtype)"))
    s.set_defaults(func=run_draft)

    e = subparsers.add_parser(
        "train-eagle", help="train an EAGLE-style draft head that reads the target's hidden states",
        description="Train a one-layer draft head (specllava.core.eagle) for a Llama-style LLaVA target: it reads "
                    "the target's final hidden states and predicts the next ones, unrolled over several tree depths, "
                    "with cross-entropy against the target's token distributions. Writes <out>/eagle_head.safetensors "
                    "(use it as --draft, or in bench with --eagle), history.json, loss.png and report.json.")
    c = source_defaults("specllava.training.eagle", "EagleConfig")
    e.add_argument("--target", type=cli_args.existing_dir, default=None, help="target model folder (default: the assembled default target)")
    e.add_argument("--data", type=cli_args.existing_file, action="append", required=True,
                   help="training LLaVA JSON (repeatable; --regenerate and --sampled-answers apply to the first)")
    e.add_argument("--eval-data", type=cli_args.existing_file, action="append", default=None,
                   help="LLaVA JSON for the final mean-accepted-length report (repeatable)")
    e.add_argument("--out", type=Path, default=c.out, help="run folder (default: %(default)s)")
    e.add_argument("--regenerate", action="store_true",
                   help="replace the first file's answers by the target's greedy ones (cached in <out>/answers.jsonl)")
    e.add_argument("--sampled-answers", type=cli_args.non_negative_int, default=0, metavar="N",
                   help="add N answers the target samples at T=1 to prompts of the first file (cached, resumable)")
    e.add_argument("--max-new-tokens", type=cli_args.positive_int, default=c.max_new_tokens, help="length cap of generated answers")
    e.add_argument("--limit", type=cli_args.positive_int, default=None, help="use at most this many records per file (seeded choice)")
    e.add_argument("--passes", type=cli_args.positive_int, default=c.passes, help="unrolled tree depths trained (default: %(default)s)")
    e.add_argument("--steps", type=cli_args.positive_int, default=c.steps)
    e.add_argument("--batch-size", type=cli_args.positive_int, default=c.batch_size)
    e.add_argument("--lr", type=cli_args.positive_float, default=c.lr)
    e.add_argument("--warmup", type=cli_args.non_negative_int, default=c.warmup)
    e.add_argument("--reg-weight", type=cli_args.non_negative_float, default=c.reg_weight, help="weight of the feature regression loss")
    e.add_argument("--noise", type=cli_args.non_negative_float, default=c.noise, help="input feature noise, as a fraction of their RMS")
    e.add_argument("--held-out-fraction", type=cli_args.fraction, default=c.held_out_fraction)
    e.add_argument("--threads", type=cli_args.positive_int, default=c.threads)
    e.add_argument("--seed", type=cli_args.torch_seed, default=c.seed)
    e.add_argument("--checkpoint-every", type=cli_args.positive_int, default=c.checkpoint_every)
    e.add_argument("--max-minutes", type=cli_args.positive_float, default=None, help="stop (with a checkpoint) after this many minutes")
    e.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    e.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out (without it, and without --resume, such a "
                   "folder is refused)")
    e.add_argument("--eval-prompts", type=cli_args.positive_int, default=c.eval_prompts)
    e.add_argument("--eval-max-new-tokens", type=cli_args.positive_int, default=c.eval_max_new_tokens)
    e.add_argument("--no-bf16", dest="bf16", action="store_false", help="run the target in fp32 (the same as --dtype float32)")
    add_load_args(e.add_argument_group("target loading (the head trains in float32 on --device, under autocast to "
                                       "the target's dtype)"))
    e.set_defaults(func=run_eagle)


def _setup_logging(out: Path):
    """Training's log lines to <out>/train.log and stdout, on the `specllava.training` logger only
    (the root logger, and other libraries' logging, stay as the caller set them)."""
    out.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("specllava.training")
    for old in list(logger.handlers):  # a previous run's, in the same process
        logger.removeHandler(old)
        old.close()
    fmt = logging.Formatter("%(asctime)s %(message)s")
    for handler in (logging.FileHandler(out / "train.log"), logging.StreamHandler(sys.stdout)):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger.info


def run_target(args: argparse.Namespace) -> int:
    refuse_earlier_results(args.out, TARGET_RESULTS, args.resume, args.overwrite)
    from specllava.training.target import TargetTrainConfig, evaluate_grounding, load_trained, train_target

    cfg = TargetTrainConfig(
        data=args.data, eval_data=args.eval_data, out=args.out, init=args.init, per_source=args.per_source,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, lora_rank=args.lora_rank, lora_lr=args.lora_lr,
        bf16=args.bf16, threads=args.threads, seed=args.seed, checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every, max_minutes=args.max_minutes, resume=args.resume, dtype=args.dtype,
        device=args.device, device_map=args.device_map, attn_implementation=args.attn_implementation,
        feature_cache_gb=args.feature_cache_gb)
    log = _setup_logging(cfg.out)
    train_target(cfg, log=log)
    if args.grounding_eval:
        model, processor = load_trained(cfg.init, cfg.out / "target.safetensors")
        result = evaluate_grounding(model, processor, cfg.eval_data, seed=cfg.seed, log=log)
        (cfg.out / "grounding.json").write_text(json.dumps(result, indent=1))
    return 0


def run_eval_target(args: argparse.Namespace) -> int:
    import torch

    from specllava.training.target import evaluate_grounding, load_trained

    torch.set_num_threads(args.threads)
    model, processor = load_trained(args.init, args.weights)
    result = evaluate_grounding(model, processor, args.data, n_vqa=args.vqa, n_desc=args.descriptions,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


def run_ship(args: argparse.Namespace) -> int:
    import shutil

    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import specllava.models  # noqa: F401
    from specllava.models.assemble import assemble_default_models
    from specllava.models.shipped import DEFAULT_ASSETS_DIR, DRAFT_WEIGHTS, TARGET_WEIGHTS, write_asset_checksums
    from specllava.core.vocab import draft_ranking
    from specllava.training.distill import answers_ranking, save_draft

    DEFAULT_ASSETS_DIR.mkdir(parents=True, exist_ok=True)
    if args.target_weights is not None:
        shutil.copyfile(args.target_weights, DEFAULT_ASSETS_DIR / TARGET_WEIGHTS)
    if args.draft_run is not None:
        draft = LlavaForConditionalGeneration.from_pretrained(args.draft_run / "draft", dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(args.draft_run / "draft")
        export = args.draft_run / "export"
        export.mkdir(exist_ok=True)
        ranking = draft_ranking(draft) or answers_ranking(args.draft_run / "answers.jsonl", processor.tokenizer)
        save_draft(draft, processor, export, embeddings_frozen=True, num_layers=args.draft_layers, token_ranking=ranking)
        shutil.copyfile(export / "draft.safetensors", DEFAULT_ASSETS_DIR / DRAFT_WEIGHTS)
    write_asset_checksums(DEFAULT_ASSETS_DIR)
    for f in sorted(DEFAULT_ASSETS_DIR.iterdir()):
        print(f"{f}: {f.stat().st_size / 1e6:.1f} MB")
    paths = assemble_default_models(force=True)
    print(f"assembled: {paths.target_dir.parent} (trained: {paths.trained})")
    return 0


def run_draft(args: argparse.Namespace) -> int:
    refuse_earlier_results(args.out, DRAFT_RESULTS, args.resume, args.overwrite)
    from specllava.training.distill import DistillConfig, train_draft

    cfg = DistillConfig(
        target=args.target, data=args.data, eval_data=args.eval_data, out=args.out, draft_layers=args.draft_layers,
        draft_init=args.draft_init, exits=[int(x) for x in args.exits.split(",")] if args.exits else None,
        regenerate=args.regenerate, regenerate_max_new_tokens=args.regenerate_max_new_tokens,
        sampled_answers=args.sampled_answers, limit=args.limit,
        held_out_fraction=args.held_out_fraction, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        threads=args.threads, seed=args.seed, checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes,
        resume=args.resume, eval_prompts=args.eval_prompts, eval_max_new_tokens=args.eval_max_new_tokens,
        bf16=args.bf16, draft_preset=args.draft_preset, dtype=args.dtype, device=args.device,
        device_map=args.device_map, attn_implementation=args.attn_implementation, loss=args.loss,
        loss_mix=args.loss_mix, loss_vocab=args.loss_vocab, on_policy=args.on_policy, on_policy_every=args.on_policy_every,
        image_folder=args.image_folder, feature_cache_gb=args.feature_cache_gb)
    log = _setup_logging(cfg.out)
    report = train_draft(cfg, log=log)
    if report:  # the main process of a data-parallel run
        print(json.dumps(report["eval"], indent=1))
    return 0


# what each command writes into --out that an unintended second run would replace (caches such as
# answers.jsonl or features/ are reused, not refused)
TARGET_RESULTS = ("target.safetensors", "summary.json", "checkpoint.pt")
DRAFT_RESULTS = ("draft.safetensors", "draft", "report.json", "checkpoint.pt")
EAGLE_RESULTS = ("eagle_head.safetensors", "report.json", "checkpoint.pt")


def refuse_earlier_results(out: Path, results: tuple[str, ...], resume: bool, overwrite: bool) -> None:
    """A run folder holding an earlier run's results is refused (ValueError: exit 2) unless the
    command continues it (--resume) or replaces it (--overwrite)."""
    found = [name for name in results if (out / name).exists()]
    if found and not (resume or overwrite):
        raise ValueError(f"--out {out} holds the results of an earlier run ({', '.join(found)}); pass --overwrite to "
                         "replace them, --resume to continue that run, or another --out")


def run_eagle(args: argparse.Namespace) -> int:
    refuse_earlier_results(args.out, EAGLE_RESULTS, args.resume, args.overwrite)
    from specllava.training.eagle import EagleConfig, train_eagle

    fields = ("target", "data", "eval_data", "out", "regenerate", "sampled_answers", "max_new_tokens", "limit", "passes",
              "steps", "batch_size", "lr", "warmup", "reg_weight", "noise", "held_out_fraction", "threads", "seed",
              "checkpoint_every", "max_minutes", "resume", "eval_prompts", "eval_max_new_tokens", "bf16", "dtype", "device",
              "device_map", "attn_implementation")
    cfg = EagleConfig(**{f: getattr(args, f) for f in fields})
    log = _setup_logging(cfg.out)
    report = train_eagle(cfg, log=log)
    print(json.dumps({k: report[k] for k in ("after", "eval") if k in report}, indent=1))
    return 0


def run(args: argparse.Namespace) -> int:
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    from specllava.cli import OneLineParser, run_guarded

    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv
        argv = [a for a in argv if a != "--debug"]
        parser = OneLineParser(prog="python -m specllava.training")
        add_parser(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        return run_guarded(f"specllava {args.command}", lambda: run(args), debug)
    except KeyboardInterrupt:  # before run_guarded's own handling (see specllava.cli.main)
        print("\nspecllava: interrupted", file=sys.stderr)
        return 130
