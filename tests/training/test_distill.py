"""Distillation on a tiny assembled LLaVA: the KL step, early exits, checkpoint/resume, the CLI."""

import copy
import json

import pytest

import torch
from tiny_data import make_dataset
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from specllava.models import build_draft_from_target
from specllava.models.shipped import load_draft
from specllava.training.common import FeatureCache, answer_logits, collate, encode_record, load_records
from specllava.training.distill import DistillConfig, distill_step, train_draft, trainable_parameters, truncated


def _batch(tmp_path, target, processor, n=2):
    records, root = load_records(make_dataset(tmp_path, n=n))
    examples = [encode_record(r, processor.tokenizer, target.config.image_seq_length, root) for r in records]
    cache = FeatureCache(target, processor)
    cache.ensure([e.image for e in examples])
    return collate(examples, cache, processor.tokenizer.pad_token_id)


def test_one_distillation_step_lowers_the_kl(tmp_path, tiny_models):
    target, processor = tiny_models
    torch.manual_seed(0)
    draft = build_draft_from_target(target, num_layers=1).float()
    with torch.no_grad():  # move the draft away from the target's early exit so there is a KL to lower
        for p in draft.model.language_model.layers.parameters():
            p.add_(0.3 * torch.randn_like(p))
    params = trainable_parameters(draft, embeddings_frozen=True)
    assert not any(n.startswith(("model.vision_tower.", "lm_head.", "model.language_model.embed_tokens.")) for n in params)
    batch = _batch(tmp_path, target, processor)
    opt = torch.optim.SGD(params.values(), lr=0.5)
    before = distill_step(target, draft, batch, [1], bf16=False)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = distill_step(target, draft, batch, [1], bf16=False)
    assert after < before - 1e-4


def test_early_exit_logits_equal_the_truncated_model(tmp_path, tiny_models):
    target, processor = tiny_models
    ids, att, feats, pos, _ = _batch(tmp_path, target, processor)
    with torch.no_grad():
        exit1, final = answer_logits(target, ids, feats, att, pos, exits=[1, 2])
        torch.testing.assert_close(exit1, answer_logits(truncated(target, 1), ids, feats, att, pos))
        torch.testing.assert_close(final, answer_logits(target, ids, feats, att, pos))
        # and the cached-feature forward equals the stock forward from pixels
        pv = torch.cat([FeatureCache(target, processor).pixel_values(p) for p in sorted((tmp_path / "images").glob("*.png"))])
        stock = target(input_ids=ids, pixel_values=pv, attention_mask=att).logits[pos]
        torch.testing.assert_close(final, stock, atol=2e-2, rtol=0)  # features are cached in bf16


def _config(tmp_path, target_dir, data, out, **kw):
    base = dict(target=target_dir, data=data, out=out, draft_layers=1, steps=4, batch_size=1, lr=1e-2,
                warmup=1, checkpoint_every=1, eval_prompts=1, eval_max_new_tokens=4, held_out_fraction=0.3, bf16=False)
    return DistillConfig(**{**base, **kw})


def _trained(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)["tensors"]


def test_resume_continues_exactly_where_it_stopped(tmp_path, assembled_pair):
    data = make_dataset(tmp_path / "d", n=4)
    quiet = lambda *a: None  # noqa: E731
    train_draft(_config(tmp_path, assembled_pair.target_dir, data, tmp_path / "full"), log=quiet)
    train_draft(_config(tmp_path, assembled_pair.target_dir, data, tmp_path / "part", steps=2), log=quiet)
    history = json.loads((tmp_path / "part" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2]
    train_draft(_config(tmp_path, assembled_pair.target_dir, data, tmp_path / "part", resume=True), log=quiet)
    full, part = _trained(tmp_path / "full"), _trained(tmp_path / "part")
    assert full.keys() == part.keys()
    for name in full:
        torch.testing.assert_close(part[name], full[name], msg=name)
    assert [h["step"] for h in json.loads((tmp_path / "part" / "history.json").read_text())] == [1, 2, 3, 4]


def test_train_draft_cli_end_to_end(tmp_path, assembled_pair, tiny_models):
    from specllava.training.cli import main

    data = make_dataset(tmp_path / "d", n=2, answered=False)
    out = tmp_path / "run"
    rc = main(["train-draft", "--target", str(assembled_pair.target_dir), "--data", str(data), "--out", str(out),
               "--regenerate", "--regenerate-max-new-tokens", "6", "--draft-layers", "2", "--exits", "1",
               "--steps", "2", "--batch-size", "1", "--eval-data", str(data), "--eval-prompts", "2",
               "--eval-max-new-tokens", "6", "--no-bf16"])
    assert rc == 0
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["rec0", "rec1"]
    report = json.loads((out / "report.json").read_text())
    for depth in (1, 2):
        r = report["eval"][f"data/{depth}_layers"]
        assert r["prompts"] == 2 and r["mean_accepted"] >= 1.0 and r["new_tokens"] > 0
    assert (out / "loss.png").is_file() and (out / "draft" / "config.json").is_file()
    # the shipped-format file rebuilds the trained draft on top of the target
    target, _ = tiny_models
    draft = load_draft(target, out / "draft.safetensors")
    assert draft.config.text_config.num_hidden_layers == 2

    from safetensors import safe_open

    saved = LlavaForConditionalGeneration.from_pretrained(out / "draft")
    # both carry the token ranking of the answers it was trained on (for draft_vocab=K)
    tok = AutoTokenizer.from_pretrained(assembled_pair.target_dir)
    answer_ids = {t for a in answers for t in tok(a["answer"], add_special_tokens=False).input_ids}
    assert draft.config.token_ranking == saved.config.token_ranking
    assert answer_ids <= set(draft.config.token_ranking)
    with safe_open(str(out / "draft.safetensors"), "pt") as f:
        shipped = set(f.keys())
    assert shipped and not any(n.startswith(("model.vision_tower.", "lm_head.", "model.language_model.embed_tokens.")) for n in shipped)
    for name, value in saved.state_dict().items():  # shipped tensors are stored in bf16
        want = value.to(torch.bfloat16).float() if name in shipped else value
        torch.testing.assert_close(draft.state_dict()[name], want, msg=name)
    # a second run reuses the cached answers instead of generating again
    main(["train-draft", "--target", str(assembled_pair.target_dir), "--data", str(data), "--out", str(out),
          "--regenerate", "--steps", "1", "--batch-size", "1", "--eval-data", str(data), "--eval-prompts", "1",
          "--eval-max-new-tokens", "2", "--no-bf16"])
    assert len((out / "answers.jsonl").read_text().splitlines()) == 2


def test_train_draft_adds_sampled_answers_but_ranks_only_the_greedy_ones(tmp_path, assembled_pair, tiny_models):
    from specllava.training.cli import main

    data = make_dataset(tmp_path / "d", n=3, answered=False)
    out = tmp_path / "run"
    args = ["train-draft", "--target", str(assembled_pair.target_dir), "--data", str(data), "--out", str(out),
            "--regenerate", "--regenerate-max-new-tokens", "8", "--sampled-answers", "2", "--draft-layers", "1",
            "--steps", "1", "--batch-size", "1", "--eval-data", str(data), "--eval-prompts", "1",
            "--eval-max-new-tokens", "2", "--no-bf16"]
    assert main(args) == 0
    greedy = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    sampled = [json.loads(line) for line in (out / "sampled_answers.jsonl").read_text().splitlines()]
    assert len(greedy) == 3 and len(sampled) == 2 and {a["id"] for a in sampled} <= {a["id"] for a in greedy}
    # trained on both: 3 greedy + 2 sampled examples (the log line of the run)
    assert "5 training examples (2 sampled answers)" in (out / "train.log").read_text()
    tok = AutoTokenizer.from_pretrained(assembled_pair.target_dir)
    ids = lambda answers: {t for a in answers for t in tok(a["answer"], add_special_tokens=False).input_ids}  # noqa: E731
    ranking = set(LlavaForConditionalGeneration.from_pretrained(out / "draft").config.token_ranking)
    assert ids(greedy) <= ranking
    only_sampled = ids(sampled) - ids(greedy)
    assert only_sampled and not (only_sampled & ranking)  # the ranking is the greedy answers'
    # a rerun (replacing the results, reusing the cached answers) samples nothing new
    assert main(args + ["--overwrite"]) == 0 and len((out / "sampled_answers.jsonl").read_text().splitlines()) == 2


def test_draft_init_from_a_target_built_draft_keeps_the_shared_vocabulary_rows_frozen(tmp_path, tiny_models):
    from specllava.training.distill import make_draft

    target, _ = tiny_models
    folder = tmp_path / "prev"
    build_draft_from_target(target, num_layers=1).save_pretrained(folder)
    draft, frozen = make_draft(target, DistillConfig(target=None, data=None, draft_init=folder))
    assert frozen  # an earlier run's draft: embedding and head are still the target's
    bf16_target = copy.deepcopy(target).to(torch.bfloat16)  # the fp32 folder's rows equal the bf16 target's at bf16
    assert make_draft(bf16_target, DistillConfig(target=None, data=None, draft_init=folder))[1]
    with torch.no_grad():
        draft.get_input_embeddings().weight.add_(0.1)
    other = tmp_path / "other"
    draft.save_pretrained(other)
    assert not make_draft(target, DistillConfig(target=None, data=None, draft_init=other))[1]
    # a draft.safetensors in the shipped format starts the draft too, its vocabulary rows shared and frozen
    from specllava.training.distill import save_draft

    _, processor = tiny_models
    path = save_draft(build_draft_from_target(target, num_layers=1).float(), processor, tmp_path / "shipped", True)
    draft, frozen = make_draft(target, DistillConfig(target=None, data=None, draft_init=path))
    assert frozen and draft.config.text_config.num_hidden_layers == 1


def test_answers_ranking_ranks_the_regenerated_answers(tmp_path, tiny_models):
    """`ship-default` ranks a run's answers.jsonl for a draft trained before drafts carried a ranking."""
    from specllava.training.distill import answers_ranking

    _, processor = tiny_models
    tok = processor.tokenizer
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "answer": a}) + "\n" for i, a in enumerate(["abab", "bc"])))
    a, b, c = (tok("a", add_special_tokens=False).input_ids[0], tok("b", add_special_tokens=False).input_ids[0],
               tok("c", add_special_tokens=False).input_ids[0])
    assert answers_ranking(path, tok) == [b, a, c]  # b three times, a twice, c once
    assert answers_ranking(tmp_path / "missing.jsonl", tok) is None


def test_tvd_loss_is_one_minus_the_overlap_on_a_hand_made_example():
    from specllava.training.distill import distill_loss, tvd_loss

    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.2, 0.3, 0.1, 0.4], [1.0, 0.0, 0.0, 0.0]])
    # sum min(p, q): 0.2 + 0.3 + 0.1 + 0 = 0.6, and 0.25: TVD 0.4 and 0.75, mean 0.575
    tiny = torch.finfo(torch.float32).tiny
    lp, lq = p.clamp_min(tiny).log(), q.clamp_min(tiny).log()
    torch.testing.assert_close(tvd_loss(lp, lq), torch.tensor(0.575))
    torch.testing.assert_close(tvd_loss(lp, lq), 0.5 * (p - q).abs().sum(-1).mean())
    # over a reduced vocabulary {0, 1}, q renormalised there: q = (0.4, 0.6) and (1, 0); overlap 0.7 and 0.25
    torch.testing.assert_close(tvd_loss(lp, lq, torch.tensor([0, 1])), torch.tensor(1 - (0.7 + 0.25) / 2))
    value, record = distill_loss(lp, lq, "mix", 0.25)
    kl = torch.where(p > 0, p * (lp - lq), 0.0).sum(-1).mean()
    assert record["tvd"] == pytest.approx(0.575, rel=1e-5) and record["kl"] == pytest.approx(kl.item(), rel=1e-4)
    assert value.item() == pytest.approx(0.75 * record["kl"] + 0.25 * record["tvd"], rel=1e-5)
    with pytest.raises(ValueError, match="loss must be one of"):
        distill_loss(lp, lq, "l2")


def test_a_tvd_step_raises_the_overlap(tmp_path, tiny_models):
    from specllava.training.distill import distill_loss

    target, processor = tiny_models
    torch.manual_seed(0)
    draft = build_draft_from_target(target, num_layers=1).float()
    with torch.no_grad():  # away from the target's early exit, as above
        for p in draft.model.language_model.layers.parameters():
            p.add_(0.3 * torch.randn_like(p))
    params = trainable_parameters(draft, embeddings_frozen=True)
    batch = _batch(tmp_path, target, processor)
    opt = torch.optim.SGD(params.values(), lr=0.5)
    before = {}
    distill_step(target, draft, batch, [1], loss="tvd", record=before).backward()
    opt.step()
    after = {}
    with torch.no_grad():
        distill_step(target, draft, batch, [1], loss="tvd", record=after)
    assert after["tvd"] < before["tvd"] - 1e-4
    assert distill_loss  # imported: the module's API


def test_train_draft_with_tvd_and_on_policy_answers_end_to_end(tmp_path, assembled_pair):
    """--loss tvd with on-policy data only: the draft's own sampled answers, one set per refresh, cached;
    the history records both KL and TVD; a resumed run reads the cached sets and ends where a whole run does."""
    from specllava.training.cli import main

    data = make_dataset(tmp_path / "d", n=3, answered=False)

    def args(out, steps, *extra):
        return ["train-draft", "--target", str(assembled_pair.target_dir), "--data", str(data), "--out", str(out),
                "--on-policy", "2", "--on-policy-every", "2", "--regenerate-max-new-tokens", "5", "--loss", "tvd",
                "--draft-layers", "1", "--steps", str(steps), "--batch-size", "1", "--lr", "1e-2", "--warmup", "1",
                "--checkpoint-every", "1", "--eval-data", str(data), "--eval-prompts", "0", "--no-bf16", *extra]

    assert main(args(tmp_path / "full", 4)) == 0
    full = tmp_path / "full"
    assert sorted(p.name for p in (full / "on_policy").iterdir()) == ["00000.jsonl", "00001.jsonl"]
    assert all(len(p.read_text().splitlines()) == 2 for p in (full / "on_policy").iterdir())
    assert "2 on-policy" in (full / "train.log").read_text() and "loss tvd" in (full / "train.log").read_text()
    history = json.loads((full / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(0 <= h["tvd"] <= 1 and h["kl"] >= 0 and h["loss"] == h["tvd"] for h in history)
    part = tmp_path / "part"
    assert main(args(part, 2)) == 0  # stops at a refresh: the resumed run generates set 1 with its draft
    assert main(args(part, 4, "--resume")) == 0
    for name, value in _trained(full).items():
        torch.testing.assert_close(_trained(part)[name], value, msg=name)


@pytest.mark.parametrize("command, module, function, result", [
    ("train-draft", "specllava.training.distill", "train_draft", "draft.safetensors"),
    ("train-target", "specllava.training.target", "train_target", "target.safetensors"),
])
def test_training_commands_refuse_earlier_results_unless_resume_or_overwrite(command, module, function, result,
                                                                             tmp_path, capsys, monkeypatch):
    import importlib

    from specllava.training.cli import main

    monkeypatch.setattr(importlib.import_module(module), function, lambda cfg, log: {"eval": {}})
    out = tmp_path / "run"
    out.mkdir()
    argv = [command, "--data", str(make_dataset(tmp_path)), "--out", str(out)]
    assert main(argv) == 0  # a folder without results (e.g. cached answers copied in) is fine
    (out / result).write_bytes(b"")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds the results of an earlier run ({result})" in err and "--overwrite" in err
    assert main(argv + ["--overwrite"]) == 0 and main(argv + ["--resume"]) == 0


@pytest.mark.parametrize("command", ["train-draft", "train-eagle"])
def test_unanswered_data_fails_before_the_target_loads(command, tmp_path, capsys, monkeypatch):
    import specllava.training.distill as distill
    import specllava.training.target as target_mod
    from specllava.training.cli import main

    def must_not_load(*a, **k):
        raise AssertionError("the target loaded before the data was checked")

    monkeypatch.setattr(distill, "load_target", must_not_load)
    monkeypatch.setattr(target_mod, "load_model", must_not_load)
    data = make_dataset(tmp_path, answered=False)
    code = main([command, "--data", str(data), "--out", str(tmp_path / "run")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and str(data) in last and ("no answered records" in last or "no usable training records" in last), last


def test_more_sampled_answers_than_records_answer_each_record_several_times(tmp_path, monkeypatch):
    import specllava.training.answers as answers

    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i}"}]} for i in range(3)]
    asked = {}
    monkeypatch.setattr(answers, "regenerate_answers", lambda t, p, pick, *a, **k: asked.setdefault(len(pick), pick))
    answers.sampled_answers(None, None, records, tmp_path, tmp_path, 2, 0, 8, 2)
    answers.sampled_answers(None, None, records, tmp_path, tmp_path, 8, 0, 8, 2)
    two, eight = asked[2], asked[8]
    assert eight[:2] == two  # the first answers are those of a smaller N (its cache stays valid)
    ids = [r["id"] for r in eight]
    from collections import Counter

    assert len(set(ids)) == 8
    per_record = Counter(i.split("#")[0] for i in ids)
    assert sorted(per_record.values()) == [2, 3, 3]  # two full rounds, then a seeded choice of two
    assert Counter(r["conversations"][0]["value"] for r in eight) == Counter({f"q{k[1]}": v for k, v in per_record.items()})


def test_draft_init_from_a_shipped_file_trains_its_values_and_never_writes_the_target(tmp_path, tiny_models):
    """--draft-init draft.safetensors: the file's tensors, the trained ones as float32 copies; a file
    that carries vocabulary rows of its own gets its own rows (not trained as shared), the target's stay."""
    from safetensors.torch import load_file

    from specllava.training.distill import make_draft, save_draft

    target, processor = tiny_models
    embed_before = target.get_input_embeddings().weight.detach().clone()
    source = build_draft_from_target(copy.deepcopy(target), num_layers=1).float()
    with torch.no_grad():
        for name, p in source.named_parameters():
            if ".layers.0." in name or name.startswith("model.language_model.embed_tokens"):
                p.add_(0.25)
    path = save_draft(source, processor, tmp_path / "own_rows", embeddings_frozen=False)
    stored = load_file(str(path))
    assert "model.language_model.embed_tokens.weight" in stored
    draft, frozen = make_draft(target, DistillConfig(target=None, data=None, draft_init=path))
    assert not frozen  # rows of its own: they train
    state = draft.state_dict()
    for name, value in stored.items():
        assert state[name].dtype == torch.float32 or name.startswith("model.vision_tower."), name
        torch.testing.assert_close(state[name].float(), value.float())
    assert torch.equal(target.get_input_embeddings().weight, embed_before)  # the target is untouched
    for own, theirs in ((draft.get_input_embeddings(), target.get_input_embeddings()),
                        (draft.get_output_embeddings(), target.get_output_embeddings())):
        assert own.weight.data_ptr() != theirs.weight.data_ptr()  # training them cannot write the target
    if draft.config.get_text_config().tie_word_embeddings:
        assert draft.get_output_embeddings().weight is draft.get_input_embeddings().weight
