"""Tiny stand-ins for SmolLM2 (a random 2-layer Llama and a byte-level tokenizer with SmolLM2's
special tokens and chat template), so assembly tests run in seconds without the 135M GGUF."""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import specllava.models  # noqa: F401  (registers the vision tower with the Auto classes)
from specllava.models.assemble import ModelSources
from specllava.models.efficientnet_vision import efficientnet_lite0_imagenet

# SmolLM2-135M-Instruct's chat template, verbatim from its GGUF.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per byte, SmolLM2's specials at ids 0-4."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>",
    )  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tokenizer


def tiny_language_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def tiny_sources() -> ModelSources:
    def language_model():
        tokenizer = tiny_tokenizer()
        return tiny_language_model(len(tokenizer)), tokenizer

    return ModelSources(
        language_model=language_model,
        vision_tower=efficientnet_lite0_imagenet,
        fingerprint={"language_model": "tiny-llama-seed0", "vision_tower": "efficientnet-lite0"},
    )
