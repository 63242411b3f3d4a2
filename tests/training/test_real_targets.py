"""train-draft for the targets users have: a LLaVA-1.5-7B-shaped one (real widths, one layer, random
weights) with the LLaVA-68M preset, a tiny LLaVA-NeXT one with images of several sizes, and on CUDA."""

import inspect
import json
import shutil

import pytest
import torch
from hf_like import CHAT_TEMPLATE, dataset, llava_1_5_7b_shaped, tiny_llava_next, word_tokenizer
from tiny_data import make_dataset
from transformers import AutoModelForImageTextToText, AutoProcessor

from specllava import SpeculativeDecoder
from specllava.models.options import auto_dtype
from specllava.training.cli import main
from specllava.training.common import (
    FeatureCache,
    answer_logits,
    collate,
    encode_prompts,
    encode_record,
    ensure_chat_template,
    image_tokens,
    load_records,
    to_messages,
)
from specllava.training.distill import DRAFT_PRESETS, DistillConfig, make_draft, preset_config

DECODER_TAKES_IMAGE_SIZES = "image_sizes" in inspect.signature(SpeculativeDecoder.generate).parameters


def _run(args):
    assert main(["train-draft", *map(str, args)]) == 0


def test_prompts_keep_the_bos_and_use_the_processors_chat_template(tmp_path):
    from transformers import CLIPImageProcessor, LlavaProcessor

    tok = word_tokenizer(64)
    processor = LlavaProcessor(CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                               tok, patch_size=4, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    with pytest.raises(ValueError):  # the tokenizer alone has no template
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    ensure_chat_template(processor)
    records, root = load_records(make_dataset(tmp_path, n=1))
    ex = encode_record(records[0], tok, 16, root)
    # what the processor makes of the same conversation, as the model card's usage does
    text = tok.apply_chat_template(to_messages(records[0]["conversations"]), tokenize=False)
    assert text.startswith("USER: <image>\n")
    stock = processor.tokenizer(text.replace("<image>", "<image>" * 16))["input_ids"]
    assert ex.input_ids == stock and ex.input_ids[0] == tok.bos_token_id and ex.loss_mask[0] == 0
    # a template that writes <s> itself gets no second one, in training text and in prompts alike
    tok.chat_template = "<s>" + CHAT_TEMPLATE
    ex = encode_record(records[0], tok, 16, root)
    assert ex.input_ids == stock
    from PIL import Image

    prompt = tok.apply_chat_template(to_messages(records[0]["conversations"][:1]), tokenize=False, add_generation_prompt=True)
    enc = encode_prompts(processor, [Image.open(root / records[0]["image"]).convert("RGB")], [prompt])
    assert enc["input_ids"][0].tolist() == ex.input_ids[: enc["input_ids"].shape[1]]
    processor.chat_template = None
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        ensure_chat_template(processor)


def test_presets_have_the_published_shapes_and_the_targets_vocabulary(tiny_models):
    target, _ = tiny_models
    for name, layers in (("llava-68m", 2), ("llava-160m", 12)):
        cfg = preset_config(target, name)
        text = cfg.text_config
        assert (text.model_type, text.num_hidden_layers, text.hidden_size, text.num_attention_heads,
                text.intermediate_size) == ("llama", layers, 768, 12, 3072)
        assert text.vocab_size == target.config.text_config.vocab_size
        assert cfg.image_token_id == target.config.image_token_id
    assert set(DRAFT_PRESETS) == {"llava-68m", "llava-160m"}
    draft, frozen = make_draft(target, DistillConfig(data=None, draft_preset="llava-68m"))
    assert not frozen and draft.dtype == torch.float32
    for name, value in target.model.vision_tower.state_dict().items():  # the target's tower
        assert torch.equal(draft.model.vision_tower.state_dict()[name], value.float()), name
    with pytest.raises(ValueError, match="unknown draft preset"):
        preset_config(target, "llava-7b")


def test_the_target_teaches_in_its_own_dtype_without_a_copy(tmp_path, assembled_pair, monkeypatch):
    import copy

    import specllava.training.distill as distill

    loaded, copied, teachers = [], [], []
    load, deepcopy, step = distill.load_target, copy.deepcopy, distill.distill_step
    monkeypatch.setattr(distill, "load_target", lambda cfg: loaded.append(load(cfg)) or loaded[-1])
    monkeypatch.setattr(copy, "deepcopy", lambda obj, *a: copied.append(id(obj)) or deepcopy(obj, *a))
    monkeypatch.setattr(distill, "distill_step", lambda teacher, *a, **k: teachers.append(teacher) or step(teacher, *a, **k))
    data = make_dataset(tmp_path / "d", n=3)
    cfg = DistillConfig(target=assembled_pair.target_dir, data=data, out=tmp_path / "run", draft_layers=1, steps=2,
                        batch_size=2, warmup=1, eval_prompts=0, dtype="bfloat16")
    distill.train_draft(cfg, log=lambda *a: None)
    target = loaded[0][0]
    assert teachers and all(t is target for t in teachers) and id(target) not in copied
    assert {p.dtype for p in target.parameters()} == {torch.bfloat16}


@pytest.fixture(scope="module")
def next_target(tmp_path_factory):
    root = tmp_path_factory.mktemp("next")
    return tiny_llava_next(root / "model"), dataset(root / "d", [(40, 20), (20, 40), (30, 30), (24, 40)])


def test_anyres_features_give_the_stock_llava_next_logits(next_target):
    folder, data = next_target
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = ensure_chat_template(AutoProcessor.from_pretrained(folder))
    records, root = load_records(data)
    n_image = image_tokens(model, processor)
    examples = [encode_record(r, processor.tokenizer, n_image, root, i) for i, r in enumerate(records)]
    assert len({n_image(e.image) for e in examples}) > 1  # the image sizes give different token counts
    cache = FeatureCache(model, processor)
    cache.ensure([e.image for e in examples])
    ids, att, feats, pos, _ = collate(examples, cache, processor.tokenizer.pad_token_id)
    from PIL import Image

    with torch.no_grad():
        ours = answer_logits(model, ids, feats, att, pos)
        for b, (rec, e) in enumerate(zip(records, examples)):
            text = processor.tokenizer.apply_chat_template(to_messages(rec["conversations"]), tokenize=False)
            enc = processor(images=[Image.open(e.image).convert("RGB")], text=[text], return_tensors="pt")
            assert enc["input_ids"][0].tolist() == e.input_ids  # BOS and image tokens as the processor makes them
            stock = model(**enc).logits[0]
            torch.testing.assert_close(ours[pos[0] == b], stock[pos[1][pos[0] == b]], atol=2e-3, rtol=0)  # bf16 cache


def test_train_draft_on_a_llava_next_target(tmp_path, next_target):
    folder, data = next_target
    out = tmp_path / "run"
    evals = 2 if DECODER_TAKES_IMAGE_SIZES else 0  # decoding a NeXT target needs image_sizes in the decoder
    _run(["--target", folder, "--data", data, "--out", out, "--draft-layers", "1", "--steps", "3", "--batch-size", "2",
          "--regenerate", "--regenerate-max-new-tokens", "4",  # one batch of four image sizes (5D pixel values)
          "--eval-data", data, "--eval-prompts", evals, "--eval-max-new-tokens", "4", "--dtype", "float32"])
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3] and all(h["kl"] >= 0 for h in history)
    assert len((out / "answers.jsonl").read_text().splitlines()) == 4
    draft = AutoModelForImageTextToText.from_pretrained(out / "draft")
    assert type(draft).__name__ == "LlavaNextForConditionalGeneration"
    report = json.loads((out / "report.json").read_text())
    if evals:
        assert report["eval"]["data/1_layers"]["mean_accepted"] >= 1.0
    # and a preset draft for the same target
    _run(["--target", folder, "--data", data, "--out", tmp_path / "preset", "--draft-preset", "llava-68m", "--steps", "1",
          "--batch-size", "2", "--eval-data", data, "--eval-prompts", 0, "--dtype", "float32", "--device-map", "cpu"])
    preset = AutoModelForImageTextToText.from_pretrained(tmp_path / "preset" / "draft")
    assert preset.config.text_config.hidden_size == 768 and not (tmp_path / "preset" / "draft.safetensors").exists()


@pytest.mark.slow
def test_train_draft_llava_68m_for_a_llava_1_5_7b_shaped_target(tmp_path):
    """The real widths (4096 hidden, 32064 vocabulary, CLIP ViT-L/14-336) with one layer each, in the
    dtype --dtype auto picks here; a few steps, a one-prompt report."""
    folder = llava_1_5_7b_shaped(tmp_path / "target")
    data = make_dataset(tmp_path / "d", n=3)
    out = tmp_path / "run"
    _run(["--target", folder, "--data", data, "--out", out, "--draft-preset", "llava-68m", "--steps", "2",
          "--batch-size", "2", "--eval-data", data, "--eval-prompts", 1, "--eval-max-new-tokens", 3, "--threads", 2])
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["eval"]["data/2_layers"]["mean_accepted"] >= 1.0
    # the teacher is the target itself, in the dtype --dtype auto chose, the draft under autocast to it
    assert f"target {auto_dtype('cpu')} on cpu, draft on cpu" in (out / "train.log").read_text()
    draft = AutoModelForImageTextToText.from_pretrained(out / "draft")
    text = draft.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.vocab_size) == (2, 768, 32064)
    assert draft.config.vision_config.hidden_size == 1024 and draft.config.image_token_id == 32000
    shutil.rmtree(tmp_path)  # about 1.3 GB of model files


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is visible)")
def test_train_draft_on_cuda_keeps_the_target_as_teacher_in_its_dtype(tmp_path, assembled_pair):
    data = make_dataset(tmp_path / "d", n=3)
    out = tmp_path / "run"
    _run(["--target", assembled_pair.target_dir, "--data", data, "--out", out, "--draft-layers", "1", "--steps", "2",
          "--batch-size", "2", "--eval-data", data, "--eval-prompts", 1, "--eval-max-new-tokens", 4,
          "--device", "cuda", "--dtype", "bfloat16"])
    log = (out / "train.log").read_text()
    assert "target torch.bfloat16 on cuda" in log and "draft on cuda" in log and "torch.bfloat16 autocast" in log
    assert json.loads((out / "report.json").read_text())["eval"]["data/1_layers"]["mean_accepted"] >= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is visible)")
def test_train_a_preset_draft_for_llava_next_on_cuda_in_float16(tmp_path, next_target):
    folder, data = next_target
    out = tmp_path / "run"
    _run(["--target", folder, "--data", data, "--out", out, "--draft-preset", "llava-68m", "--steps", "2",
          "--batch-size", "2", "--regenerate", "--regenerate-max-new-tokens", "4", "--eval-data", data,
          "--eval-prompts", 2 if DECODER_TAKES_IMAGE_SIZES else 0, "--eval-max-new-tokens", "4",
          "--device", "cuda", "--dtype", "float16"])
    log = (out / "train.log").read_text()
    assert "target torch.float16 on cuda" in log and "torch.float16 autocast" in log
    assert all(h["kl"] == h["kl"] for h in json.loads((out / "history.json").read_text()))  # no NaN
