"""Checks of what a caller passes to `SpeculativeDecoder`: the models, the prompt and image
tensors, the sampling arguments; each refusal names what was wrong and what to do.

`check_inputs` covers one request (batch size 1); `split_rows` turns a padded batch into one
request per row first.
"""

from __future__ import annotations

import numbers
import operator
import warnings

import torch

from .model_info import image_token_id, is_vlm


def check_model(model, role: str) -> None:
    """A loaded model (or EAGLE head) with real weights, or a clear error."""
    if model is None or not isinstance(model, torch.nn.Module):
        raise ValueError(f"{role} must be a loaded model (a torch.nn.Module such as transformers' "
                         f"...ForConditionalGeneration), got {type(model).__name__}")
    if role == "target" and not hasattr(model, "generate"):
        raise ValueError(f"the target must be a generative Hugging Face model with generate(), got {type(model).__name__}")
    # accelerate's offload keeps weights on the meta device until its hooks load them (hf_device_map)
    if not getattr(model, "hf_device_map", None) and any(p.is_meta for p in model.parameters()):
        raise ValueError(f"the {role}'s weights are on the meta device (not loaded): load it with real weights, "
                         "e.g. from_pretrained() without device_map='meta', or move it with .to_empty() and load them")


def check_sampling(**values) -> None:
    """Types of the sampling arguments (their ranges: `SamplingParams`); seed None or an integer
    (any: `sampling.mix_seed` mixes it whole)."""
    for name, value in values.items():
        integral = name in ("top_k", "seed")
        kind = numbers.Integral if integral else numbers.Real
        if (value is None and name == "seed") or (isinstance(value, kind) and not isinstance(value, bool)):
            continue
        raise ValueError(f"{name} must be {'an integer' if integral else 'a number'}"
                         f"{' or None' if name == 'seed' else ''}, got {value!r}")


def check_max_new_tokens(max_new_tokens) -> int:
    try:  # ints, numpy ints and 0-d integer tensors; not floats, strings or bools
        if isinstance(max_new_tokens, bool):
            raise TypeError
        max_new_tokens = operator.index(max_new_tokens)
    except TypeError:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}") from None
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return max_new_tokens


def check_input_ids(target, input_ids) -> None:
    """A 2-D integer tensor of in-range token ids (any batch size)."""
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a LongTensor of shape [1, prompt_len] (a batch: [batch, prompt_len])")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids (a LongTensor), got dtype {input_ids.dtype}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids has batch size 0")
    if input_ids.shape[1] == 0:
        raise ValueError("empty prompt: input_ids has no tokens")
    if input_ids.is_meta:
        raise ValueError("input_ids is on the meta device (it holds no token ids); pass a real tensor")
    n_embed = target.get_input_embeddings().num_embeddings
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= n_embed:
        raise ValueError(f"input_ids out of range: token ids must be in [0, {n_embed}) for this target, got "
                         f"{lo if lo < 0 else hi}; tokenize with the target's own tokenizer")


def check_inputs(target, input_ids, pixel_values, attention_mask, max_new_tokens) -> int:
    """Refuse what the target cannot decode for one request, naming it; returns max_new_tokens,
    capped (with a warning) so that prompt + new tokens fit the target's context. A prompt that
    alone fills the context is an error: the target has no position left to predict from."""
    check_input_ids(target, input_ids)
    if input_ids.shape[0] != 1:
        raise ValueError(f"batch size {input_ids.shape[0]}: one request takes input_ids of batch size 1")
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    if attention_mask is not None and (not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape):
        shape = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {shape}")
    if attention_mask is not None and attention_mask.is_meta:
        raise ValueError("attention_mask is on the meta device (it holds no values); pass a real tensor")
    if attention_mask is not None and not bool((attention_mask == 1).all()):
        raise ValueError("attention_mask with padding (zeros) for one request; pass the unpadded prompt")
    if pixel_values is not None:
        if not torch.is_tensor(pixel_values) or not pixel_values.is_floating_point() or pixel_values.dim() not in (4, 5):
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a float tensor [1, channels, height, width] (the processor's "
                             f"output; add the batch dimension with pixel_values[None]), got {shape}")
        # one request (input_ids [1, n]) with several images: pixel_values holds one row per image,
        # as the processor returns them (LLaVA-NeXT [images, patches, C, H, W], LLaVA [images, C, H, W])
        if pixel_values.is_meta:
            raise ValueError("pixel_values is on the meta device (it holds no values); pass the processor's pixel_values")
        if not bool(torch.isfinite(pixel_values).all()):  # the vision tower would turn them into NaN logits
            raise ValueError("pixel_values holds NaN or infinite values; pass the processor's output for a real image")
    context = context_length(target)
    if context is not None:
        prompt = input_ids.shape[1]
        if prompt >= context:
            raise ValueError(f"the prompt has {prompt} tokens, but the target's context holds {context} "
                             "(max_position_embeddings): shorten the prompt")
        if prompt + max_new_tokens > context:
            warnings.warn(f"max_new_tokens={max_new_tokens} with a {prompt}-token prompt runs past the target's "
                          f"context of {context} tokens; generating at most {context - prompt}", stacklevel=4)
            max_new_tokens = context - prompt
    if not is_vlm(target):
        if pixel_values is not None:
            raise ValueError("pixel_values given, but the target is a text-only model; drop the image or use a vision-language target")
        return max_new_tokens
    n_img = int((input_ids == image_token_id(target)).sum())
    if n_img and pixel_values is None:
        raise ValueError(f"the prompt has {n_img} image tokens but no pixel_values were given; pass the processor's pixel_values")
    if pixel_values is not None and not n_img:
        raise ValueError("pixel_values given, but the prompt has no image tokens; build the prompt with the processor so <image> is expanded")
    return max_new_tokens


def context_length(model) -> int | None:
    """The target's context in tokens: max_position_embeddings of its (text) config, if it says."""
    for cfg in (model.config, model.config.get_text_config()):
        n = getattr(cfg, "max_position_embeddings", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def eos_set(model, eos_token_id) -> set[int]:
    """The EOS ids: those given (an int, a list of ints or an integer tensor), else the model's
    generation config's."""
    given = eos_token_id is not None
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    if eos_token_id is None:
        return set()
    ids = eos_token_id.flatten().tolist() if torch.is_tensor(eos_token_id) and not eos_token_id.is_meta else (
        [eos_token_id] if not isinstance(eos_token_id, (list, tuple, set)) else list(eos_token_id))
    if not all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in ids):
        where = "eos_token_id" if given else "the target's generation_config.eos_token_id"
        raise ValueError(f"{where} must be a token id (int), a list of them or None, got {eos_token_id!r}")
    return {int(e) for e in ids}


def split_rows(target, input_ids, attention_mask, pixel_values, model_inputs: dict) -> list[dict]:
    """A padded batch, as a processor returns it for lists of prompts and images, into one
    request per row: its unpadded input_ids [1, len], and its image's pixel_values and other
    per-image tensors (LLaVA-NeXT's image_sizes).

    Padding: each row's attention_mask ones must be one contiguous run (left padding, what
    generate() wants for decoder-only models, or right padding: each row is decoded alone, so
    either works). Images: the processor stacks the images of all rows in row order; a row with
    image tokens takes the next one (one image per row), a text-only row none.
    """
    check_input_ids(target, input_ids)
    n_rows = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {shape}")
    img = image_token_id(target) if is_vlm(target) else None
    rows, has_image = [], []
    for b in range(n_rows):
        on = (attention_mask[b] != 0).nonzero().flatten()
        if on.numel() == 0:
            raise ValueError(f"row {b} of attention_mask is all zeros: that row has no prompt")
        lo, hi = int(on[0]), int(on[-1]) + 1
        if on.numel() != hi - lo:
            raise ValueError(f"row {b} of attention_mask has padding inside the prompt; pad on the left "
                             "(or the right) only, as the processor does")
        ids = input_ids[b : b + 1, lo:hi]
        rows.append({"input_ids": ids})
        has_image.append(img is not None and bool((ids == img).any()))
    n_images = sum(has_image)
    if pixel_values is None:
        if n_images:
            raise ValueError(f"{n_images} rows have image tokens but no pixel_values were given; "
                             "pass the processor's pixel_values")
        extra = {}
    else:
        if not torch.is_tensor(pixel_values) or pixel_values.shape[0] != n_images:
            got = pixel_values.shape[0] if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values holds {got} images but {n_images} rows have image tokens; a batch "
                             "takes one image per row with image tokens, in row order")
        extra = {"pixel_values": pixel_values}
    extra.update(model_inputs)
    image = 0
    for b, row in enumerate(rows):
        for name, value in extra.items():
            per_image = torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n_images
            per_row = torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n_rows
            if per_image and (name == "pixel_values" or n_images != n_rows or not per_row):
                if has_image[b]:  # the image tensors (pixel_values, image_sizes): this row's image
                    row[name] = value[image : image + 1]
            elif per_row:
                row[name] = value[b : b + 1]
            else:
                row[name] = value
        image += has_image[b]
    return rows
