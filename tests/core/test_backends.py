"""The backend interface (`specllava.core.backends`): every implementation honours it, hidden
states come on request, and features go only where they are read."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from random_models import feed_tree, text_prompt, tiny_llava
from specllava.core.backends import (Backend, DecoderBackend, HeadBackend, LeanBackend, TransformersBackend,
                                     draft_backend, head_backend, target_backend)
from specllava.core.eagle import EagleHead
from specllava.core.runner import ModelRunner


def _qwen3():
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    return Qwen3ForCausalLM(cfg).eval()


def test_every_backend_has_the_interface():
    target = tiny_llava(0)
    built = {
        "transformers": target_backend(target, lean=False),
        "exact": target_backend(target),
        "lean": draft_backend(target, torch.arange(40), quant="int8"),
        "decoder": draft_backend(_qwen3(), quant="int8"),
        "eagle-head": head_backend(EagleHead.from_target(target), target, torch.arange(40)),
    }
    kinds = {"transformers": TransformersBackend, "exact": LeanBackend, "lean": LeanBackend,
             "decoder": DecoderBackend, "eagle-head": HeadBackend}
    for kind, backend in built.items():
        assert isinstance(backend, Backend) and isinstance(backend, kinds[kind]) and backend.kind == kind
        assert backend.device == torch.device("cpu") and backend.window is None
    assert built["lean"].vocab_ids.numel() == 40 and built["exact"].vocab_ids is None


def test_hidden_states_on_request_and_equal_on_the_exact_path():
    """keep_hidden gives the final normed hidden states through every target backend; the exact
    path's are transformers' own, bit for bit (the EAGLE head reads them)."""
    target = tiny_llava(0)
    hidden = {}
    for backend in (target_backend(target, lean=False), target_backend(target)):
        runner = ModelRunner(target, backend, keep_hidden=True)
        with torch.inference_mode():
            runner.prefill(text_prompt(1, length=10))
            logits, _ = feed_tree(runner)
        assert runner.hidden.shape == (logits.shape[0], target.config.text_config.hidden_size)
        hidden[backend.kind] = (logits, runner.hidden)
        plain = ModelRunner(target, backend)
        with torch.inference_mode():
            plain.prefill(text_prompt(1, length=10))
            feed_tree(plain)
        assert plain.hidden is None
    assert all(torch.equal(a, b) for a, b in zip(hidden["transformers"], hidden["exact"]))


def test_features_go_only_to_the_head():
    target = tiny_llava(0)
    head = ModelRunner(EagleHead.from_target(target), head_backend(EagleHead.from_target(target), target), keep_hidden=True)
    head.start()
    tokens, positions = torch.tensor([5, 6, 7]), torch.arange(3)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="one input feature per token"):
            head.forward(tokens, positions, None)
        logits = head.forward(tokens, positions, None, features=torch.zeros(3, 48))
    assert logits.shape == (3, 96) and head.hidden.shape == (3, 48) and head.length == 3 and head.forwards == 1
    runner = ModelRunner(target)
    with torch.inference_mode():
        runner.prefill(text_prompt(1, length=6))
        with pytest.raises(TypeError, match="takes no input features"):
            runner.forward(tokens, positions + 6, None, features=torch.zeros(3, 48))


def test_backends_are_built_once_per_model():
    """Decoders on the same models share their backends (int8 quantization and the exact path's
    check run once); new weights build new ones."""
    from specllava import SpeculativeDecoder

    target = tiny_llava(0)
    head = EagleHead.from_target(target, token_ranking=list(range(40)))
    first, second = (SpeculativeDecoder(target, head, method="dynamic", draft_quant="int8") for _ in range(2))
    assert first.draft_backend is second.draft_backend and first.draft_backend.kind == "eagle-head"
    assert first.target_backend is second.target_backend
    with torch.no_grad():
        head.fc.weight.mul_(2.0)
    assert SpeculativeDecoder(target, head, method="dynamic", draft_quant="int8").draft_backend is not first.draft_backend
