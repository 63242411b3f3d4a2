"""The kind of draft behind one interface, chosen once per decoder: `choose_strategy`.

A strategy starts a request's `Drafter` after the target's prefill (`DraftStrategy.start`); from
then on every drafter is driven the same way (`draft`, then `commit` after verification), so the
decoding loop never asks which kind of draft it has.

| strategy | drafts with | prefill |
|---|---|---|
| `NoDraft` | nothing: "ar" verifies the root alone | none |
| `DraftModel` | a draft LM or VLM (`Drafter`) | its own prompt forward (the image too, reusing the target's vision features when the towers match) |
| `EagleHeadDraft` | an EAGLE head on the target's features (`EagleDrafter`) | none: it reads the target's prefill features at its first step |
"""

from __future__ import annotations

import torch

from .config import TreeConfig
from .drafting import Drafter
from .eagle import EagleDrafter
from .model_info import image_token_id, input_device, is_vlm
from .runner import ModelRunner
from .sampling import SamplingParams
from .vision import draft_image_inputs


class DraftStrategy:
    """keep_target_hidden: the target's runner keeps its final hidden states (the EAGLE head reads
    them). wants_vision: the target's prefill records its selected vision features for the draft
    (`core.vision`). batched: its drafters' forwards can run as one batched forward
    (`core.batch`); otherwise each sequence drafts on its own."""

    keep_target_hidden = False
    wants_vision = False
    batched = True

    def start(self, *, target: ModelRunner, input_ids: torch.Tensor, pixel_values, params: SamplingParams,
              generator: torch.Generator, backend, vision: torch.Tensor | None, model_inputs: dict) -> Drafter | None:
        """The request's drafter, after the target's prefill (None: plain decoding)."""
        return None


class NoDraft(DraftStrategy):
    """method "ar": the tree is the root alone."""


class DraftModel(DraftStrategy):
    """A draft model with its own KV cache, prefilled on the prompt (and image)."""

    def __init__(self, target_model, draft, method: str, config: TreeConfig, shares_vision: bool):
        self.target_model, self.draft, self.method, self.config = target_model, draft, method, config
        self.wants_vision = shares_vision

    def start(self, *, target, input_ids, pixel_values, params, generator, backend, vision, model_inputs):
        runner = ModelRunner(self.draft, backend)
        extra = {k: v.to(runner.device) if torch.is_tensor(v) else v for k, v in model_inputs.items()}
        if is_vlm(self.draft) and vision is not None:
            image = draft_image_inputs(self.draft, vision, extra.pop("image_sizes", None))
            runner.prefill(input_ids.to(runner.device), mm_encoder_outputs=image, **extra)
        elif is_vlm(self.draft) and pixel_values is not None:
            runner.prefill(input_ids.to(runner.device), pixel_values=pixel_values.to(runner.device, self.draft.dtype),
                           **extra)
        elif is_vlm(self.draft):  # a text-only prompt: the VLM draft reads it as its language model would
            runner.prefill(input_ids.to(runner.device))
        else:
            ids = input_ids
            img = image_token_id(self.target_model) if is_vlm(self.target_model) else None
            if img is not None:  # a text-only draft reads the prompt without the image tokens
                ids = ids[:, ids[0] != img]
            runner.prefill(ids.to(runner.device))
        # The draft cache now holds the whole prompt; the first step feeds it the root.
        if not params.do_sample:
            return Drafter(runner, self.method, self.config)
        # sampling: the dynamic tree draws its candidates from q with the request's generator
        return Drafter(runner, self.method, self.config, temperature=params.temperature,
                       generator=self._generator(generator))

    def _generator(self, gen: torch.Generator) -> torch.Generator:
        """The request's generator for the draft's draws: `gen` itself for a draft on the CPU, else
        a generator on the draft's device seeded from `gen` (one CPU draw)."""
        device = input_device(self.draft)
        if device.type == "cpu":
            return gen
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        return torch.Generator(device=device).manual_seed(seed)


class EagleHeadDraft(DraftStrategy):
    """An EAGLE head: reads the prompt with the target's prefill features at its first draft().
    Its steps run per sequence (the head's features follow each sequence's own verification)."""

    keep_target_hidden = True
    batched = False

    def __init__(self, head, method: str, config: TreeConfig):
        self.head, self.method, self.config = head, method, config

    def start(self, *, target, input_ids, pixel_values, params, generator, backend, vision, model_inputs):
        runner = ModelRunner(self.head, backend, keep_hidden=True)
        runner.start()
        sampled = dict(temperature=params.temperature, generator=generator) if params.do_sample else {}
        return EagleDrafter(runner, target, self.method, self.config, input_ids[0].tolist(), target.hidden, **sampled)


def choose_strategy(method: str, target, draft, config: TreeConfig, eagle: bool, shares_vision: bool) -> DraftStrategy:
    if method == "ar" or draft is None:
        return NoDraft()
    if eagle:
        return EagleHeadDraft(draft, method, config)
    return DraftModel(target, draft, method, config, shares_vision)
