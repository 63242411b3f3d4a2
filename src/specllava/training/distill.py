"""Draft distillation for any Hugging Face LLaVA target (``specllava train-draft``).

Contract:

- `train_draft(cfg)` distils a draft of the target's class from the target: minimise KL(p || q)
  (p = target, q = draft token distribution; the Spec-LLaVA recipe, the default), the total
  variation 1 - sum min(p, q) (what the acceptance of one sampled candidate rewards) or a mix
  (``loss``) at every assistant token of LLaVA conversation JSON, teacher-forced along the answers. With
  ``regenerate`` the answers are first replaced by the target's own greedy answers to each record's
  first question (cached in ``<out>/answers.jsonl``, one line per record, resumable), so the draft
  learns the text it will actually be asked to predict. ``sampled_answers`` adds that many answers
  the target *sampled* at T=1 to a seeded choice of the training records (cached in
  ``<out>/sampled_answers.jsonl``, resumable): at T>0 the draft is asked to continue the target's
  sampled text, which wanders far from its greedy answers. The token ranking stays that of the
  other answers, so the default draft vocabulary sizes do not change.
- Any stock LLaVA-family target (`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`
  with anyres images), loaded with `specllava.models.options.LoadOptions` (dtype, device, device map,
  attention implementation). The target is its own teacher, in its own dtype on its own device (no
  copy); the draft is built on ``device`` from the meta device (`draft_from_target`,
  `_fresh_draft`): its trained tensors are created there in float32, its frozen ones are the
  target's (no copy); its forward runs under autocast to the target's dtype on that device type
  when the target is in 16 bits (with loss scaling in float16).
- Data: `specllava.training.common.Records` (llava_v1_5_mix665k.json as published, records read
  from disk when used; text-only records train without an image; records whose image is missing
  are skipped and counted), tokenized batch by batch (`Examples`); vision features recomputed per
  batch or cached on disk up to ``feature_cache_gb`` (`FeatureCache`).
- Data parallel: under ``accelerate launch`` each process trains on its share of every batch
  (`specllava.training.loop.Processes`); the main process writes the answers, the checkpoints,
  the draft and the report.
- The draft starts as the target's first ``draft_layers`` layers (`draft_from_target`: the target's
  embedding, first layers, norm and head; the default), from ``draft_preset`` (a published draft
  shape, `DRAFT_PRESETS`: a fresh Llama LM of that shape with the target's vocabulary, tokenizer,
  vision tower (shared) and image layout; a new projector) or from ``draft_init`` (a small LLaVA
  folder, a ``draft.safetensors`` in the shipped format, or a config.json whose model is built
  fresh; the target's vision tower is shared with it when the shapes fit). The vision tower is
  frozen; embedding and head stay frozen when they are the target's own (the draft then
  shares its vocabulary rows exactly, and the shipped file can omit them); everything else trains.
- ``exits`` adds early exits after some draft layers (final norm + head on that layer's output),
  trained jointly, so one run measures several draft depths.
- Resumable: ``<out>/checkpoint.pt`` every ``checkpoint_every`` steps, at the end, and when the
  ``max_minutes`` budget runs out.
- The final report (``<out>/report.json``, also returned) gives, per held-out file and per exit
  depth, the mean accepted length of `SpeculativeDecoder(method="dynamic")` at T=0 (tokens per
  target forward, bonus included), the measured per-forward costs and the speedup bound they imply.
- Outputs: ``<out>/draft/`` (``save_pretrained`` folder with the target's processor: a usable model),
  ``<out>/draft.safetensors`` (the `specllava.models.shipped` format: trained tensors only, bf16,
  ``num_layers`` metadata; not for preset drafts, which it cannot describe), ``history.json``, ``loss.png``, ``report.json``. Both draft outputs carry
  the draft's token ranking (the training answers' ids, most frequent first), which
  ``draft_vocab=K`` uses to pick a reduced draft vocabulary (`specllava.core.vocab`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from specllava.core.vocab import RANKING_ATTR, draft_ranking, draft_vocab_ids, rank_tokens, ranked_vocab_size
from specllava.options import LoadOptions
from specllava.training.answers import (  # noqa: F401  (answers_ranking, first_question: this module's API too)
    answers_ranking,
    first_question,
    regenerate_answers,
    sampled_answers,
)
from specllava.training.common import (
    Examples,
    FeatureCache,
    answer_logits,
    answered_records,
    collate,
    encode_prompts,
    encode_record,
    image_records,
    image_tokens,
    input_device,
    load_records,
    model_inputs,
    prompt_text,
    record_image,
    sample_records,
    split_held_out,
    to_device,
    with_images,
)
from specllava.training.loop import Processes, lr_at, plot_losses, start_run, train_loop  # noqa: F401  (lr_at: this module's API too)

# The published Spec-LLaVA draft shapes (Llama LMs; vocabulary, tokenizer and vision tower: the target's).
DRAFT_PRESETS = {
    "llava-68m": {"num_hidden_layers": 2, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
    "llava-160m": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
}


@dataclass
class DistillConfig:
    """Knobs of `train_draft` (defaults = the recipe of the shipped default draft).

    target: target model folder; None = the assembled default target.
    data / eval_data: LLaVA JSON; without eval_data, ``held_out_fraction`` of data's images are held out.
    draft_layers / draft_preset / draft_init: the draft's starting point (see the module docstring).
    dtype / device / device_map / attn_implementation: how the target loads (`LoadOptions`; the
        draft trains on ``device``, or where the target reads its inputs under a device map).
    exits: extra early exits (1-based draft layer numbers) trained and reported too.
    regenerate: answer every training record with the target first (greedy, cached, resumable);
        ``regenerate_max_new_tokens`` caps those answers, ``regenerate_batch`` prompts run at once.
    limit: use at most this many training records (seeded choice).
    steps / batch_size / lr / warmup: AdamW, linear warm-up then cosine to 10%.
    bf16: False = everything in float32 (the same as dtype "float32"); True = ``dtype``.
    eval_prompts / eval_max_new_tokens: held-out prompts per eval file and tokens generated for each.
    image_folder: the folder ``data``'s image paths are relative to (default: the file's folder).
    feature_cache_gb: disk cap of the vision-feature cache in ``<out>/features/`` (`FeatureCache`;
        0 = recompute the features of every batch).
    loss: "kl" (KL(p || q), the default), "tvd" (total variation, 1 - sum min(p, q): what a single
        sampled candidate's acceptance rewards) or "mix" ((1 - loss_mix) * KL + loss_mix * TVD); see
        `distill_loss` and the measurements in docs/training.md.
    loss_vocab: the ids the TVD term compares over: None = the draft's sampled vocabulary (its ranked
        ids, as many as `core.vocab.default_draft_vocab` gives at T > 0: what the decoder samples
        from), 0 = the full vocabulary, K = the first K ranked ids.
    on_policy: answers the *draft* samples at T=1 (to a seeded choice of the training prompts) that
        join the training data, scored by the target (DistillSpec's on-policy data); regenerated by
        the current draft every ``on_policy_every`` steps, cached in ``<out>/on_policy/``.
    """

    target: Path | None = None
    data: Path = Path("data/train.json")
    eval_data: list | None = None
    out: Path = Path("runs/draft")
    draft_layers: int = 2
    draft_init: Path | None = None
    draft_preset: str | None = None
    exits: list | None = None
    regenerate: bool = False
    regenerate_max_new_tokens: int = 128
    regenerate_batch: int = 8
    sampled_answers: int = 0
    limit: int | None = None
    held_out_fraction: float = 0.05
    steps: int = 1000
    batch_size: int = 4
    lr: float = 3e-4
    warmup: int = 30
    threads: int = 1
    seed: int = 0
    checkpoint_every: int = 100
    max_minutes: float | None = None
    resume: bool = False
    eval_prompts: int = 16
    eval_max_new_tokens: int = 128
    bf16: bool = True
    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    attn_implementation: str | None = None
    image_folder: Path | None = None
    feature_cache_gb: float = 0.0
    loss: str = "kl"
    loss_mix: float = 0.5
    loss_vocab: int | None = None
    on_policy: int = 0
    on_policy_every: int = 100

    @property
    def load_options(self) -> LoadOptions:
        return LoadOptions(dtype=self.dtype if self.bf16 else "float32", device=self.device,
                           device_map=self.device_map, attn_implementation=self.attn_implementation)


# ---------------------------------------------------------------------------------------------------
# Models


def load_target(cfg: DistillConfig):
    """(target, processor) as ``cfg.load_options`` says (default: the assembled default target)."""
    from specllava.training.target import load_model

    return load_model(cfg.target, options=cfg.load_options)


FROZEN_PREFIXES = ("model.vision_tower.",)
SHARED_ROW_PREFIXES = ("model.language_model.embed_tokens.", "lm_head.")


def _tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, tied ones under each of their names."""
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def _fill(model, source: dict[str, torch.Tensor], fresh) -> None:
    """Give every tensor of ``model`` (built on the meta device) its value: ``fresh(name, meta, src)``
    (``src = source.get(name)``) returns a new tensor, or None to take ``src`` as it is (shared
    storage, no copy). A parameter becomes a new `Parameter` (so ``.data`` and ``requires_grad``
    stay the model's own) marked ``shared_storage`` when its storage is ``source``'s
    (`specllava.training.memory` counts it there); tied tensors stay one `Parameter`."""
    made: dict[int, torch.Tensor] = {}
    missing = []
    for name, meta in _tensors(model).items():
        key = id(meta)
        if key not in made:
            src = source.get(name)
            new = fresh(name, meta, src)
            value = new if new is not None else src
            if value is not None and isinstance(meta, torch.nn.Parameter):
                value, shared = torch.nn.Parameter(value.detach(), requires_grad=value.is_floating_point()), value is src
                value.shared_storage = shared
            made[key] = value
        if made[key] is None:
            missing.append(name)
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        (module._parameters if leaf in module._parameters else module._buffers)[leaf] = made[key]
    if missing:
        raise RuntimeError(f"draft tensors left without a value: {missing[:3]}")


def draft_from_target(model, num_layers: int, trained_device: torch.device | str | None = None):
    """A model of ``model``'s class made of its first ``num_layers`` layers, with its embedding,
    tower, projector, final norm and head (for a target: the default draft, its early exit before
    any training; for a draft: one of its early exits), in eval mode.

    Built on the meta device and filled without copies: every tensor is ``model``'s own (shared
    storage). With ``trained_device`` (the draft to train), the tensors that train (layers, final
    norm, projector) are fresh float32 copies on that device, and the frozen ones (tower,
    embedding, head) stay shared when they are already there (else copied there, in their dtype).
    """
    depth = model.config.text_config.num_hidden_layers
    if not 1 <= num_layers <= depth:
        raise ValueError(f"the draft's depth must lie in 1..{depth} (the target's), got {num_layers}")
    config = copy.deepcopy(model.config)
    config.text_config.num_hidden_layers = num_layers
    if getattr(config.text_config, "layer_types", None):
        config.text_config.layer_types = config.text_config.layer_types[:num_layers]
    with torch.device("meta"):
        small = type(model)(config)
    device = None if trained_device is None else torch.device(trained_device)

    def fresh(name, meta, src):
        if device is None:
            return None
        if not name.startswith(FROZEN_PREFIXES + SHARED_ROW_PREFIXES) and src.is_floating_point():
            return torch.empty(src.shape, dtype=torch.float32, device=device).copy_(src)
        return None if _same_device(src.device, device) else src.to(device)

    _fill(small, _tensors(model), fresh)
    small.generation_config = copy.deepcopy(model.generation_config)
    return small.eval()


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def truncated(draft, num_layers: int):
    """The draft's first ``num_layers`` layers with its norm and head (an early exit as a model,
    sharing the draft's tensors)."""
    return draft_from_target(draft, num_layers)


def preset_config(target, name: str):
    """The config of a ``DRAFT_PRESETS`` draft for ``target``: the target's own config (vision
    tower, image layout, image token) with a Llama LM of the preset's shape that keeps the target's
    vocabulary, special tokens, context length and RoPE."""
    from transformers import LlamaConfig

    if name not in DRAFT_PRESETS:
        raise ValueError(f"unknown draft preset {name!r}; choose one of {', '.join(DRAFT_PRESETS)}")
    text = target.config.text_config
    keep = {k: getattr(text, k) for k in ("vocab_size", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
                                          "eos_token_id", "pad_token_id") if getattr(text, k, None) is not None}
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    lm = LlamaConfig(**DRAFT_PRESETS[name], **keep, tie_word_embeddings=False,
                     **({"rope_parameters": copy.deepcopy(rope)} if isinstance(rope, dict) and "rope_type" in rope else {}))
    config = copy.deepcopy(target.config)
    config.text_config = lm
    return config


def _fresh_draft(target, config, device: torch.device):
    """A new model of ``target``'s class for ``config``, built on the meta device: the target's
    vision tower when it has the same shapes (shared, frozen: no copy), every other tensor a new
    float32 one on ``device``, initialised as transformers initialises the class."""
    with torch.device("meta"):
        draft = type(target)(config)
    source = _tensors(target)
    ours = _tensors(draft)
    tower = [n for n in ours if n.startswith(FROZEN_PREFIXES)]
    share = all(n in source and source[n].shape == ours[n].shape for n in tower)

    def fresh(name, meta, src):
        if share and name.startswith(FROZEN_PREFIXES):
            return None if _same_device(src.device, device) else src.to(device)
        dtype = torch.float32 if meta.is_floating_point() else meta.dtype
        return torch.empty(meta.shape, dtype=dtype, device=device)

    _fill(draft, source, fresh)
    if share:  # transformers' initialisation skips modules flagged as initialised: keep the target's tower
        for module in draft.model.vision_tower.modules():
            module._is_hf_initialized = True
    draft.initialize_weights()
    draft.generation_config = copy.deepcopy(target.generation_config)
    return draft


def make_draft(target, cfg: DistillConfig, device: torch.device | str | None = None):
    """(draft, embeddings_frozen): from the target's first layers, a preset, a folder or a config,
    built on ``device`` (default: ``cfg.device``, else where the target reads its inputs) with its
    trained tensors in float32 and its frozen ones shared with the target where they can be (see
    `draft_from_target`, `_fresh_draft`). Embedding and head stay frozen when they are the
    target's (see `shares_vocabulary_rows`)."""
    from transformers import AutoModelForImageTextToText

    device = torch.device(device or cfg.device or input_device(target))
    if cfg.draft_preset is not None:
        return _fresh_draft(target, preset_config(target, cfg.draft_preset), device), False
    if cfg.draft_init is None:
        return draft_from_target(target, cfg.draft_layers, trained_device=device), True
    init = Path(cfg.draft_init)
    if init.is_dir():
        draft = AutoModelForImageTextToText.from_pretrained(init, dtype=torch.float32, device_map={"": str(device)})
    elif init.is_file() and init.suffix == ".safetensors":  # the shipped format (`save_draft`, `ship-default`)
        draft = _shipped_draft(target, init, device)
    elif init.is_file() and init.suffix == ".json":
        draft = _fresh_draft(target, type(target.config).from_json_file(str(init)), device)
    else:
        raise FileNotFoundError(f"--draft-init {init}: expected a LLaVA model folder, a draft.safetensors file "
                                "(the shipped format) or a config .json file")
    vt, vd = target.config.text_config.vocab_size, draft.config.text_config.vocab_size
    if vt != vd:
        raise ValueError(f"--draft-init {init} has a vocabulary of {vd} tokens, the target {vt}; they must share the tokenizer")
    if int(draft.config.image_seq_length) != int(target.config.image_seq_length):
        raise ValueError(f"--draft-init {init} expects {draft.config.image_seq_length} image tokens per image, "
                         f"the target's processor makes {target.config.image_seq_length}")
    return draft, shares_vocabulary_rows(draft, target)


def _shipped_draft(target, path: Path, device: torch.device):
    """A ``draft.safetensors`` in the shipped format (`specllava.models.shipped`) as a draft to train:
    the target's first ``num_layers`` layers (`draft_from_target`, trained tensors in float32 on
    ``device``), then the file's tensors. A file tensor for a tensor shared with the target
    (tower, vocabulary rows) replaces it by a copy of its own, so the target is never written."""
    from specllava.models.shipped import _copy_into, _read_safetensors

    tensors, meta = _read_safetensors(path)
    if "num_layers" not in meta:
        raise RuntimeError(f"{path} lacks the 'num_layers' metadata entry the draft's depth is read from")
    draft = draft_from_target(target, int(meta["num_layers"]), trained_device=device)
    shared = FROZEN_PREFIXES + SHARED_ROW_PREFIXES
    own = {n: p for n, p in draft.named_parameters(remove_duplicate=False)}
    for name in [n for n in tensors if n.startswith(shared)]:
        value = tensors.pop(name)
        if name not in own or tuple(own[name].shape) != tuple(value.shape):
            raise RuntimeError(f"{path}: {name!r} is not a parameter of the draft or has another shape")
        module_name, _, attr = name.rpartition(".")
        dtype = own[name].dtype if name.startswith(FROZEN_PREFIXES) else torch.float32
        setattr(draft.get_submodule(module_name), attr,
                torch.nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False))
    if draft.config.get_text_config().tie_word_embeddings:  # a tied head stays the (new) embedding
        draft.get_output_embeddings().weight = draft.get_input_embeddings().weight
    _copy_into(draft, tensors, path)
    if RANKING_ATTR in meta:
        setattr(draft.config, RANKING_ATTR, [int(t) for t in json.loads(meta[RANKING_ATTR])])
    return draft


def shares_vocabulary_rows(draft, target) -> bool:
    """True when the draft's input embedding and LM head equal the target's, at the lower of their
    two precisions (a draft made by `draft_from_target`, e.g. an earlier run's): they then stay frozen and shared, as in a
    fresh run, so `ship-default` can keep omitting them."""
    pairs = ((draft.get_input_embeddings(), target.get_input_embeddings()),
             (draft.get_output_embeddings(), target.get_output_embeddings()))

    def same(a, b):  # compared in the lower of the two precisions (a target loaded in bf16, a draft in fp32)
        low = a.dtype if a.element_size() < b.element_size() else b.dtype
        return torch.equal(a.to("cpu", low), b.to("cpu", low))

    with torch.no_grad():
        return all(a is not None and b is not None and a.weight.shape == b.weight.shape and same(a.weight, b.weight)
                   for a, b in pairs)


def trainable_parameters(draft, embeddings_frozen: bool) -> dict[str, torch.nn.Parameter]:
    frozen_prefixes = FROZEN_PREFIXES + (SHARED_ROW_PREFIXES if embeddings_frozen else ())
    params = {}
    for name, p in draft.named_parameters():
        p.requires_grad_(not name.startswith(frozen_prefixes))
        if p.requires_grad:
            params[name] = p
    return params


# ---------------------------------------------------------------------------------------------------
# Distillation


LOSSES = ("kl", "tvd", "mix")


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || q); both [P, vocab] logits (p = target, q = draft)."""
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def tvd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
             vocab: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of the total-variation distance 1/2 sum_x |p(x) - q(x)| = 1 - sum_x min(p(x), q(x)):
    one minus the probability that speculative sampling accepts a draft token drawn from q.

    ``vocab``: the ids the draft proposes from (a reduced draft vocabulary, `specllava.core.vocab`);
    q is then the draft's softmax renormalised over them and zero elsewhere, as the decoder samples it.
    """
    p = F.softmax(teacher_logits.float(), dim=-1)
    logits = student_logits.float()
    if vocab is None:
        return (1 - torch.minimum(p, F.softmax(logits, dim=-1)).sum(-1)).mean()
    vocab = vocab.to(logits.device)
    q = F.softmax(logits.index_select(-1, vocab), dim=-1)
    return (1 - torch.minimum(p.index_select(-1, vocab), q).sum(-1)).mean()


def distill_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, loss: str = "kl", mix: float = 0.5,
                 vocab: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """(the objective, {"kl", "tvd"}): ``loss`` "kl" = KL(p || q) over the full vocabulary, "tvd" =
    `tvd_loss` (over ``vocab`` when given), "mix" = (1 - mix) * KL + mix * TVD. Both terms are
    returned as floats for the history (1 - tvd is the mean acceptance probability of one draft token)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    kl = kl_loss(teacher_logits, student_logits)
    tvd = tvd_loss(teacher_logits, student_logits, vocab)
    value = {"kl": kl, "tvd": tvd, "mix": (1 - mix) * kl + mix * tvd}[loss]
    return value, {"kl": kl.item(), "tvd": tvd.item()}


def autocast_dtype(target) -> torch.dtype | None:
    """The dtype the draft computes in under autocast: the target's when it is a 16-bit one, else
    None (float32 throughout)."""
    dtype = next(target.parameters()).dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def distill_step(teacher, draft, batch, exits: list[int], bf16: bool = False,
                 autocast: torch.dtype | None = None, loss: str = "kl", mix: float = 0.5,
                 vocab: torch.Tensor | None = None, record: dict | None = None) -> torch.Tensor:
    """Mean over the draft's exits of the `distill_loss` (default KL(target || draft exit)) at the
    batch's assistant tokens; ``record``, when given, receives the mean "kl" and "tvd" over the exits.

    The teacher reads the batch on its own device in its own dtype; the draft on its device under
    autocast to ``autocast`` (``bf16=True``: bfloat16; neither: float32).
    """
    dtype = autocast or (torch.bfloat16 if bf16 else None)
    device = input_device(draft)
    with torch.no_grad():
        ids, att, feats, pos, _ = to_device(batch, input_device(teacher))
        p_logits = answer_logits(teacher, ids, feats, att, pos).to(device)  # [P, vocab]
    ids, att, feats, pos, _ = to_device(batch, device)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        q_logits = answer_logits(draft, ids, feats, att, pos, exits=exits)  # list of [P, vocab]
    parts = [distill_loss(p_logits, q, loss, mix, vocab) for q in q_logits]
    if record is not None:
        record.update({k: sum(r[k] for _, r in parts) / len(parts) for k in ("kl", "tvd")})
    return sum(v for v, _ in parts) / len(parts)


# ---------------------------------------------------------------------------------------------------
# Mean accepted length


@torch.no_grad()
def measure_acceptance(target, draft, processor, records: list[dict], image_root: Path, n: int,
                       max_new_tokens: int, desc: str = "eval", **decoder_options) -> dict:
    """Dynamic-tree speculative decoding at T=0 on the first question of ``n`` records.

    decoder_options: passed to `SpeculativeDecoder` (tree options, draft_vocab, draft_quant);
    the defaults are what `specllava generate` runs on a custom pair at T=0 (a draft with a token
    ranking, as `train-draft` saves it, proposes from its ranked vocabulary; the result's
    ``draft_vocab`` says how many ids, None for the full vocabulary).

    tau = total emitted tokens / total target forwards (prefill included, as `SpeculativeDecoder`
    counts it); also the per-forward costs measured inside the loop.
    """
    from PIL import Image

    from specllava import SpeculativeDecoder

    decoder = SpeculativeDecoder(target, draft, method="dynamic", **decoder_options)
    tok = processor.tokenizer
    totals = {"new_tokens": 0, "target_forwards": 0, "draft_forwards": 0, "steps": 0, "prompts": 0,
              "time_draft_s": 0.0, "time_verify_s": 0.0, "time_decode_s": 0.0}
    hist: list[int] = []
    for rec in tqdm(records[:n], desc=desc, mininterval=15):
        img = Image.open(image_root / rec["image"]).convert("RGB")
        enc = model_inputs(target, encode_prompts(processor, [img], [prompt_text(tok, rec["conversations"][:1])]))
        images = {k: enc[k] for k in ("pixel_values", "image_sizes") if k in enc}  # image_sizes: LLaVA-NeXT
        out = decoder.generate(input_ids=enc["input_ids"], **images, max_new_tokens=max_new_tokens)
        st = out.stats
        for key in totals:
            totals[key] += 1 if key == "prompts" else st.get(key, 0)
        hist += [0] * (len(st["accept_hist"]) - len(hist))
        for k, c in enumerate(st["accept_hist"]):
            hist[k] += c
    tau = totals["new_tokens"] / max(totals["target_forwards"], 1)
    steps = max(totals["steps"], 1)
    draft_fwd = max(totals["draft_forwards"] - totals["prompts"], 1)  # minus each prompt's prefill
    vocab = decoder.draft_vocab
    return {"mean_accepted": tau, **totals, "accept_hist": hist,
            "draft_vocab": None if vocab is None else int(vocab.numel()),  # None: the full vocabulary
            "ms_per_verify": 1000 * totals["time_verify_s"] / steps,
            "ms_per_draft_forward": 1000 * totals["time_draft_s"] / draft_fwd,
            "draft_forwards_per_step": draft_fwd / steps,
            "ms_per_step": 1000 * (totals["time_draft_s"] + totals["time_verify_s"]) / steps}


@torch.no_grad()
def forward_cost_ms(model, prefix_len: int = 200, new: int = 1, repeats: int = 10) -> float:
    """Median ms of one cached forward of ``new`` tokens after a ``prefix_len``-token text prefix."""
    from transformers import DynamicCache

    lm = model.model.language_model
    vocab = model.config.text_config.vocab_size
    device = input_device(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # CUDA runs asynchronously
    ids = torch.randint(0, vocab, (1, prefix_len)).to(device)
    times = []
    for _ in range(repeats):
        cache = DynamicCache()
        lm(input_ids=ids, cache=cache, use_cache=True)
        step = torch.randint(0, vocab, (1, new)).to(device)
        sync()
        t = time.perf_counter()
        h = lm(input_ids=step, cache=cache, use_cache=True).last_hidden_state
        model.lm_head(h)
        sync()
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------------------
# The whole command


def _read_data(cfg, log):
    """(training records, image root, {eval name: (records, root)}) as read from ``cfg.data`` and
    ``cfg.eval_data``, before any model loads: a file that is not LLaVA JSON, or one with nothing to
    train on, fails at once. The records stay on disk (`Records`); eval sets keep the records that
    have an image (the report decodes image prompts)."""
    records, root = load_records(cfg.data)
    root = Path(cfg.image_folder) if cfg.image_folder is not None else root
    records = with_images(records, root, log)
    if cfg.eval_data:
        train_recs, held = records, None
        evals = {}
        for p in cfg.eval_data:
            recs, eroot = load_records(p)
            evals[Path(p).stem] = (image_records(with_images(recs, eroot, log)), eroot)
    else:
        train_recs, held = split_held_out(records, cfg.held_out_fraction, cfg.seed)
        if not held:
            held = train_recs[-1:]
            train_recs = train_recs[:-1] or held
        evals = {"held_out": (image_records(held), root)}
    if cfg.limit is not None and len(train_recs) > cfg.limit:
        train_recs = sample_records(train_recs, cfg.limit, cfg.seed)
    if not (cfg.regenerate or cfg.sampled_answers or cfg.on_policy or len(answered_records(train_recs))):
        raise ValueError(f"no answered records in {cfg.data}; pass --regenerate to answer them with the target "
                         "(or train on --sampled-answers / --on-policy answers only)")
    return train_recs, root, evals


def _prepare_data(cfg, data, target, processor, log, procs: Processes | None = None):
    """(answered training records, sampled answers, prompts, image root, {eval name: (records,
    root)}) from `_read_data`'s ``data`` and the target's answers. With several processes the main
    one writes the answers (``--regenerate``, ``--sampled-answers``) while the others wait, then
    all read them."""
    procs = procs or Processes()
    train_recs, root, evals = data
    if not procs.main:
        procs.barrier()  # the main process writes the answers first
    sampled = sampled_answers(target, processor, train_recs, root, Path(cfg.out), cfg.sampled_answers, cfg.seed,
                              cfg.regenerate_max_new_tokens, cfg.regenerate_batch, log)
    prompts = train_recs
    if cfg.regenerate:
        train_recs = regenerate_answers(target, processor, train_recs, root, Path(cfg.out) / "answers.jsonl",
                                        cfg.regenerate_max_new_tokens, cfg.regenerate_batch, log)
    if procs.main:
        procs.barrier()
    answered = answered_records(train_recs)
    if len(answered) < len(train_recs):
        log(f"{len(train_recs) - len(answered)} records end with an unanswered question and are skipped "
            "(use --regenerate to answer them with the target)")
    if not len(answered) and not len(sampled) and not cfg.on_policy:
        raise ValueError(f"no answered records in {cfg.data}; pass --regenerate to answer them with the target "
                         "(or train on --sampled-answers / --on-policy answers only)")
    text_only = sum(record_image(answered, i) is None for i in range(len(answered)))
    if text_only:
        log(f"{text_only} of {len(answered)} training records are text-only (trained without an image)")
    return answered, sampled, prompts, root, evals


def train_draft(cfg: DistillConfig, log=print) -> dict:
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    procs = Processes.start(cfg.device)
    if procs.count > 1:
        if cfg.device_map is not None:
            raise ValueError("--device-map shards one target over the GPUs; with several processes each loads a "
                             "whole target on its own device: drop --device-map or run one process")
        if cfg.on_policy:
            raise ValueError("--on-policy regenerates the draft's answers during training in one process; "
                             "run it without accelerate launch")
        cfg = dataclasses.replace(cfg, device=str(procs.device))
        log = log if procs.main else (lambda *a, **k: None)
    out = start_run(cfg, Path(cfg.out), write=procs.main)
    data = _read_data(cfg, log)  # before the target loads: bad data fails at once
    target, processor = load_target(cfg)
    records, sampled, prompts, root, evals = _prepare_data(cfg, data, target, processor, log, procs)

    draft, embeddings_frozen = make_draft(target, cfg)
    n_layers = draft.config.text_config.num_hidden_layers
    exits = sorted({*(cfg.exits or []), n_layers})
    if exits[0] < 1 or exits[-1] > n_layers:
        raise ValueError(f"--exits must lie in 1..{n_layers} (the draft's depth), got {cfg.exits}")
    params = trainable_parameters(draft, embeddings_frozen)
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=0.0)
    amp = autocast_dtype(target)

    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n_image = image_tokens(target, processor)
    examples = Examples([(records, root), (sampled, root)], tok, n_image)  # tokenized batch by batch
    # the token ranking: the greedy answers' (not the sampled ones'), else the initial draft's own
    ranked = Examples([(ranking_sample(records, cfg.seed), root)], tok, n_image)
    ranking = answer_token_ranking(ranked) or draft_ranking(draft)
    vocab = loss_vocab_ids(cfg, ranking, draft.config.text_config.vocab_size)
    cache = FeatureCache(target, processor, out / "features", int(cfg.feature_cache_gb * 1e9 / procs.count))
    on_policy = OnPolicyPool(cfg, draft, processor, prompts, root, tok, n_image, out / "on_policy", amp, log)
    base = Examples([(records, root), (sampled, root)], tok, n_image)  # the on-policy pool's fallback
    if cfg.on_policy:
        start = _load_trained(out, params) if cfg.resume else 0  # the pool of a resumed run: its draft's
        examples.set_tail(on_policy.examples(start // cfg.on_policy_every, fallback=base))
    log(f"draft: {n_layers} layers, exits {exits}, {sum(p.numel() for p in params.values())} trainable params; "
        f"{len(examples)} training examples ({len(sampled)} sampled answers"
        + (f", {cfg.on_policy} on-policy" if cfg.on_policy else "") + "), "
        + f"about {int(examples.lengths.sum())} tokens; loss {cfg.loss}"
        + (f" ({cfg.loss_mix:g} TVD)" if cfg.loss == "mix" else "")
        + (f", TVD over {len(vocab)} ranked ids" if vocab is not None and cfg.loss != "kl" else "")
        + f"; target {next(target.parameters()).dtype} on {input_device(target)}, draft on {input_device(draft)}"
        + (f" under {amp} autocast" if amp else "")
        + (f"; {procs.count} data-parallel processes" if procs.count > 1 else ""))

    def loss_fn(batch):
        record = {}
        data = collate(batch, cache, pad_id)
        loss = distill_step(target, draft, data, exits, autocast=amp, loss=cfg.loss,
                            mix=cfg.loss_mix, vocab=vocab, record=record)
        return loss, {"loss": loss.item(), **record}, len(data[4])  # a mean over the batch's answer tokens

    def refresh(step, history):  # the current draft answers a new choice of prompts
        if cfg.on_policy and step % cfg.on_policy_every == 0 and step < cfg.steps:
            examples.set_tail(on_policy.examples(step // cfg.on_policy_every, fallback=base))

    draft.train()
    run = train_loop(examples, params, opt, loss_fn, out, steps=cfg.steps, batch_size=cfg.batch_size,
                     warmup=cfg.warmup, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
                     max_minutes=cfg.max_minutes, resume=cfg.resume, desc="distil draft", postfix="loss", log=log,
                     after_step=refresh if cfg.on_policy else None,
                     grad_scaler=torch.amp.GradScaler(input_device(draft).type) if amp == torch.float16 else None,
                     lengths=lambda: examples.lengths, processes=procs)
    draft.eval()
    if not procs.main:  # the main process saves and reports while the others wait for it
        procs.finish()
        return {}
    save_draft(draft, processor, out, embeddings_frozen, token_ranking=ranking, shipped=cfg.draft_preset is None)
    objective = {"kl": "KL(target || draft)", "tvd": "TVD(target, draft)",
                 "mix": f"{1 - cfg.loss_mix:g} KL + {cfg.loss_mix:g} TVD"}[cfg.loss]
    plot_losses(run.history, out / "loss.png", f"draft distillation ({objective}), mean over exits {exits}",
                {"kl": "KL", "tvd": "TVD = 1 - sum min(p, q)"})

    # The report: shipped weights are bf16, so measure the draft as it will be loaded (in the target's dtype).
    shipped = round_as_shipped(draft, embeddings_frozen, next(target.parameters()).dtype)
    report = {"steps": run.steps, "stopped_by": run.stopped_by, "train_minutes": run.minutes, "exits": exits,
              "cost_ms": {"target_1_token": forward_cost_ms(target)}, "eval": {}}
    for depth in exits:
        d = shipped if depth == n_layers else truncated(shipped, depth)
        report["cost_ms"][f"draft_{depth}_layers_1_token"] = forward_cost_ms(d)
        for name, (recs, eroot) in evals.items() if cfg.eval_prompts else ():  # 0 prompts: no report
            r = measure_acceptance(target, d, processor, recs, eroot, cfg.eval_prompts, cfg.eval_max_new_tokens,
                                   desc=f"eval {name} ({depth} layers)")
            report["eval"][f"{name}/{depth}_layers"] = r
            log(f"{name}, {depth}-layer draft: mean accepted length {r['mean_accepted']:.2f} over {r['prompts']} prompts "
                f"({r['new_tokens']} tokens), {r['ms_per_step']:.0f} ms/step")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log(f"report written to {out / 'report.json'}")
    procs.finish()
    return report


def ranking_sample(records, seed: int, cap: int = 20000):
    """The records whose answers give the draft's token ranking: all of them, or a seeded choice of
    ``cap`` (token frequencies settle long before 665K records; tokenizing them all would not)."""
    return records if len(records) <= cap else sample_records(records, cap, seed)


def loss_vocab_ids(cfg: DistillConfig, ranking: list[int] | None, size: int) -> torch.Tensor | None:
    """The ids the TVD term compares over (``cfg.loss_vocab``, see `DistillConfig`); None = all."""
    if cfg.loss == "kl" or cfg.loss_vocab == 0:
        return None
    if cfg.loss_vocab is None:
        return draft_vocab_ids(ranked_vocab_size(len(ranking), 1.0, size), size, ranking) if ranking else None
    return draft_vocab_ids(min(cfg.loss_vocab, size), size, ranking)


def _load_trained(out: Path, params: dict) -> int:
    """The step of ``<out>/checkpoint.pt`` (0 without one), its trained tensors copied into ``params``."""
    path = Path(out) / "checkpoint.pt"
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=False, mmap=True)
    with torch.no_grad():
        for name, p in params.items():
            if name in state["tensors"]:
                p.copy_(state["tensors"][name])
    return int(state["step"])


class OnPolicyPool:
    """DistillSpec's on-policy data: ``cfg.on_policy`` answers the draft samples at T=1 to a seeded
    choice of the training prompts, one set per refresh ``r`` (cached in ``<folder>/<r>.jsonl``, so a
    resumed run reads what the interrupted one generated), encoded as training examples."""

    def __init__(self, cfg, draft, processor, prompts, root, tok, n_image, folder: Path, amp, log):
        self.cfg, self.draft, self.processor, self.prompts, self.root = cfg, draft, processor, prompts, root
        self.tok, self.n_image, self.folder, self.amp, self.log = tok, n_image, Path(folder), amp, log

    def examples(self, r: int, fallback: list) -> list:
        """Exactly ``cfg.on_policy`` examples of refresh ``r`` (cycled when some answers came out empty)."""
        n = self.cfg.on_policy
        pick = random.Random(self.cfg.seed * 1000 + r + 7).sample(self.prompts, min(n, len(self.prompts)))
        pick = [first_question(p) for p in pick]
        self.folder.mkdir(parents=True, exist_ok=True)
        # generation in the target's 16-bit dtype when it has one: a copy cast once, not per token by autocast
        model = copy.deepcopy(self.draft).to(self.amp) if self.amp else self.draft
        was_training = self.draft.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed * 1000 + r)
                answered = regenerate_answers(model, self.processor, pick, self.root, self.folder / f"{r:05d}.jsonl",
                                              self.cfg.regenerate_max_new_tokens, self.cfg.regenerate_batch,
                                              self.log, do_sample=True)
        finally:
            self.draft.train(was_training)
        pool = [encode_record(rec, self.tok, self.n_image, self.root, i) for i, rec in enumerate(answered)] or fallback
        return [pool[i % len(pool)] for i in range(n)]


def answer_token_ranking(examples) -> list[int]:
    """Ids of the assistant tokens the draft was trained on, most frequent first: its token ranking."""
    return rank_tokens(t for e in examples for t, m in zip(e.input_ids, e.loss_mask) if m)


@torch.no_grad()
def round_as_shipped(draft, embeddings_frozen: bool, dtype: torch.dtype):
    """The draft, in place, as a user loads it: its trained tensors rounded to bf16 (as
    `draft.safetensors` stores them), everything in ``dtype`` (the target's); no copy of the model."""
    names = shipped_tensor_names(draft, embeddings_frozen)
    for name, p in draft.named_parameters():
        if name in names:
            p.data = p.data.to(torch.bfloat16).to(dtype)
        elif p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)  # a frozen tensor the draft owns (one shared with the target is in `dtype`)
    return draft.eval()


def shipped_tensor_names(draft, embeddings_frozen: bool) -> set[str]:
    skip = FROZEN_PREFIXES + (SHARED_ROW_PREFIXES if embeddings_frozen else ())
    return {n for n in draft.state_dict() if not n.startswith(skip)}


def save_draft(draft, processor, out: Path, embeddings_frozen: bool, num_layers: int | None = None,
               token_ranking: list[int] | None = None, shipped: bool = True) -> Path:
    """Write ``<out>/draft/`` (a full model folder) and, with ``shipped``, ``<out>/draft.safetensors``
    (the shipped format, which rebuilds the draft from the target's first layers: only for drafts
    shaped like the target; a preset draft is its ``draft/`` folder). Returns the file or the folder.

    ``num_layers`` < the draft's depth exports that early exit instead. ``token_ranking`` (the ids
    of the training answers, most frequent first; default: the draft's own, if it has one) goes
    into both: ``config.token_ranking`` and the file's ``token_ranking`` metadata.
    """
    from safetensors.torch import save_file

    if num_layers is not None and num_layers != draft.config.text_config.num_hidden_layers:
        draft = truncated(draft, num_layers)
    token_ranking = token_ranking or draft_ranking(draft)
    if token_ranking:
        setattr(draft.config, RANKING_ATTR, list(token_ranking))
    model_dir = out / "draft"
    draft.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    if not shipped:
        return model_dir
    names = shipped_tensor_names(draft, embeddings_frozen)
    state = draft.state_dict()
    tensors = {n: state[n].detach().to("cpu", torch.bfloat16).contiguous() for n in sorted(names)}
    path = out / "draft.safetensors"
    meta = {"num_layers": str(draft.config.text_config.num_hidden_layers)}
    if token_ranking:
        meta[RANKING_ATTR] = json.dumps([int(t) for t in token_ranking])
    save_file(tensors, str(path), metadata=meta)
    return path
