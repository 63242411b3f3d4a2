"""Tiny random-weight models and statistics helpers for the tests, built in-process on CPU in
milliseconds. Imported by name (`from random_models import ...`): pyproject's pytest `pythonpath`
lists tests/."""

from __future__ import annotations

import copy

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

VOCAB = 96
IMAGE_TOKEN = VOCAB - 1
N_IMAGE_TOKENS = 16  # (16 px / 4 px patches)^2, CLS dropped by the "default" strategy


def llama_config(vocab=VOCAB, hidden=48, layers=2, init=0.15) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=init,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def _finish(model, eos=None):
    model.eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    return model


def tiny_lm(seed: int, eos=None, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(llama_config(**kw)), eos)


def tiny_llava(seed: int, eos=None, **kw) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=16, patch_size=4, projection_dim=32,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=llama_config(**kw),
        image_token_id=IMAGE_TOKEN,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=N_IMAGE_TOKENS,
    )
    return _finish(LlavaForConditionalGeneration(cfg), eos)


def perturbed_copy(model, scale: float, seed: int):
    """A draft that mostly agrees with `model`: its weights plus relative Gaussian noise."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    return out


def tiny_llava_pair(noise: float = 0.05, seed: int = 1):
    """(target, draft): `tiny_llava(0)` and `perturbed_copy` of it; the `tiny_pair` fixture."""
    target = tiny_llava(0)
    return target, perturbed_copy(target, noise, seed)


def llava_prompt(seed: int, text_len: int = 6):
    """input_ids with an image block in the middle, and matching pixel_values."""
    g = torch.Generator().manual_seed(seed)
    before = torch.randint(3, IMAGE_TOKEN, (2,), generator=g)
    after = torch.randint(3, IMAGE_TOKEN, (text_len,), generator=g)
    ids = torch.cat([torch.tensor([1]), before, torch.full((N_IMAGE_TOKENS,), IMAGE_TOKEN), after])[None]
    pixels = torch.randn(1, 3, 16, 16, generator=g)
    return ids, pixels


def text_prompt(seed: int, length: int = 8, vocab: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([1]), torch.randint(3, vocab - 1, (length - 1,), generator=g)])[None]


@torch.inference_mode()
def feed_tree(runner) -> tuple[torch.Tensor, int]:
    """Feed a fixed 5-node tree (a root, two children, one grandchild under each) through a
    prefilled `ModelRunner` with its tree mask; returns (logits [5, V], the prefix length)."""
    from specllava.core.tree import Tree, ancestor_mask, attention_bias, position_ids

    parents = torch.tensor([-1, 0, 0, 1, 2])
    tree = Tree(tokens=torch.tensor([7, 11, 13, 17, 19]), parents=parents,
                depth=torch.tensor([0, 1, 1, 2, 2]), score=torch.ones(5))
    prefix = runner.length
    bias = attention_bias(ancestor_mask(parents), prefix, runner.dtype)
    return runner.forward(tree.tokens, position_ids(tree, prefix), bias), prefix


@torch.inference_mode()
def exact_sequence_probs(target, ids, params, n_tokens: int) -> dict:
    """P(the first n_tokens sampled tokens) under the target's own processed sampling (`params`, a
    `SamplingParams`), by enumeration over its (tiny) vocabulary: {token tuple: probability}."""
    from specllava.core.sampling import processed_probs

    probs = {(): 1.0}
    for _ in range(n_tokens):
        nxt = {}
        for prefix, pr in probs.items():
            seq = torch.cat([ids, torch.tensor([prefix], dtype=torch.long).reshape(1, -1)], dim=1)
            p = processed_probs(target(input_ids=seq).logits[:, -1], params)[0]
            nxt.update({prefix + (t,): pr * float(p[t]) for t in range(p.numel()) if p[t] > 0})
        probs = nxt
    return probs


def chi2_pvalue(counts: dict, probs: dict, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit of observed `counts` to exact `probs` (outcome -> value).

    Outcomes with small expected counts are pooled into one bin so the chi-square approximation
    holds; an observed outcome of probability 0 makes the p-value 0 outright.
    """
    from scipy.stats import chi2

    n = sum(counts.values())
    if any(probs.get(k, 0.0) <= 0 for k in counts):
        return 0.0
    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for k, pk in probs.items():
        if pk * n >= min_expected:
            obs.append(counts.get(k, 0))
            exp.append(pk * n)
        else:
            pool_o += counts.get(k, 0)
            pool_e += pk * n
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return float(chi2.sf(stat, df=max(len(obs) - 1, 1)))


def wrong_verify_sampling(tree, p, generator, q=None):
    """Deliberately wrong sampling rule, to prove the losslessness checks can fail: after rejecting
    every candidate it draws the bonus from the full p (forgetting to remove the rejected
    candidates), so the draft's candidates come out too often."""
    from specllava.core.verify import Verdict

    children = {}
    for i, par in enumerate(tree.parents.tolist()):
        children.setdefault(par, []).append(i)
    node, path = 0, [0]
    while True:
        for child in children.get(node, []):
            if torch.rand((), generator=generator) < p[node][tree.tokens[child]]:
                node = child
                path.append(child)
                break
        else:
            return Verdict(path=path, bonus=int(torch.multinomial(p[node], 1, generator=generator)))
