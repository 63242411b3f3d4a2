"""Training the target VLM: the LLaVA-1.5 projector (and optionally LoRA on the LM) on LLaVA JSON.

Contract:

- `train_target(cfg)` trains a stock `LlavaForConditionalGeneration` (default: the assembled default
  target, whose projector starts random) with cross-entropy on the assistant tokens only (text-only
  records included). It loads as ``cfg.load_options`` says (dtype, device, device map, attention
  implementation); the trained projector (and LoRA pairs) are float32 on the model's input device.
  The vision tower is frozen: its features are recomputed per batch or cached on disk under
  ``<out>/features/`` up to ``feature_cache_gb`` (`FeatureCache`); the LM is frozen too unless
  ``lora_rank > 0``.
- Resumable: ``<out>/checkpoint.pt`` every ``checkpoint_every`` steps and at the end (and when the
  ``max_minutes`` budget runs out); ``resume=True`` continues from it with the same data order.
- Outputs in ``<out>``: ``target.safetensors`` (projector tensors + LoRA pairs in the format of
  `specllava.models.shipped`, ready to ship), ``history.json``, ``loss.png``, ``train.log`` lines.
- `evaluate_grounding(...)` shows whether the model looks at the image: easy-vqa exact-match
  accuracy and description keyword recall against each drawing's metadata, each for the real image
  and for a blank (white) image.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from specllava.training.common import (
    FeatureCache,
    collate,
    encode_record,
    ensure_chat_template,
    image_seq_length,
    load_records,
    prompt_text,
    with_images,
)
from specllava.training.loop import plot_losses, start_run, train_loop

PROJECTOR_PREFIX = "model.multi_modal_projector."


@dataclass
class TargetTrainConfig:
    """Knobs of `train_target` (defaults = the recipe of the shipped default target).

    data: LLaVA JSON with ``meta.source`` per record (as `specllava build-data` writes it).
    init: model folder to start from; None = the assembled default target (random projector).
    per_source: cap on records per ``meta.source`` (seeded choice), to balance long descriptions,
        short captions and the many easy-vqa records in a CPU-sized budget; -1 = no cap.
    steps / batch_size / lr / warmup: AdamW with linear warm-up then cosine decay to 10%.
    lora_rank: 0 = projector only; r > 0 adds rank-r LoRA on the LM's attention and MLP projections.
    dtype / device / device_map / attn_implementation: how the model loads (`LoadOptions`); the
        default ``auto`` keeps the frozen model in bf16 where that is fast (a GPU, or a CPU with
        AMX / avx512_bf16); the trained tensors stay fp32.
    bf16: False = everything in float32 (the same as dtype "float32").
    feature_cache_gb: disk cap of the vision-feature cache (0 = recompute the features per batch).
    threads: torch threads; while other jobs share the cores, 1 can be faster than 2 (docs/training.md).
    max_minutes: wall-clock budget; training stops (saving a checkpoint) when it runs out.
    eval_examples: held-out examples (from ``eval_data``) whose loss is logged every ``eval_every``.
    """

    data: Path = Path("data/train.json")
    eval_data: Path | None = Path("data/test.json")
    out: Path = Path("runs/target")
    init: Path | None = None
    per_source: dict | None = None
    steps: int = 1200
    batch_size: int = 4
    lr: float = 1e-3
    lora_lr: float = 2e-4
    warmup: int = 10
    weight_decay: float = 0.0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    bf16: bool = True
    threads: int = 1
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 100
    eval_examples: int = 48
    max_minutes: float | None = None
    resume: bool = False
    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    attn_implementation: str | None = None
    feature_cache_gb: float = 0.0

    @property
    def load_options(self):
        from specllava.models.options import LoadOptions

        return LoadOptions(dtype=self.dtype if self.bf16 else "float32", device=self.device,
                           device_map=self.device_map, attn_implementation=self.attn_implementation)


DEFAULT_PER_SOURCE = {"smollm2-description": -1, "openclipart": 1500, "easy-vqa": 1500}


# ---------------------------------------------------------------------------------------------------
# LoRA (hand-written: ~20 lines, and the shipped format needs plain A/B pairs per weight anyway)


class LoRALinear(torch.nn.Module):
    """``base(x) + scale * x A^T B^T`` with A [r, in] (small random) and B [out, r] (zeros)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        device = base.weight.device  # A's draw is made on the CPU on purpose: the same pairs on every device
        self.lora_A = torch.nn.Parameter((torch.randn(rank, base.in_features) / math.sqrt(base.in_features)).to(device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=device))

    def forward(self, x):
        # A, B stay fp32 (trained); cast to the activations' dtype (bf16 when the frozen LM is bf16)
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Wrap the LM's projections with LoRA; returns {weight name in the unwrapped model: module}."""
    wrapped = {}
    lm = model.model.language_model
    for name, module in list(lm.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in LORA_TARGETS and isinstance(child, torch.nn.Linear):
                lora = LoRALinear(child, rank, alpha)
                setattr(module, child_name, lora)
                wrapped[f"model.language_model.{name}.{child_name}.weight"] = lora
    return wrapped


def export_weights(model, lora: dict[str, LoRALinear], alpha: float, rank: int) -> tuple[dict, dict]:
    """(tensors, metadata) for ``target.safetensors``: projector + LoRA pairs (shipped format)."""
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items() if k.startswith(PROJECTOR_PREFIX)}
    for name, module in lora.items():
        tensors[name + ".lora_A"] = module.lora_A.detach().float().contiguous()
        tensors[name + ".lora_B"] = module.lora_B.detach().float().contiguous()
    meta = {"lora_scale": str(alpha / rank)} if lora else {}
    return tensors, meta


# ---------------------------------------------------------------------------------------------------
# Data


def pick_records(records: list[dict], per_source: dict | None, seed: int) -> list[dict]:
    """Seeded choice of at most ``per_source[source]`` records per ``meta.source`` (-1 = all)."""
    if not per_source:
        return records
    by_source = defaultdict(list)
    for rec in records:
        by_source[rec.get("meta", {}).get("source", "?")].append(rec)
    out = []
    for source, recs in sorted(by_source.items()):
        cap = per_source.get(source, -1)  # sources not named are kept whole
        recs = list(recs)
        random.Random(f"{seed}:{source}").shuffle(recs)
        out += recs if cap < 0 else recs[:cap]
    return out


def load_model(init: Path | None, dtype=torch.float32, options=None):
    """(model, processor): ``init`` folder (a LLaVA-family model: its class from its config), or the
    assembled default target. ``options`` (a `specllava.models.options.LoadOptions`), when given,
    decides dtype, device, device map and attention implementation instead of ``dtype``; the
    processor's tokenizer gets the processor's chat template when it has none (`ensure_chat_template`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import specllava.models  # noqa: F401  (registers the EfficientNet tower)

    if init is None:
        from specllava.models import assemble_default_models

        init = assemble_default_models().target_dir
    kwargs = {"dtype": dtype}
    if options is not None:
        # straight onto the device (a device map of one entry), in the dtype: no CPU copy to move
        kwargs = {"dtype": options.torch_dtype, "device_map": options.device_map or {"": options.resolved_device}}
        if options.attn_implementation is not None:
            kwargs["attn_implementation"] = options.attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(init, **kwargs).eval()
    return model, ensure_chat_template(AutoProcessor.from_pretrained(init))


def encode_all(records, tokenizer, seq_len, root, desc) -> list:
    return [encode_record(r, tokenizer, seq_len, root, i) for i, r in enumerate(tqdm(records, desc=desc, mininterval=10))]


# ---------------------------------------------------------------------------------------------------
# Training


def lm_loss(model, batch) -> torch.Tensor:
    from specllava.training.common import answer_logits, input_device, to_device

    ids, att, feats, pos, labels = to_device(batch, input_device(model))
    logits = answer_logits(model, ids, feats, att, pos)  # [P, vocab]
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def eval_loss(model, examples, cache, pad_id, batch_size) -> float:
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], cache, pad_id)
        k = len(batch[4])
        total += float(lm_loss(model, batch)) * k
        n += k
    return total / max(n, 1)


def train_target(cfg: TargetTrainConfig, log=print) -> dict:
    out = start_run(cfg, Path(cfg.out))
    model, processor = load_model(cfg.init, options=cfg.load_options)
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.multi_modal_projector.float()  # trained: float32, on the device it loaded on
    lora = add_lora(model, cfg.lora_rank, cfg.lora_alpha) if cfg.lora_rank > 0 else {}
    proj = {n: p for n, p in model.named_parameters() if n.startswith(PROJECTOR_PREFIX)}
    lora_params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    trainable = {**proj, **lora_params}
    for p in trainable.values():
        p.requires_grad_(True)
    groups = [{"params": list(proj.values()), "lr": cfg.lr, "base_lr": cfg.lr}]
    if lora_params:
        groups.append({"params": list(lora_params.values()), "lr": cfg.lora_lr, "base_lr": cfg.lora_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    records, root = load_records(cfg.data)
    records = pick_records(records, cfg.per_source if cfg.per_source is not None else DEFAULT_PER_SOURCE, cfg.seed)
    records = with_images([r for r in records if len(r["conversations"]) % 2 == 0], root, log)
    seq = image_seq_length(model)
    train = encode_all(records, tok, seq, root, "tokenize train")
    held = []
    if cfg.eval_data is not None:
        eval_recs, eval_root = load_records(cfg.eval_data)
        eval_recs = pick_records(eval_recs, cfg.per_source if cfg.per_source is not None else DEFAULT_PER_SOURCE, cfg.seed)
        eval_recs = with_images([r for r in eval_recs if len(r["conversations"]) % 2 == 0], eval_root, log)
        random.Random(cfg.seed).shuffle(eval_recs)
        held = encode_all(eval_recs[: cfg.eval_examples], tok, seq, eval_root, "tokenize held-out")
    log(f"{len(train)} training examples, {sum(sum(e.loss_mask) for e in train)} assistant tokens; "
        f"{len(held)} held-out; trainable tensors: {sum(p.numel() for p in trainable.values())} params")

    cache = FeatureCache(model, processor, out / "features", int(cfg.feature_cache_gb * 1e9))

    def loss_fn(batch):
        loss = lm_loss(model, collate(batch, cache, pad_id))
        return loss, {"loss": loss.item()}

    def evaluate(step, history):
        if held and (step % cfg.eval_every == 0 or step == cfg.steps):
            model.eval()
            ev = eval_loss(model, held, cache, pad_id, cfg.batch_size)
            model.train()
            history.append({"step": step, "eval_loss": ev})
            log(f"step {step}: held-out loss {ev:.4f}")

    model.train()
    run = train_loop(train, trainable, opt, loss_fn, out, steps=cfg.steps, batch_size=cfg.batch_size, warmup=cfg.warmup,
                     seed=cfg.seed, checkpoint_every=cfg.checkpoint_every, max_minutes=cfg.max_minutes,
                     resume=cfg.resume, desc="train target", after_step=evaluate, log=log)
    model.eval()
    tensors, meta = export_weights(model, lora, cfg.lora_alpha, max(cfg.lora_rank, 1))
    from safetensors.torch import save_file

    save_file(tensors, str(out / "target.safetensors"), metadata=meta)
    plot_losses(run.history, out / "loss.png", "target training: cross-entropy on assistant tokens", {"loss": "loss"},
                markers={"eval_loss": "held-out loss"})
    summary = {"steps": run.steps, "stopped_by": run.stopped_by, "train_minutes": run.minutes,
               "final_eval_loss": next((h["eval_loss"] for h in reversed(run.history) if "eval_loss" in h), None)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"done: {summary}")
    return summary


# ---------------------------------------------------------------------------------------------------
# Does it look at the image?


def load_trained(init: Path | None, weights: Path):
    """The target with ``target.safetensors`` applied (LoRA merged), fp32, eval."""
    from specllava.models.shipped import apply_target_weights

    model, processor = load_model(init)
    apply_target_weights(model, weights)
    return model, processor


def _generate(model, processor, image, conversations, max_new_tokens) -> str:
    text = prompt_text(processor.tokenizer, conversations)
    enc = processor(images=[image], text=[text], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


_WORD = re.compile(r"[a-z]+")


def _stem(word: str) -> str:
    for suffix in ("ies", "es", "s"):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            return word[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return word


def keyword_recall(text: str, keywords: list[str]) -> float:
    """Share of metadata keywords (each a word or phrase; all its words must occur) in ``text``."""
    words = {_stem(w) for w in _WORD.findall(text.lower())}
    kws = [k for k in keywords if _WORD.findall(k.lower())]
    if not kws:
        return float("nan")
    hit = sum(all(_stem(w) in words for w in _WORD.findall(k.lower())) for k in kws)
    return hit / len(kws)


def metadata_keywords(meta: dict) -> list[str]:
    title = re.sub(r"[^a-z ]", " ", meta.get("title", "").lower())
    kws = [w for w in title.split() if len(w) > 2] + [k for k in meta.get("keywords", []) if len(k) > 2]
    seen, out = set(), []
    for k in kws:
        if k.lower() not in seen and k.lower() not in {"clip", "art", "clipart", "the", "and", "with", "svg"}:
            seen.add(k.lower())
            out.append(k)
    return out[:10]


@torch.no_grad()
def evaluate_grounding(model, processor, test_json: Path, n_vqa: int = 40, n_desc: int = 20,
                       max_new_tokens: int = 64, seed: int = 0, log=print) -> dict:
    """easy-vqa accuracy and description keyword recall, real image vs a blank white image."""
    from PIL import Image

    records, root = load_records(test_json)
    records = with_images(records, root, log)
    rng = random.Random(seed)
    vqa = [r for r in records if r.get("meta", {}).get("source") == "easy-vqa"]
    desc = [r for r in records if r.get("meta", {}).get("source") in ("openclipart", "smollm2-description")
            and metadata_keywords(r["meta"])]
    rng.shuffle(vqa)
    rng.shuffle(desc)
    seen, drawings = set(), []
    for r in desc:  # one record per drawing
        if r["image"] not in seen:
            seen.add(r["image"])
            drawings.append(r)
    blank = Image.new("RGB", (224, 224), "white")
    result = {}
    for cond in ("image", "blank"):
        correct = total = 0
        for rec in tqdm(vqa[:n_vqa], desc=f"easy-vqa ({cond})", mininterval=15):
            img = Image.open(root / rec["image"]).convert("RGB") if cond == "image" else blank
            conv = rec["conversations"]
            for j in range(0, min(len(conv), 4), 2):  # the first two questions of each image
                question = [{"from": "human", "value": "<image>\n" + conv[j]["value"].replace("<image>\n", "")}]
                answer = _generate(model, processor, img, question, 6)
                correct += answer.lower().strip(" .") == conv[j + 1]["value"].lower().strip(" .")
                total += 1
        recalls, samples = [], []
        for rec in tqdm(drawings[:n_desc], desc=f"descriptions ({cond})", mininterval=15):
            img = Image.open(root / rec["image"]).convert("RGB") if cond == "image" else blank
            text = _generate(model, processor, img, [{"from": "human", "value": "<image>\nDescribe this image in detail."}],
                             max_new_tokens)
            kws = metadata_keywords(rec["meta"])
            recalls.append(keyword_recall(text, kws))
            samples.append({"id": rec["id"], "keywords": kws, "output": text})
        result[cond] = {"easyvqa_accuracy": correct / max(total, 1), "easyvqa_questions": total,
                        "keyword_recall": sum(recalls) / max(len(recalls), 1), "descriptions": len(recalls),
                        "samples": samples[:6]}
        log(f"{cond}: easy-vqa accuracy {result[cond]['easyvqa_accuracy']:.3f} ({total} questions), "
            f"keyword recall {result[cond]['keyword_recall']:.3f} ({len(recalls)} drawings)")
    return result
