"""How each model runs its decode steps: one interface (`Backend`), four implementations, chosen
once per decoder.

A backend runs a model on tokens, positions and a tree mask on top of its cache and returns logits
(and the final hidden states when asked): `Backend.forward`. `core.runner.ModelRunner` owns the
cache and the prefill (always through the model itself) and hands every decode step to its backend.

| backend | runs | for |
|---|---|---|
| `TransformersBackend` (`hf`) | the model's own forward | any model; the reference |
| `LeanBackend` (`lean`), exact | transformers' Llama ops, bit for bit, on a `KVBuffer` | the target (default, checked per model) |
| `LeanBackend` (`lean`), fast | fused layers, int8 or the model's dtype, reduced vocabulary | a Llama-style draft |
| `DecoderBackend` (`hf`) | transformers' text decoder (or an int8 copy), reduced head | any other draft |
| `HeadBackend` (`eagle`) | an EAGLE head reading the target's features | an `EagleHead` draft |

The Llama layer pieces they share (RMSNorm, rotary, causal mask, fused layer) are in `llama`.
What the backends build is cached per model (`core.checks.CHECKS`), so building many decoders on
the same models repeats no check and no int8 quantization.
"""

from __future__ import annotations

import torch

from ..checks import CHECKS
from ..model_info import input_device
from .base import Backend, Step
from .eagle import HeadBackend
from .hf import DecoderBackend, TransformersBackend
from .lean import LeanBackend, LeanDecoder, exact_backend, matches_transformers, unsupported_exact

__all__ = ["Backend", "DecoderBackend", "HeadBackend", "LeanBackend", "LeanDecoder", "Step", "TransformersBackend",
           "draft_backend", "exact_backend", "head_backend", "matches_transformers", "target_backend",
           "unsupported_exact"]


def target_backend(model, lean: bool = True) -> Backend:
    """The target's backend: the exact lean one when it covers `model` and matches transformers'
    logits on it (checked once per model, until its weights change), else transformers' forward."""
    exact = CHECKS.get(model, "exact_backend", lambda: exact_backend(model)) if lean else None
    return exact if exact is not None else TransformersBackend(model)


def draft_backend(model, vocab_ids: torch.Tensor | None = None, quant: str | None = None, lean: bool = True) -> Backend:
    """A draft model's backend. With neither a reduced vocabulary nor int8, its own forward. Else
    logits = head(decoder(...)) over the `vocab_ids` rows (int8 with quant="int8"): the decoder on
    the lean path for a Llama-style draft (lean=True), else transformers' text decoder. Built once
    per draft, vocabulary and mode (int8 quantization takes seconds) and shared by every decoder
    on this draft. A draft whose logits are not lm_head(decoder(...)) raises ValueError."""
    if quant not in (None, "int8"):
        raise ValueError(f"unknown quant {quant!r}")
    if quant is None and vocab_ids is None:
        return TransformersBackend(model)
    key = ("draft_backend", quant, lean, _ids_key(vocab_ids))
    return CHECKS.get(model, key, lambda: _reduced_draft(model, vocab_ids, quant, lean))


def _reduced_draft(model, vocab_ids, quant, lean) -> Backend:
    _check_plain_head(model)
    weight = model.get_output_embeddings().weight
    vocab_ids = None if vocab_ids is None else vocab_ids.to(weight.device)
    # contiguous copy of the rows, made once rather than gathered every forward
    rows = (weight if vocab_ids is None else weight.index_select(0, vocab_ids)).detach()
    if quant == "int8":
        from ..quant import Int8Linear

        head = Int8Linear(rows)
    else:
        head = lambda hidden: torch.nn.functional.linear(hidden, rows)  # noqa: E731
    # one lean decoder per draft and quant, whatever the head's vocabulary
    decoder = CHECKS.get(model, ("lean", quant), lambda: LeanDecoder.build(model, quant)) if lean else None
    if decoder is None:
        return DecoderBackend(model, head, vocab_ids, quant)
    return LeanBackend(decoder, head, input_device(model), vocab_ids, quant)


def head_backend(head, target, vocab_ids: torch.Tensor | None = None, quant: str | None = None) -> HeadBackend:
    """An EAGLE head's backend for `target` (its rows of the target's LM head: `vocab_ids`), built
    once per head, target, vocabulary and mode (until either's weights change)."""
    key = ("head_backend", id(head), quant, _ids_key(vocab_ids))
    return CHECKS.get(target, key, lambda: HeadBackend(head, target, vocab_ids, quant), head)


def _ids_key(vocab_ids: torch.Tensor | None):
    return None if vocab_ids is None else hash(vocab_ids.cpu().numpy().tobytes())


def _check_plain_head(model) -> None:
    text = model.config.get_text_config()
    head = model.get_output_embeddings()
    if (getattr(text, "final_logit_softcapping", None) or head is None
            or getattr(head, "bias", None) is not None or not hasattr(model, "get_decoder")):
        raise ValueError(
            f"a reduced or quantized draft needs logits = lm_head(decoder(...)) without bias or "
            f"softcapping; {type(model).__name__} does not have that form (drop draft_vocab and "
            "use draft_quant='none')"
        )
