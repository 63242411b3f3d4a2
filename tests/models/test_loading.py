"""Loading targets and drafts as users do: local folders and hub ids (offline from the Hugging
Face cache), dtype "auto" by default, device / device_map / attn_implementation, and prompts that
keep the tokenizer's BOS."""

import inspect
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from specllava.cli import build_parser
from specllava.models.hf import chat_inputs, load_model, load_pair
from specllava.models.options import LoadOptions, auto_dtype

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    sys.path.insert(0, str(TESTS))
    from random_models import tiny_llava

    path = tmp_path_factory.mktemp("models") / "tiny-llava"
    tiny_llava(0).save_pretrained(path)
    return path


def test_load_model_follows_the_options(saved_llava):
    model = load_model(str(saved_llava), LoadOptions(dtype="bfloat16", device="cpu", attn_implementation="eager"))
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert model.config.get_text_config()._attn_implementation == "eager"
    assert load_model(str(saved_llava), torch.float32).dtype == torch.float32  # a bare dtype, as before
    assert load_model(str(saved_llava), LoadOptions(device="cpu")).dtype == auto_dtype("cpu")  # "auto" by default


def test_load_flags_do_not_apply_to_the_default_pair():
    with pytest.raises(ValueError, match="default pair"):
        load_pair(None, None, LoadOptions(device_map="auto"), need_draft=False)


def test_a_missing_id_is_a_clear_error():
    """At once: an unreachable hub is seen in one connection attempt (`hf.hub_unreachable`), not
    after the hub client's retries."""
    from specllava.models.hf import hub_unreachable

    with pytest.raises(ValueError, match="cannot load a model from 'no-such-org/no-such-model'") as err:
        load_model("no-such-org/no-such-model", LoadOptions(device="cpu"))
    if hub_unreachable():
        assert "the hub cannot be reached" in str(err.value) and "huggingface-cli download" in str(err.value)


def _fake_hub_cache(root: Path, repo: str, model_dir: Path) -> None:
    """The Hugging Face cache layout for `repo` at one snapshot (what `hf download` leaves)."""
    entry = root / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)


def test_hub_ids_load_offline_from_the_cache(saved_llava, tmp_path):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someone/tiny-llava", saved_llava)
    script = (
        "from specllava.models.hf import load_model\n"
        "from specllava.models.options import LoadOptions\n"
        "m = load_model('someone/tiny-llava', LoadOptions(dtype='float32', device='cpu'))\n"
        "print('loaded', type(m).__name__)\n"
        "try:\n"
        "    load_model('someone/not-cached', LoadOptions(device='cpu'))\n"
        "except ValueError as err:\n"
        "    print('error', err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(TESTS.parent / "src")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "loaded LlavaForConditionalGeneration" in out.stdout
    assert "error cannot load a model from 'someone/not-cached'" in out.stdout and "HF_HUB_OFFLINE is set" in out.stdout


def test_default_models_load_in_the_hardwares_dtype(tmp_path):
    from tiny_llava import tiny_sources

    from specllava.models import load_default_models
    from specllava.models.assemble import assemble_models, load_models

    assert inspect.signature(load_default_models).parameters["dtype"].default == "auto"
    (tmp_path / "assets").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = assemble_models(tmp_path / "cache", tiny_sources(), assets_dir=tmp_path / "assets")
        pair = load_models(paths, device="cpu")
        assert pair.target.dtype == auto_dtype("cpu") and pair.draft.dtype == auto_dtype("cpu")
        assert load_models(paths, dtype=torch.float32, draft=False).target.dtype == torch.float32


def test_the_public_load_default_models_is_the_models_one(monkeypatch):
    """`specllava.load_default_models` (the README's) takes the same arguments with the same
    defaults as `specllava.models.load_default_models` (dtype "auto", as the CLI) and passes
    them all on."""
    import specllava
    from specllava import models as models_pkg

    public, inner = inspect.signature(specllava.load_default_models), inspect.signature(models_pkg.load_default_models)
    assert [(p.name, p.default) for p in public.parameters.values()] == \
        [(p.name, p.default) for p in inner.parameters.values()]
    assert public.parameters["dtype"].default == "auto"
    seen = {}
    monkeypatch.setattr(models_pkg, "load_default_models", lambda **kw: seen.update(kw) or "pair")
    assert specllava.load_default_models() == "pair"
    assert seen == {p.name: p.default for p in inner.parameters.values()}
    specllava.load_default_models("c", torch.float16, False, "cuda:1")
    assert seen == {"cache_dir": "c", "dtype": torch.float16, "draft": False, "device": "cuda:1"}


def test_generate_and_bench_take_the_load_flags():
    parser = build_parser()
    for command in ("generate", "bench"):
        extra = ["--prompt", "x"] if command == "generate" else []
        args = parser.parse_args([command, *extra])
        assert LoadOptions.from_args(args) == LoadOptions()  # dtype auto, device and map unset
        args = parser.parse_args([command, *extra, "--dtype", "float16", "--device", "cuda:1", "--device-map", "auto",
                                  "--attn-implementation", "eager"])
        assert LoadOptions.from_args(args) == LoadOptions("float16", "cuda:1", "auto", "eager")


def _llama_style_tokenizer(template: str) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer that adds <s> in front of every text, as Llama's does."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = template
    return tok


TEXT = "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}USER: {{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:"


def test_prompts_keep_the_tokenizers_bos():
    tok = _llama_style_tokenizer(TEXT)  # llava-hf's template writes no <s>
    inputs = chat_inputs(tok, "hi")
    assert inputs["input_ids"][0, 0].item() == 1 and (inputs["input_ids"] == 1).sum() == 1
    assert inputs["input_ids"].tolist() == [tok("USER: hi ASSISTANT:").input_ids]  # as the model card encodes it
    assert inputs["attention_mask"].shape == inputs["input_ids"].shape and bool(inputs["attention_mask"].all())
    tok = _llama_style_tokenizer("<s>" + TEXT)  # a template that writes it: not twice
    assert (chat_inputs(tok, "hi")["input_ids"] == 1).sum() == 1
