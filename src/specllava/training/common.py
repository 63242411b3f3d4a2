"""Pieces shared by target training and draft distillation, for any stock LLaVA model.

Contract:

- `load_records(path)` reads LLaVA conversation JSON (the llava_v1_5_mix665k format: ``image``,
  ``conversations`` with ``<image>``) and keeps the folder the image paths are relative to.
- `encode_record(record, tokenizer, image_tokens)` renders a record with the tokenizer's chat
  template (`ensure_chat_template` gives a tokenizer without one its processor's) and returns token
  ids with ``<image>`` expanded, led by the special tokens the tokenizer adds (a Llama BOS), and
  the assistant-token mask (1 on the tokens the assistant wrote, end-of-turn included: the only
  tokens that get a loss). ``image_tokens`` is the number of tokens an image takes, or (for anyres
  LLaVA-NeXT models, see `image_tokens`) a function of the image's path.
- `vision_features(model, pixel_values)` runs the frozen tower and selects features exactly as
  `LlavaModel.get_image_features` does, *before* the projector, so they can be computed once and
  cached (`FeatureCache`; for LLaVA-NeXT one entry per image holds all its anyres patches and its
  size); `answer_logits(model, ids, feats, mask, positions)` is the model's forward from cached
  features (projected, and for LLaVA-NeXT packed as `LlavaNextModel.get_image_features` packs
  them), returning logits only where a loss is taken (the vocabulary projection over the whole
  prompt would cost more than the rest of a small model).
- Devices: `model_inputs` puts a processor's output where a model reads it; `to_device` a batch.
- `Checkpoint` saves/restores trainable tensors, optimizer, step and RNG state atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from specllava.models.hf import leading_special_ids

IMAGE_PLACEHOLDER = "<image>"


# ---------------------------------------------------------------------------------------------------
# Data


@dataclass
class Example:
    """One tokenized conversation. ``loss_mask[t] = 1`` when token t was written by the assistant."""

    id: str
    image: Path
    input_ids: list[int]
    loss_mask: list[int]


def load_records(path: str | Path) -> tuple[list[dict], Path]:
    """(records, image root) of a LLaVA JSON file; image paths are relative to the file's folder.

    Raises ValueError naming the record and the problem for anything that is not LLaVA format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a LLaVA conversation JSON file (a list of records)")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA records, got {type(records).__name__}")
    for i, rec in enumerate(records):
        conv = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(conv, list) or not conv or "image" not in rec:
            raise ValueError(f"{path}: record {i} needs 'image' and a non-empty 'conversations' list")
        for j, turn in enumerate(conv):
            want = "human" if j % 2 == 0 else "gpt"
            if turn.get("from") != want or not isinstance(turn.get("value"), str):
                raise ValueError(f"{path}: record {rec.get('id', i)} turn {j} must be from {want!r} with a string value")
        if IMAGE_PLACEHOLDER not in conv[0]["value"]:
            raise ValueError(f"{path}: record {rec.get('id', i)}: the first human turn has no {IMAGE_PLACEHOLDER}")
    return records, path.parent


def with_images(records: list[dict], image_root: Path, log=print) -> list[dict]:
    """The records whose image file exists (the others are reported and skipped)."""
    kept = [r for r in records if (Path(image_root) / r["image"]).is_file()]
    if len(kept) < len(records):
        missing = [r["image"] for r in records if not (Path(image_root) / r["image"]).is_file()]
        log(f"skipping {len(missing)} records whose image is missing under {image_root} (e.g. {missing[0]})")
    return kept


def record_id(rec: dict, index: int) -> str:
    return str(rec.get("id", f"#{index}"))


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns -> chat messages; ``<image>`` becomes an ``{"type": "image"}`` content item."""
    messages = []
    for turn in conversations:
        if turn["from"] == "human":
            text = turn["value"].replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()
            content = ([{"type": "image"}] if IMAGE_PLACEHOLDER in turn["value"] else []) + [{"type": "text", "text": text}]
            messages.append({"role": "user", "content": content})
        else:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["value"]}]})
    return messages


def ensure_chat_template(processor):
    """The processor, its tokenizer given the processor's chat template when it has none of its own
    (llava-hf checkpoints keep theirs in ``chat_template.json``, beside the tokenizer)."""
    tok = processor.tokenizer
    if getattr(tok, "chat_template", None) is None:
        template = getattr(processor, "chat_template", None)
        if template is None:
            raise ValueError("neither the tokenizer nor the processor has a chat template; add one to the "
                             "model folder (chat_template.json) to train on conversations")
        tok.chat_template = template
    return processor


def prompt_text(tokenizer, conversations: list[dict]) -> str:
    """The chat-template text of all turns, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(to_messages(conversations), tokenize=False, add_generation_prompt=True)


def encode_record(rec: dict, tokenizer, image_seq_length, image_root: Path, index: int = 0) -> Example:
    """Token ids and assistant mask of a fully answered record (see the module docstring).

    The assistant spans are found by rendering growing prefixes of the conversation (works with any
    chat template, not only those with ``{% generation %}`` markers); a template whose prefixes are
    not prefixes of the full text gets a clear error.
    """
    conv = rec["conversations"]
    if len(conv) % 2:
        raise ValueError(f"record {record_id(rec, index)} ends with an unanswered question; answer it (--regenerate)")
    messages = to_messages(conv)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k in range(1, len(messages), 2):
        start = len(tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True))
        end_text = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not full.startswith(end_text):
            raise ValueError("the tokenizer's chat template does not render conversations prefix by prefix; "
                             "cannot locate the assistant turns")
        spans.append((start, len(end_text)))
    # Expand <image> into the image tokens here (as the processor does) so no image is needed to tokenize
    # (LLaVA-NeXT: the count is read once per image, from its size).
    image_token = getattr(tokenizer, "image_token", None) or IMAGE_PLACEHOLDER
    image = image_root / rec["image"]
    n_image = image_seq_length(image) if callable(image_seq_length) else image_seq_length
    pieces, mask_chars, pos = [], [], 0
    for start, end in spans:
        pieces.append(full[pos:start])
        mask_chars.append(0)
        pieces.append(full[start:end])
        mask_chars.append(1)
        pos = end
    pieces.append(full[pos:])
    mask_chars.append(0)
    ids = leading_special_ids(tokenizer, full)  # the BOS a Llama tokenizer adds (none if the template wrote it)
    mask = [0] * len(ids)
    for text, m in zip(pieces, mask_chars):
        if not text:
            continue
        text = text.replace(IMAGE_PLACEHOLDER, image_token * n_image)
        tok = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += tok
        mask += [m] * len(tok)
    return Example(record_id(rec, index), image, ids, mask)


def image_seq_length(model) -> int:
    return int(model.config.image_seq_length)


def is_anyres(model) -> bool:
    """True for LLaVA-NeXT-style models (anyres patches, `image_sizes`, a per-image token count)."""
    return getattr(model.config, "image_grid_pinpoints", None) is not None


def image_tokens(model, processor):
    """Tokens an image takes in the prompt: the config's ``image_seq_length`` for LLaVA-1.5, and for
    anyres models a function of the image's path that asks the processor (the count depends on the
    image's size), remembering each image's count."""
    if not is_anyres(model):
        return image_seq_length(model)
    counts: dict[str, int] = {}
    token = processor.image_token if getattr(processor, "image_token", None) else IMAGE_PLACEHOLDER
    token_id = image_token_id(model)

    def count(path: Path) -> int:
        if str(path) not in counts:
            with Image.open(path) as im:
                ids = processor(images=[im.convert("RGB")], text=[token], return_tensors="pt")["input_ids"]
            counts[str(path)] = int((ids == token_id).sum())
        return counts[str(path)]

    return count


def encode_prompts(processor, images: list, texts: list[str], **kwargs):
    """The processor's inputs (``return_tensors="pt"``) for chat-template prompts, led by the special
    tokens the tokenizer adds (its BOS) unless the template wrote them (`leading_special_ids`): the
    same rule as `encode_record`, so a prompt reads as its training text did."""
    add = bool(leading_special_ids(processor.tokenizer, texts[0]))  # one template: the same for every text
    return processor(images=images, text=texts, return_tensors="pt", add_special_tokens=add, **kwargs)


def input_device(model) -> torch.device:
    """Where the model reads its inputs: the input embedding's device (the first of a dispatched model)."""
    return model.get_input_embeddings().weight.device


def model_inputs(model, enc) -> dict:
    """A processor's output on the model's input device, floating tensors (pixel values) in the
    vision tower's dtype."""
    device = input_device(model)
    dtype = next(model.model.vision_tower.parameters()).dtype
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in dict(enc).items()}


def image_token_id(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "image_token_id", None) if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index)


def split_held_out(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by a seeded hash of the image path: records sharing an image stay together."""
    train, held = [], []
    for rec in records:
        u = int.from_bytes(hashlib.sha256(f"{seed}:{rec['image']}".encode()).digest()[:8], "big") / 2**64
        (held if u < fraction else train).append(rec)
    return train, held


# ---------------------------------------------------------------------------------------------------
# Model pieces


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Selected tower features before the projector, as `LlavaModel.get_image_features` selects them.

    pixel_values: [B, 3, H, W] -> [B, image_seq_length, vision_hidden]
    """
    cfg = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    layer, strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
    layers = [layer] if isinstance(layer, int) else list(layer)
    hs = [out.hidden_states[i][:, 1:] if strategy == "default" else out.hidden_states[i] for i in layers]
    return torch.cat(hs, dim=-1)


def input_embeddings(model, input_ids: torch.Tensor, feats) -> torch.Tensor:
    """Token embeddings with the projected image features scattered into the image-token slots.

    input_ids: [B, T]; feats: [B, image_seq_length, vision_hidden], or for anyres models a list of
    B ``(patches [P, S, vision_hidden], image_size [2])`` -> [B, T, hidden]
    """
    embeds = model.get_input_embeddings()(input_ids)
    projector = model.model.multi_modal_projector
    weight = next(projector.parameters())
    if torch.is_tensor(feats):
        image = projector(feats.to(weight.device, weight.dtype)).to(embeds.dtype)  # [B, S, hidden]
    else:  # anyres: project each image's patches, then unpad and pack them as LlavaNextModel does
        projected = [projector(f.to(weight.device, weight.dtype)) for f, _ in feats]
        sizes = torch.stack([torch.as_tensor(s) for _, s in feats])
        packed, _ = model.model.pack_image_features(projected, sizes, model.config.vision_feature_select_strategy,
                                                    image_newline=model.model.image_newline)
        image = torch.cat(packed).to(embeds.dtype)  # [image tokens of the batch, hidden]
    slots = (input_ids == image_token_id(model)).unsqueeze(-1)
    return embeds.masked_scatter(slots.to(embeds.device), image.to(embeds.device))


def answer_logits(model, input_ids, feats, attention_mask, positions, exits: list[int] | None = None):
    """Logits predicting token t+1 at each (b, t) in ``positions``, from cached vision features.

    input_ids: [B, T]; feats: [B, S, D]; attention_mask: [B, T]; positions: ([P], [P]) index tensors
    returns [P, vocab] (or, with ``exits`` = 1-based layer numbers, a list of [P, vocab], one per
    exit, each through the final norm and the LM head: the draft's early exits).
    """
    embeds = input_embeddings(model, input_ids, feats)
    lm = model.model.language_model
    out = lm(inputs_embeds=embeds, attention_mask=attention_mask, output_hidden_states=exits is not None,
             use_cache=False, return_dict=True)
    if exits is None:
        return model.lm_head(out.last_hidden_state[positions])
    # hidden_states[k] is the output of layer k (the last one already normed by the model)
    n = len(lm.layers)
    return [model.lm_head(out.last_hidden_state[positions] if k == n else lm.norm(out.hidden_states[k][positions]))
            for k in exits]


class FeatureCache:
    """Frozen-tower features per image path, computed once (the tower never trains), kept in memory
    as bf16 and optionally saved to a ``.pt`` file so a restart does not recompute them."""

    def __init__(self, model, processor, path: Path | None = None):
        self.model, self.processor, self.path = model, processor, path
        self.store: dict[str, torch.Tensor] = {}
        if path is not None and Path(path).is_file():
            self.store = torch.load(path)

    def pixel_values(self, image: Path) -> torch.Tensor:
        return self.image_inputs(image)["pixel_values"]

    def image_inputs(self, image: Path) -> dict:
        with Image.open(image) as im:
            return self.processor.image_processor(images=[im.convert("RGB")], return_tensors="pt")

    def _anyres_features(self, image: Path, device, dtype) -> dict:
        """One LLaVA-NeXT image: its patches' features [P, S, D] (bf16, CPU) and its size [2]."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        enc = self.image_inputs(image)
        size = enc["image_sizes"][0]
        cfg = self.model.config
        n = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        feats = vision_features(self.model, enc["pixel_values"][0, :n].to(device, dtype))  # [P, S, D]
        return {"patches": feats.to("cpu", torch.bfloat16).clone(), "image_size": size.clone()}

    @torch.no_grad()
    def ensure(self, images: list[Path], batch_size: int = 16, progress=None, save_every: int = 256) -> None:
        todo = sorted({str(p) for p in images} - set(self.store))
        weight = next(self.model.model.vision_tower.parameters())
        anyres = is_anyres(self.model)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            if anyres:  # one image at a time: each has its own number of patches
                for p in chunk:
                    self.store[p] = self._anyres_features(Path(p), weight.device, weight.dtype)
            else:
                pv = torch.cat([self.pixel_values(Path(p)) for p in chunk])
                feats = vision_features(self.model, pv.to(weight.device, weight.dtype))
                for p, f in zip(chunk, feats):
                    self.store[p] = f.to("cpu", torch.bfloat16).clone()
            if progress is not None:
                progress.update(len(chunk))
            if (i // batch_size + 1) % max(save_every // batch_size, 1) == 0:
                self.save()  # an interrupted run keeps what it computed
        if todo:
            self.save()

    def save(self) -> None:
        if self.path is not None:
            tmp = Path(str(self.path) + ".tmp")
            torch.save(self.store, tmp)
            os.replace(tmp, self.path)

    def __getitem__(self, image: Path) -> torch.Tensor:
        return self.store[str(image)]


def collate(examples: list[Example], cache: FeatureCache, pad_id: int):
    """Right-padded batch: ids [B, T], attention [B, T], features [B, S, D] (float32; for anyres
    models a list of B (patches [P, S, D], image size)), and the loss positions ``(b, t)`` whose
    logits predict an assistant token (t+1 masked in), with their labels [P]. On the CPU."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), T), dtype=torch.long)
    tgt_mask = torch.zeros((len(examples), T), dtype=torch.bool)
    for b, e in enumerate(examples):
        ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
        att[b, : len(e.input_ids)] = 1
        tgt_mask[b, : len(e.loss_mask)] = torch.tensor(e.loss_mask, dtype=torch.bool)
    pred = tgt_mask[:, 1:]  # position t predicts token t+1
    bs, ts = pred.nonzero(as_tuple=True)
    labels = ids[bs, ts + 1]
    entries = [cache[e.image] for e in examples]
    if torch.is_tensor(entries[0]):
        feats = torch.stack(entries).float()
    else:
        feats = [(f["patches"].float(), f["image_size"]) for f in entries]
    return ids, att, feats, (bs, ts), labels


def to_device(batch, device):
    """A `collate` batch on ``device``."""
    ids, att, feats, (bs, ts), labels = batch
    feats = feats.to(device) if torch.is_tensor(feats) else [(f.to(device), s) for f, s in feats]
    return ids.to(device), att.to(device), feats, (bs.to(device), ts.to(device)), labels.to(device)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params, max_norm: float = 1.0,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward, clip the trainable parameters' gradient norm, step: the same in every trainer.
    With a ``scaler`` (float16 autocast, whose small gradients would underflow) the loss is scaled
    for the backward and the gradients unscaled before clipping; a step with inf/NaN is skipped."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params), max_norm)
        opt.step()
        return
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    scaler.step(opt)
    scaler.update()


def batches(examples: list, batch_size: int, seed: int, epoch: int, length=lambda e: len(e.input_ids)):
    """Seeded shuffled batches of indices, length-bucketed (sorted by `length` within windows of 16
    batches) so padding stays small."""
    order = list(range(len(examples)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    window = batch_size * 16
    out = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i : i + window], key=lambda j: length(examples[j]))
        out += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    random.Random(seed * 1000 + epoch + 1).shuffle(out)
    return out


# ---------------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class Checkpoint:
    """``<dir>/checkpoint.pt``: trainable tensors by name, optimizer state, step, loss history.

    Written to a temporary file and renamed, so a kill during saving leaves the previous one intact.
    """

    directory: Path
    history: list = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.directory) / "checkpoint.pt"

    def save(self, step: int, tensors: dict[str, torch.Tensor], optimizer, extra: dict | None = None) -> None:
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        state = {"step": step, "tensors": {k: v.detach().clone() for k, v in tensors.items()},
                 "optimizer": optimizer.state_dict(), "history": self.history, "extra": extra or {},
                 "rng": torch.get_rng_state()}
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self, params: dict[str, torch.nn.Parameter], optimizer) -> int:
        """Restore into ``params`` and ``optimizer``; return the step to continue from (0 if none)."""
        if not self.path.is_file():
            return 0
        state = torch.load(self.path, weights_only=False)
        missing = set(params) - set(state["tensors"])
        if missing:
            raise RuntimeError(f"{self.path} does not match this run (no {sorted(missing)[:3]}...); "
                               "use another --out folder or drop --resume")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["tensors"][name])
        optimizer.load_state_dict(state["optimizer"])
        self.history = state["history"]
        torch.set_rng_state(state["rng"])
        return int(state["step"])


def plot_history(history: list[dict], path: Path, title: str, keys: tuple[str, ...] = ("loss",)) -> None:
    """Loss curve(s) against step (held-out points drawn as markers), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for key in keys:
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            xs, ys = zip(*pts)
            style = "o-" if key.startswith(("eval", "held-out")) else "-"
            alpha = 0.3 if key.endswith("per step") else 1.0  # raw per-step values: faint, behind the smoothed curve
            ax.plot(xs, ys, style, label=key, lw=1.2, ms=4, alpha=alpha)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def smooth(values: list[float], k: int = 20) -> list[float]:
    out, acc = [], []
    for v in values:
        acc = (acc + [v])[-k:]
        out.append(sum(acc) / len(acc))
    return out
