"""Train an EAGLE-style draft head (`specllava.core.eagle`) for a LLaVA target
(``specllava train-eagle``).

Contract:

- Data: LLaVA conversation JSON files (answered records). ``regenerate`` first replaces each
  record of the *first* file by the target's own greedy answer, and ``sampled_answers`` adds that
  many answers the target sampled at T=1 (both cached in ``<out>``, resumable, as in
  `specllava.training.distill`): the head learns the text it will be asked to predict, greedy and
  sampled.
- The target loads as ``cfg.load_options`` says (dtype, device, device map, attention
  implementation); the head trains in float32 on the target's input device, under autocast to
  the target's dtype when that is a 16-bit one.
- Features: the target reads every record once (text-only records included); its final hidden
  states (post-norm, the LM head's input) are cached in ``<out>/features.pt`` with the token ids,
  keyed by the records, their images and the target (other data recomputes them).
- Loss, at every position whose next token is an assistant token and for every unrolled pass
  (`EagleHead.unrolled`: pass 1 reads the target's features, pass s its own pass s-1 predictions,
  as a draft tree at depth s-1 does): cross-entropy of the head's draft distribution over the
  draft vocabulary against the target's distribution there, plus ``reg_weight`` x smooth-L1
  between the predicted and the target's feature. The first pass's input features get Gaussian
  noise (``noise`` x their RMS).
- The head starts as the target's last layer and final norm (`EagleHead.from_target`); its fusion
  layer is new. The embedding and LM head stay the target's (not trained, not saved).
- Resumable (``<out>/checkpoint.pt``), with a ``max_minutes`` budget. Held-out records (a seeded
  ``held_out_fraction`` of the images) give per-pass top-1 agreement with the target and the T=1
  overlap sum_x min(p, q) in the report; with ``eval_data`` also the mean accepted length of
  dynamic-tree decoding at T=0 with the head (`specllava.training.distill.measure_acceptance`).
- Outputs: ``<out>/eagle_head.safetensors`` (`EagleHead.save`), ``history.json``, ``loss.png``,
  ``report.json``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from specllava.core.eagle import EagleHead
from specllava.core.vocab import draft_vocab_ids, rank_tokens, ranked_vocab_size
from specllava.training.answers import answers_ranking, regenerate_answers, sampled_answers
from specllava.training.common import (
    Checkpoint,
    answered_records,
    FeatureCache,
    encode_record,
    image_records,
    image_seq_length,
    input_device,
    input_embeddings,
    load_records,
    split_held_out,
    with_images,
)
from specllava.training.distill import measure_acceptance
from specllava.training.loop import plot_losses, start_run, train_loop


@dataclass
class EagleConfig:
    """Knobs of `train_eagle`. data: LLaVA JSON files; regenerate / sampled_answers: see the module
    docstring; passes: unrolled passes (tree depths) trained; steps / batch_size / lr / warmup:
    AdamW, linear warm-up then cosine to 10 %."""

    target: Path | None = None
    data: list = field(default_factory=lambda: [Path("data/train.json")])
    out: Path = Path("runs/eagle")
    regenerate: bool = False
    sampled_answers: int = 0
    max_new_tokens: int = 96
    generate_batch: int = 8
    limit: int | None = None
    held_out_fraction: float = 0.03
    passes: int = 3
    steps: int = 600
    batch_size: int = 8
    lr: float = 5e-4
    warmup: int = 20
    reg_weight: float = 0.1
    noise: float = 0.05
    threads: int = 2
    seed: int = 0
    checkpoint_every: int = 50
    max_minutes: float | None = None
    resume: bool = False
    eval_data: list | None = None
    eval_prompts: int = 16
    eval_max_new_tokens: int = 96
    bf16: bool = True
    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    attn_implementation: str | None = None

    @property
    def load_options(self):
        from specllava.models.options import LoadOptions

        return LoadOptions(dtype=self.dtype if self.bf16 else "float32", device=self.device,
                           device_map=self.device_map, attn_implementation=self.attn_implementation)


def _read_data(cfg: EagleConfig, log) -> list[tuple[list, Path]]:
    """(records with an existing image or none, image root) per ``cfg.data`` file, read before any
    model loads: a file that is not LLaVA JSON, or data with nothing to train on, fails at once."""
    data = []
    for path in cfg.data:
        recs, root = load_records(path)
        recs = with_images(recs, root, log)
        if cfg.limit is not None and len(recs) > cfg.limit:
            recs = random.Random(cfg.seed).sample(recs, cfg.limit)
        data.append((recs, root))
    answered = any(len(answered_records(recs)) for recs, _ in data)
    if not (answered or ((cfg.regenerate or cfg.sampled_answers) and len(data[0][0]))):
        raise ValueError(f"no usable training records in {', '.join(map(str, cfg.data))}: "
                         f"{sum(len(recs) for recs, _ in data)} records with an existing image (or none), none with "
                         "an assistant answer to learn from" + ("" if cfg.regenerate else " (--regenerate answers them)"))
    return data


def _records(cfg: EagleConfig, data, target, processor, log) -> list[tuple[dict, Path]]:
    out: list[tuple[dict, Path]] = []
    for i, (recs, root) in enumerate(data):
        if i == 0:
            sampled = sampled_answers(target, processor, recs, root, Path(cfg.out), cfg.sampled_answers, cfg.seed,
                                      cfg.max_new_tokens, cfg.generate_batch, log)
            out += [(r, root) for r in sampled]
        if i == 0 and cfg.regenerate:
            recs = regenerate_answers(target, processor, recs, root, Path(cfg.out) / "answers.jsonl",
                                      cfg.max_new_tokens, cfg.generate_batch, log)
        out += [(r, root) for r in recs if len(r["conversations"]) % 2 == 0]
    return out


@torch.no_grad()
def extract_features(target, processor, records, path: Path, batch_size: int = 8, log=print) -> list[dict]:
    """Per record: ids [T] (long), mask [T] (bool, assistant tokens) and the target's final hidden
    states [T, hidden] (bf16). Cached in ``path`` with a key of the records, their image files and
    the target: a cache of other data or another target is recomputed, not reused."""
    key = _features_key(target, records)
    if path.is_file():
        cached = _load_features(path)
        if cached.get("key") == key:
            return cached["examples"]
        log(f"{path} holds the features of other data or another target: computing them again")
    tok = processor.tokenizer
    seq = image_seq_length(target)
    examples = [encode_record(r, tok, seq, root, i) for i, (r, root) in enumerate(records)]
    cache = FeatureCache(target, processor)  # each image's features once: every record is read once
    lm = target.model.language_model
    device = input_device(target)
    out = []
    order = sorted(range(len(examples)), key=lambda k: len(examples[k].input_ids))
    for k in tqdm(range(0, len(order), batch_size), desc="target features", mininterval=15):
        chunk = [examples[j] for j in order[k : k + batch_size]]
        T = max(len(e.input_ids) for e in chunk)
        ids = torch.zeros((len(chunk), T), dtype=torch.long)
        att = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, e in enumerate(chunk):
            ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
            att[b, : len(e.input_ids)] = 1
        images = [e.image for e in chunk if e.image is not None]
        vis = torch.stack(cache.features(images)) if images else None
        ids, att = ids.to(device), att.to(device)
        hidden = lm(inputs_embeds=input_embeddings(target, ids, vis), attention_mask=att, use_cache=False).last_hidden_state
        for b, e in enumerate(chunk):
            n = len(e.input_ids)
            out.append({"id": e.id, "image": None if e.image is None else str(e.image), "ids": ids[b, :n].cpu(),
                        "mask": torch.tensor(e.loss_mask, dtype=torch.bool),
                        "feats": hidden[b, :n].to("cpu", torch.bfloat16).clone()})
    torch.save({"format": FEATURES_FORMAT, "key": key, "examples": out}, path)
    log(f"target features of {len(out)} records -> {path}")
    return out


FEATURES_FORMAT = "specllava train-eagle features"


def _features_key(target, records) -> str:
    """A digest of what the features depend on: the records (answers included), their image files
    (path, size, modification time) and the target (name, dtype)."""
    import hashlib
    import os

    parts = []
    for rec, root in records:
        image = Path(root) / rec["image"] if rec.get("image") is not None else None  # None: a text-only record
        st = os.stat(image) if image is not None and image.is_file() else None
        parts.append([rec, str(image), st and (st.st_size, st.st_mtime_ns)])
    parts.append([str(getattr(target.config, "_name_or_path", "")), str(target.dtype)])
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _load_features(path: Path) -> dict:
    """The features cache at ``path`` ({} for a cache of an older layout); a file that is not one
    (torch.load refuses it) is a ValueError naming it, rather than torch's advice to unpickle it."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # torch's note on a foreign pickle protocol: the error below says it
            warnings.simplefilter("ignore", UserWarning)
            cached = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise ValueError(f"{path} is not a features file written by train-eagle ({type(err).__name__}); "
                         "delete it, or give another --out") from None
    return cached if isinstance(cached, dict) and cached.get("format") == FEATURES_FORMAT else {}


def collate(batch: list[dict], hidden: int):
    T = max(e["ids"].numel() for e in batch)
    ids = torch.zeros((len(batch), T), dtype=torch.long)
    feats = torch.zeros((len(batch), T, hidden))
    pred = torch.zeros((len(batch), T), dtype=torch.bool)
    for b, e in enumerate(batch):
        n = e["ids"].numel()
        ids[b, :n] = e["ids"]
        feats[b, :n] = e["feats"].float()
        pred[b, : n - 1] = e["mask"][1:]  # position j predicts token j+1
    return ids, feats, pred


class Trainer:
    """The loss of `EagleHead.unrolled` against the target (module docstring)."""

    def __init__(self, head: EagleHead, target, vocab_ids: torch.Tensor, passes: int, reg_weight: float, noise: float):
        self.head, self.passes, self.reg_weight, self.noise = head, passes, reg_weight, noise
        self.embed = target.get_input_embeddings()
        self.rotary = target.get_decoder().rotary_emb
        self.full_rows = target.get_output_embeddings().weight.detach()
        self.vocab_ids = vocab_ids.to(self.full_rows.device)
        self.rows = self.full_rows.index_select(0, self.vocab_ids).float()
        dtype = self.full_rows.dtype
        self.amp = dtype if dtype in (torch.bfloat16, torch.float16) else None  # the target's 16-bit dtype

    def forward(self, batch, train: bool = True) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        device = self.full_rows.device
        ids, feats, pred = (t.to(device) for t in batch)
        B, T = ids.shape
        with torch.no_grad():
            emb = self.embed(ids).float()
            pos = torch.arange(T, device=device)[None].expand(B, T)
            cos, sin = self.rotary(emb, pos)
            inp = F.pad(feats[:, :-1], (0, 0, 1, 0))
            if train and self.noise > 0:
                rms = feats.pow(2).mean().sqrt()
                inp = inp + self.noise * rms * torch.randn_like(inp)
            logp = torch.log_softmax((feats[pred].to(self.full_rows.dtype) @ self.full_rows.T).float(), -1)
            p_k = logp[:, self.vocab_ids].exp()  # target probability of each draft-vocabulary token
        amp = self.amp or (torch.bfloat16 if device.type == "cpu" else None)  # the CPU's bf16 units even for a float32 target
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            outs = self.head.unrolled(emb, inp, cos.float(), sin.float(), self.passes)
        return [o[pred].float() for o in outs], feats[pred], p_k

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        outs, real, p_k = self.forward(batch)
        total, parts = 0.0, {}
        for s, out in enumerate(outs, start=1):
            logq = torch.log_softmax(out @ self.rows.T, -1)
            ce = -(p_k * logq).sum(-1).mean()
            reg = F.smooth_l1_loss(out, real)
            total = total + ce + self.reg_weight * reg
            parts[f"ce{s}"] = ce.item()
        return total / len(outs), parts

    @torch.no_grad()
    def evaluate(self, examples: list[dict], batch_size: int, hidden: int) -> dict:
        """Per pass: top-1 agreement with the target and the T=1 overlap sum min(p, q)."""
        agree = [0.0] * self.passes
        overlap = [0.0] * self.passes
        n = 0
        for k in range(0, len(examples), batch_size):
            outs, real, p_k = self.forward(collate(examples[k : k + batch_size], hidden), train=False)
            target_top = (real.to(self.full_rows.dtype) @ self.full_rows.T).argmax(-1)
            for s, out in enumerate(outs):
                q = torch.softmax(out @ self.rows.T, -1)
                agree[s] += (self.vocab_ids[q.argmax(-1)] == target_top).float().sum().item()
                overlap[s] += torch.minimum(q, p_k).sum(-1).sum().item()
            n += real.shape[0]
        return {"positions": n, "top1_agreement": [a / max(n, 1) for a in agree],
                "overlap_T1": [o / max(n, 1) for o in overlap]}


def head_ranking(out: Path, tokenizer, train: list[dict]) -> list[int]:
    """The head's token ranking (`core.vocab`): the tokens of the answers the target generated for
    this run (``answers.jsonl``, ``sampled_answers.jsonl``), most frequent first, as a draft's is,
    so the default draft vocabulary holds what the target writes rather than every word of the
    reference texts; without generated answers, all training assistant tokens."""
    ranked = answers_ranking([Path(out) / "answers.jsonl", Path(out) / "sampled_answers.jsonl"], tokenizer)
    return ranked or rank_tokens(int(t) for e in train for t, m in zip(e["ids"].tolist(), e["mask"].tolist()) if m)


def train_eagle(cfg: EagleConfig, log=print) -> dict:
    from specllava.training.target import load_model

    out = start_run(cfg, Path(cfg.out))
    data = _read_data(cfg, log)  # before the target loads: bad data fails at once
    target, processor = load_model(cfg.target, options=cfg.load_options)
    records = _records(cfg, data, target, processor, log)
    examples = extract_features(target, processor, records, out / "features.pt", cfg.generate_batch, log)
    if not any(bool(e["mask"].any()) for e in examples):
        raise ValueError(f"no usable training records in {', '.join(map(str, cfg.data))}: {len(examples)} records with "
                         "an existing image, none with an assistant answer to learn from")
    train, held = split_held_out(examples, cfg.held_out_fraction, cfg.seed)
    if not train or not held:  # too few images for a split: evaluate on (some of) the training records
        log(f"only {len({e['image'] for e in examples})} images: the held-out report reads training records too")
        train = train or held
        held = held or train[-8:]
    ranking = head_ranking(out, processor.tokenizer, train)
    head = EagleHead.from_target(target, ranking).to(input_device(target))
    size = int(target.get_output_embeddings().weight.shape[0])
    vocab_ids = draft_vocab_ids(ranked_vocab_size(len(ranking), 1.0, size), size, ranking)  # the sampled K
    hidden = head.shape.hidden
    log(f"EAGLE head: {sum(p.numel() for p in head.parameters())} parameters; {len(train)} training / {len(held)} "
        f"held-out records, {sum(int(e['mask'].sum()) for e in train)} assistant tokens; draft vocabulary {vocab_ids.numel()}")
    trainer = Trainer(head, target, vocab_ids, cfg.passes, cfg.reg_weight, cfg.noise)
    params = dict(head.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=0.0)
    resuming = cfg.resume and Checkpoint(out).path.is_file()
    report = {} if resuming else {"before": trainer.evaluate(held, cfg.batch_size, hidden)}

    def loss_fn(batch):
        loss, parts = trainer.loss(collate(batch, hidden))
        return loss, {"loss": loss.item(), **parts}

    head.train()
    run = train_loop(train, params, opt, loss_fn, out, steps=cfg.steps, batch_size=cfg.batch_size, warmup=cfg.warmup,
                     seed=cfg.seed, checkpoint_every=cfg.checkpoint_every, max_minutes=cfg.max_minutes,
                     resume=cfg.resume, desc="train EAGLE head", postfix="ce1", length=lambda e: e["ids"].numel(),
                     on_checkpoint=lambda step: head.save(out / "eagle_head.safetensors"), log=log)
    head.eval()
    head.save(out / "eagle_head.safetensors")
    # a run resumed with more passes has the deeper curves from then on
    plot_losses(run.history, out / "loss.png", "EAGLE head: cross-entropy against the target, per unrolled pass",
                {f"ce{s}": f"ce{s}" for s in range(1, cfg.passes + 1)}, raw=False)
    report.update({"steps": run.steps, "stopped_by": run.stopped_by, "train_minutes": run.minutes,
                   "after": trainer.evaluate(held, cfg.batch_size, hidden), "draft_vocab": int(vocab_ids.numel())})
    report["eval"] = {}
    for path in cfg.eval_data or []:
        recs, root = load_records(path)
        r = measure_acceptance(target, head, processor, image_records(with_images(recs, root, log)), root, cfg.eval_prompts,
                               cfg.eval_max_new_tokens, desc=f"eval {Path(path).stem}")
        report["eval"][Path(path).stem] = r
        log(f"{Path(path).stem}: mean accepted length {r['mean_accepted']:.2f} over {r['prompts']} prompts, "
            f"{r['ms_per_step']:.0f} ms/step")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log(f"held-out top-1 agreement per pass {[round(a, 3) for a in report['after']['top1_agreement']]}, "
        f"T=1 overlap {[round(a, 3) for a in report['after']['overlap_T1']]} -> {out / 'report.json'}")
    return report

