"""Pieces shared by target training and draft distillation, for any stock LLaVA model.

Contract:

- `load_records(path)` reads LLaVA conversation JSON as published (llava_v1_5_mix665k.json:
  ``id``, ``image`` or none for a text-only record, ``conversations`` with ``<image>``; see
  `check_record`) into `Records`: an index on disk (each record read back when used), with the
  folder the image paths are relative to. `with_images` skips (and counts) records whose image
  is missing, `split_held_out` splits by image, `Examples` tokenizes records batch by batch.
  The helpers take a `Records` or a list of record dicts and return the same kind.
- `encode_record(record, tokenizer, image_tokens)` renders a record with the tokenizer's chat
  template (`ensure_chat_template` gives a tokenizer without one its processor's) and returns token
  ids with ``<image>`` expanded, led by the special tokens the tokenizer adds (a Llama BOS), and
  the assistant-token mask (1 on the tokens the assistant wrote, end-of-turn included: the only
  tokens that get a loss). ``image_tokens`` is the number of tokens an image takes, or (for anyres
  LLaVA-NeXT models, see `image_tokens`) a function of the image's path.
- `vision_features(model, pixel_values)` runs the frozen tower and selects features exactly as
  `LlavaModel.get_image_features` does, *before* the projector (`FeatureCache`: computed per
  batch or cached on disk up to a cap; for LLaVA-NeXT one entry per image holds all its anyres
  patches and its size); `answer_logits(model, ids, feats, mask, positions)` is the model's
  forward from those features (projected, and for LLaVA-NeXT packed as
  `LlavaNextModel.get_image_features` packs them; rows without an image get none), returning
  logits only where a loss is taken (the vocabulary projection over the whole prompt would cost
  more than the rest of a small model).
- Devices: `model_inputs` puts a processor's output where a model reads it; `to_device` a batch.
- `Checkpoint` saves/restores trainable tensors, optimizer, step and RNG state atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from specllava.models.hf import leading_special_ids

IMAGE_PLACEHOLDER = "<image>"


# ---------------------------------------------------------------------------------------------------
# Data


@dataclass
class Example:
    """One tokenized conversation. ``loss_mask[t] = 1`` when token t was written by the assistant;
    ``image`` is None for a text-only record."""

    id: str
    image: Path | None
    input_ids: list[int]
    loss_mask: list[int]


def check_record(rec, index: int, path) -> dict:
    """The record, its conversation normalised as LLaVA's own training reads it (a leading turn
    that is not from the human is dropped), or ValueError naming the record and the problem.

    A record has a non-empty ``conversations`` list alternating human / gpt turns with string
    values; with an ``image``, ``<image>`` appears once, in the first human turn (anywhere in it:
    the prompt puts the image first); without one (text-only), it does not appear at all.
    """
    conv = rec.get("conversations") if isinstance(rec, dict) else None
    if not isinstance(conv, list) or not conv or not all(isinstance(t, dict) for t in conv):
        raise ValueError(f"{path}: record {index} needs a non-empty 'conversations' list of turns")
    name = rec.get("id", index)
    if conv[0].get("from") != "human":
        conv = conv[1:]
        if not conv:
            raise ValueError(f"{path}: record {name} has no human turn")
    for j, turn in enumerate(conv):
        want = "human" if j % 2 == 0 else "gpt"
        if turn.get("from") != want or not isinstance(turn.get("value"), str):
            raise ValueError(f"{path}: record {name} turn {j} must be from {want!r} with a string value")
    image = rec.get("image")
    count = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conv)
    if image is not None:
        if not isinstance(image, str) or not image:
            raise ValueError(f"{path}: record {name}: 'image' must be a path relative to the image folder")
        if count != 1 or IMAGE_PLACEHOLDER not in conv[0]["value"]:
            raise ValueError(f"{path}: record {name}: the first human turn needs the one {IMAGE_PLACEHOLDER} of the record")
    elif count:
        raise ValueError(f"{path}: record {name} has {IMAGE_PLACEHOLDER} but no 'image'")
    return rec if conv is rec["conversations"] else {**rec, "conversations": conv}


def _scan_json_array(path: Path, chunk_chars: int = 1 << 22):
    """(byte offset, byte length, record) of each element of the JSON array in ``path``, read in
    chunks. The stdlib reads a whole document at once (several GB of Python objects for
    llava_v1_5_mix665k.json), and the byte spans let a record be read again on its own."""
    import codecs

    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        buf, pos, offset, eof, started = "", 0, 0, False, False  # offset: the byte offset of buf[pos]

        def more() -> bool:
            nonlocal buf, pos, eof
            data = f.read(chunk_chars)
            eof = not data
            buf, pos = buf[pos:] + utf8.decode(data, final=eof), 0
            return not eof

        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos, offset = pos + 1, offset + 1
            if pos >= len(buf):
                if more():
                    continue
                raise ValueError(f"{path} is not valid JSON: the list is not closed (a truncated file?)")
            if not started:
                if buf[pos] != "[":
                    raise ValueError(f"{path}: expected a JSON list of LLaVA records")
                started, pos, offset = True, pos + 1, offset + 1
                continue
            if buf[pos] == "]":
                return
            try:
                rec, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as err:
                if not eof and more():  # the record runs past the buffer: read on
                    continue
                raise ValueError(f"{path} is not valid JSON: {err}") from None
            if end == len(buf) and not eof and more():  # a number or literal may go on in the next chunk
                continue
            size = len(buf[pos:end].encode("utf-8"))
            yield offset, size, rec
            pos, offset = end, offset + size


class Records(Sequence):
    """The records of a LLaVA JSON file, each read from disk (and checked, `check_record`) when it
    is used: memory holds, per record, its byte span, image path and size in characters, so
    llava_v1_5_mix665k.json (665K records, 1 GB) takes tens of MB instead of several GB.

    Indexing gives a record (a dict); `subset(rows)` the records at those positions.
    """

    def __init__(self, path: Path, spans, images: list, ids: list, chars, turns, rows=None):
        self.path, self._spans, self._images, self._ids = Path(path), spans, images, ids
        self._chars, self._turns = chars, turns
        self.rows = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)

    @classmethod
    def scan(cls, path: Path) -> "Records":
        spans, images, ids, chars, turns = [], [], [], [], []
        for i, (start, size, rec) in enumerate(_scan_json_array(path)):
            rec = check_record(rec, i, path)
            spans.append((start, size))
            images.append(rec.get("image"))
            ids.append(record_id(rec, i))
            chars.append(sum(len(t["value"]) for t in rec["conversations"]))
            turns.append(len(rec["conversations"]))
        return cls(path, np.asarray(spans, dtype=np.int64).reshape(-1, 2), images, ids,
                   np.asarray(chars, dtype=np.int64), np.asarray(turns, dtype=np.int32))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(range(len(self))[i])
        row = int(self.rows[i])
        start, size = self._spans[row]
        with open(self.path, "rb") as f:
            f.seek(int(start))
            rec = json.loads(f.read(int(size)))
        if "id" not in rec:
            rec["id"] = self._ids[row]  # the position in the file, as `record_id` names it
        return check_record(rec, row, self.path)

    def subset(self, positions) -> "Records":
        return Records(self.path, self._spans, self._images, self._ids, self._chars, self._turns,
                       self.rows[np.asarray(list(positions), dtype=np.int64)])

    def image(self, i: int) -> str | None:
        return self._images[int(self.rows[i])]

    def id(self, i: int) -> str:
        return self._ids[int(self.rows[i])]

    def chars(self, i: int) -> int:
        return int(self._chars[int(self.rows[i])])

    def turns(self, i: int) -> int:
        return int(self._turns[int(self.rows[i])])


def load_records(path: str | Path) -> tuple[Records, Path]:
    """(records, image root) of a LLaVA JSON file; image paths are relative to the file's folder.

    The records stay on disk (`Records`). Raises ValueError naming the record and the problem for
    anything that is not LLaVA format (`check_record`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a LLaVA conversation JSON file (a list of records)")
    try:
        return Records.scan(path), path.parent
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: not UTF-8 text ({err})") from None


def record_image(records, i: int) -> str | None:
    """The image path of record ``i`` (None for a text-only record), without reading a `Records` record."""
    return records.image(i) if isinstance(records, Records) else records[i].get("image")


def _select(records, keep: list[int]):
    return records.subset(keep) if isinstance(records, Records) else [records[i] for i in keep]


def image_records(records):
    """The records that have an image (a `Records` gives a `Records`, a list a list)."""
    return _select(records, [i for i in range(len(records)) if record_image(records, i) is not None])


def answered_records(records):
    """The records whose last turn is the assistant's (an even number of turns)."""
    turns = (records.turns if isinstance(records, Records) else lambda i: len(records[i]["conversations"]))
    return _select(records, [i for i in range(len(records)) if turns(i) % 2 == 0])


def sample_records(records, k: int, seed: int):
    """A seeded choice of ``k`` records (the choice `random.Random(seed).sample` makes), without
    reading them: a `Records` gives a `Records`."""
    if isinstance(records, Records):
        return records.subset(random.Random(seed).sample(range(len(records)), k))
    return random.Random(seed).sample(records, k)


def with_images(records, image_root: Path, log=print):
    """The records whose image file exists, and the text-only ones; the others are reported with
    their count and skipped. A `Records` gives a `Records`, a list a list."""
    keep, missing = [], []
    for i in range(len(records)):
        image = record_image(records, i)
        if image is None or (Path(image_root) / image).is_file():
            keep.append(i)
        else:
            missing.append(image)
    if missing:
        log(f"skipping {len(missing)} of {len(records)} records whose image is missing under {image_root} "
            f"(e.g. {missing[0]})")
    return _select(records, keep)


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
    image = None if rec.get("image") is None else Path(image_root) / rec["image"]
    n_image = 0 if image is None else image_seq_length(image) if callable(image_seq_length) else image_seq_length
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


def split_held_out(records, fraction: float, seed: int):
    """(train, held-out) by a seeded hash of the image path (of the id for a text-only record):
    records sharing an image stay together. A `Records` gives two `Records`, a list two lists."""
    sides: tuple[list, list] = ([], [])
    for i in range(len(records)):
        image = record_image(records, i)
        key = image if image is not None else "id:" + (records.id(i) if isinstance(records, Records) else record_id(records[i], i))
        u = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
        sides[u < fraction].append(i)
    if isinstance(records, Records):
        return records.subset(sides[0]), records.subset(sides[1])
    return [records[i] for i in sides[0]], [records[i] for i in sides[1]]


class Examples(Sequence):
    """Records tokenized when a batch needs them (`encode_record`), so no token ids of the whole
    data set are held; ``lengths`` estimates each one's token count (its characters / 4 plus its
    image tokens) for length-bucketed batches without tokenizing everything first.

    parts: (records, image root) pairs, concatenated (e.g. a `Records` and in-memory answers).
    """

    CHARS_PER_TOKEN = 4  # a coarse English average: the estimate only orders records into buckets

    def __init__(self, parts: list, tokenizer, image_tokens):
        self.parts, self.tokenizer, self.image_tokens = [p for p in parts if len(p[0])], tokenizer, image_tokens
        self.tail: list[Example] = []  # examples encoded elsewhere, after the parts (`set_tail`)
        n_image = image_tokens if isinstance(image_tokens, int) else 0  # anyres: the count needs the image
        lengths = []
        for records, _ in self.parts:
            for i in range(len(records)):
                if isinstance(records, Records):
                    chars, has_image = records.chars(i), records.image(i) is not None
                else:
                    chars = sum(len(t["value"]) for t in records[i]["conversations"])
                    has_image = records[i].get("image") is not None
                lengths.append(chars // self.CHARS_PER_TOKEN + n_image * has_image)
        self.head_lengths = np.asarray(lengths, dtype=np.int64)
        self.lengths = self.head_lengths

    def set_tail(self, examples: list[Example]) -> None:
        """Replace the encoded examples after the parts (e.g. answers regenerated during training)."""
        self.tail = list(examples)
        self.lengths = np.concatenate([self.head_lengths, np.asarray([len(e.input_ids) for e in self.tail], dtype=np.int64)])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> Example:
        if i < 0:
            i += len(self)
        for records, root in self.parts:
            if 0 <= i < len(records):
                return encode_record(records[i], self.tokenizer, self.image_tokens, root, i)
            i -= len(records)
        if 0 <= i < len(self.tail):
            return self.tail[i]
        raise IndexError(i)

    def __iter__(self):
        for records, root in self.parts:
            for i in range(len(records)):
                yield encode_record(records[i], self.tokenizer, self.image_tokens, root, i)
        yield from self.tail


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

    input_ids: [B, T]; feats: [N, image_seq_length, vision_hidden] for the N rows that have an image
    (in row order), or for anyres models a list of N ``(patches [P, S, vision_hidden], image_size
    [2])``, or None (no image in the batch) -> [B, T, hidden]
    """
    embeds = model.get_input_embeddings()(input_ids)
    if feats is None:  # a batch of text-only records
        return embeds
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

    input_ids: [B, T]; feats: as `input_embeddings` takes them; attention_mask: [B, T]; positions: ([P], [P]) index tensors
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
    """Frozen-tower features of images (`vision_features`; for anyres models a dict of all the
    image's patches and its size), computed for each batch that needs them, in the tower's dtype
    on its device. None are kept in memory: with ``directory`` and ``max_bytes`` > 0 each image's
    features are also written there (one file per image, in the tower's dtype, so a cached entry
    equals a recomputed one) until the files reach ``max_bytes``; later images are recomputed.

    A frozen tower is small next to the teacher (CLIP ViT-L/336 under a 7B LM), so recomputing is
    the default; the disk cache pays for a slow tower or several epochs.
    """

    def __init__(self, model, processor, directory: Path | None = None, max_bytes: int = 0):
        self.model, self.processor = model, processor
        self.directory = Path(directory) if directory is not None and max_bytes > 0 else None
        self.max_bytes = max_bytes
        self.used = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.used = sum(f.stat().st_size for f in self.directory.glob("*.pt"))

    def pixel_values(self, image: Path) -> torch.Tensor:
        return self.image_inputs(image)["pixel_values"]

    def image_inputs(self, image: Path) -> dict:
        with Image.open(image) as im:
            return self.processor.image_processor(images=[im.convert("RGB")], return_tensors="pt")

    def _file(self, image: Path) -> Path:
        return self.directory / (hashlib.sha256(str(Path(image).resolve()).encode()).hexdigest()[:32] + ".pt")

    def _anyres_features(self, image: Path, device, dtype) -> dict:
        """One LLaVA-NeXT image: its patches' features [P, S, D] and its size [2]."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        enc = self.image_inputs(image)
        size = enc["image_sizes"][0]
        cfg = self.model.config
        n = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        return {"patches": vision_features(self.model, enc["pixel_values"][0, :n].to(device, dtype)), "image_size": size}

    @torch.no_grad()
    def features(self, images: list[Path]) -> list:
        """Per image: features [S, D] (anyres: {"patches": [P, S, D], "image_size": [2]}), read from
        the disk cache or computed (all missing ones of a LLaVA-1.5 model in one tower forward)."""
        out: dict[int, object] = {}
        todo = []
        for k, image in enumerate(images):
            f = None if self.directory is None else self._file(image)
            if f is not None and f.is_file():
                out[k] = torch.load(f, weights_only=True)
            else:
                todo.append(k)
        weight = next(self.model.model.vision_tower.parameters())
        if todo and is_anyres(self.model):  # one image at a time: each has its own number of patches
            for k in todo:
                out[k] = self._anyres_features(Path(images[k]), weight.device, weight.dtype)
        elif todo:
            pv = torch.cat([self.pixel_values(Path(images[k])) for k in todo])
            for k, feats in zip(todo, vision_features(self.model, pv.to(weight.device, weight.dtype))):
                out[k] = feats
        for k in todo:
            self._store(images[k], out[k])
        return [out[k] for k in range(len(images))]

    def _store(self, image: Path, feats) -> None:
        if self.directory is None or self.used >= self.max_bytes:
            return
        cpu = {k: v.cpu() for k, v in feats.items()} if isinstance(feats, dict) else feats.cpu().clone()
        f = self._file(image)
        tmp = f.with_suffix(f".{os.getpid()}.tmp")  # several processes may write the same image
        torch.save(cpu, tmp)
        self.used += tmp.stat().st_size
        os.replace(tmp, f)

    def ensure(self, images: list[Path], batch_size: int = 16, progress=None) -> None:
        """Fill the disk cache with the features of ``images`` (up to its cap; nothing to do without one)."""
        if self.directory is None:
            return
        todo = sorted({str(p) for p in images if p is not None and not self._file(p).is_file()})
        for i in range(0, len(todo), batch_size):
            if self.used >= self.max_bytes:
                return
            self.features([Path(p) for p in todo[i : i + batch_size]])
            if progress is not None:
                progress.update(len(todo[i : i + batch_size]))

    def __getitem__(self, image: Path):
        return self.features([image])[0]


def collate(examples: list[Example], cache: FeatureCache, pad_id: int):
    """Right-padded batch: ids [B, T], attention [B, T], the features of the examples that have an
    image, in batch order (`FeatureCache.features`: [N, S, D] for LLaVA-1.5, for anyres models a
    list of N (patches [P, S, D], image size); None when no example has one), and the loss
    positions ``(b, t)`` whose logits predict an assistant token (t+1 masked in), with their
    labels [P]. Ids, mask and positions on the CPU, features where the tower made them."""
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
    images = [e.image for e in examples if e.image is not None]
    entries = cache.features(images) if images else []
    if not entries:
        feats = None
    elif torch.is_tensor(entries[0]):
        feats = torch.stack(entries)
    else:
        feats = [(f["patches"], f["image_size"]) for f in entries]
    return ids, att, feats, (bs, ts), labels


def to_device(batch, device):
    """A `collate` batch on ``device``."""
    ids, att, feats, (bs, ts), labels = batch
    if feats is not None:
        feats = feats.to(device) if torch.is_tensor(feats) else [(f.to(device), s) for f, s in feats]
    return ids.to(device), att.to(device), feats, (bs.to(device), ts.to(device)), labels.to(device)


def optimizer_step(loss: torch.Tensor | None, opt: torch.optim.Optimizer, params, max_norm: float = 1.0,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward, clip the trainable parameters' gradient norm, step: the same in every trainer.
    With a ``scaler`` (float16 autocast, whose small gradients would underflow) the loss is scaled
    for the backward and the gradients unscaled before clipping; a step with inf/NaN is skipped.
    ``loss=None``: the gradients are already there (summed over data-parallel processes)."""
    if loss is not None:
        opt.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is None:
        torch.nn.utils.clip_grad_norm_(list(params), max_norm)
        opt.step()
        return
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    scaler.step(opt)
    scaler.update()


def batches(lengths, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Seeded shuffled batches of indices into ``lengths`` (one length per example),
    length-bucketed (sorted by length within windows of 16 batches) so padding stays small."""
    order = list(range(len(lengths)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    window = batch_size * 16
    out = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i : i + window], key=lambda j: lengths[j])
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
        state = torch.load(self.path, weights_only=False, map_location="cpu")  # copied onto each tensor's device below
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
