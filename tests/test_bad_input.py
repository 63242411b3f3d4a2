"""Bad input gets one clear error before any work; unusual but valid input works.

Each case here is a row of docs/inputs.md: the API's ValueErrors (`SpeculativeDecoder`), the
command line's parse-time refusals (exit 2, one line, nothing loaded), its runtime failures
(exit 1, one line, no traceback unless --debug), and text-only prompts with every method and
every kind of draft, exact against `target.generate()`.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from random_models import VOCAB, llava_prompt, perturbed_copy, text_prompt, tiny_lm, tiny_llava
from specllava import SpeculativeDecoder
from specllava.cli import main
from specllava.core.eagle import EagleHead


@pytest.fixture(scope="module")
def target():
    return tiny_llava(0)


@pytest.fixture(scope="module")
def drafts(target):
    torch.manual_seed(5)
    head = EagleHead.from_target(target, token_ranking=list(range(40)))
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {
        "vlm": perturbed_copy(target, 0.05, seed=1),
        "text-only": tiny_lm(77, hidden=32, layers=1),
        "eagle-head": head.eval(),
    }


# ---------------------------------------------------------------------------------------------
# text-only prompts: every method, every kind of draft, exact vs target.generate()

@pytest.mark.parametrize("draft_kind", ["vlm", "text-only", "eagle-head"])
@pytest.mark.parametrize("method", ["ar", "chain", "static", "dynamic"])
def test_text_only_prompt_is_exact(target, drafts, draft_kind, method):
    ids = text_prompt(3, length=10)
    with torch.inference_mode():
        ref = target.generate(input_ids=ids, max_new_tokens=24, do_sample=False)
    dec = SpeculativeDecoder(target, None if method == "ar" else drafts[draft_kind], method=method)
    out = dec.generate(input_ids=ids, max_new_tokens=24)
    assert out.sequences.tolist() == ref.tolist()
    if method != "ar":
        assert out.stats["draft_forwards"] > 0


@pytest.mark.parametrize("draft_kind", ["vlm", "text-only", "eagle-head"])
def test_text_only_prompt_samples(target, drafts, draft_kind):
    """At T>0 a text-only prompt decodes too (losslessness itself is tested with images elsewhere)."""
    ids = text_prompt(4, length=10)
    out = SpeculativeDecoder(target, drafts[draft_kind], method="dynamic").generate(
        input_ids=ids, max_new_tokens=16, do_sample=True, temperature=1.0, seed=0)
    assert out.sequences.shape == (1, 26)


# ---------------------------------------------------------------------------------------------
# the API: SpeculativeDecoder refuses bad input with a ValueError naming it

API_CASES = {
    "float input_ids": (lambda ids, px: dict(input_ids=ids.float(), pixel_values=px), "integer token ids"),
    "input_ids above the vocabulary": (lambda ids, px: dict(input_ids=ids.clone().fill_(VOCAB + 7), pixel_values=None),
                                       r"out of range: token ids must be in \[0, 96\)"),
    "negative input_ids": (lambda ids, px: dict(input_ids=-ids, pixel_values=None), "out of range"),
    "1-D input_ids": (lambda ids, px: dict(input_ids=ids[0], pixel_values=px), r"shape \[1, prompt_len\]"),
    "3-D pixel_values": (lambda ids, px: dict(input_ids=ids, pixel_values=px[0]), r"\[1, channels, height, width\]"),
    "integer pixel_values": (lambda ids, px: dict(input_ids=ids, pixel_values=px.long()), "float tensor"),
    "float max_new_tokens": (lambda ids, px: dict(input_ids=ids, pixel_values=px, max_new_tokens=2.5), "integer >= 1"),
    "string max_new_tokens": (lambda ids, px: dict(input_ids=ids, pixel_values=px, max_new_tokens="8"), "integer >= 1"),
    "negative max_new_tokens": (lambda ids, px: dict(input_ids=ids, pixel_values=px, max_new_tokens=-5), ">= 1, got -5"),
    "prompt fills the context": (lambda ids, px: dict(input_ids=torch.full((1, 512), 5)), "context holds 512"),
    "negative top_k": (lambda ids, px: dict(input_ids=ids, pixel_values=px, do_sample=True, top_k=-3), "top_k"),
    "top_p above 1": (lambda ids, px: dict(input_ids=ids, pixel_values=px, do_sample=True, top_p=1.5), "top_p"),
    "string temperature": (lambda ids, px: dict(input_ids=ids, pixel_values=px, do_sample=True, temperature="hot"),
                           "temperature must be a number, got 'hot'"),
    "float top_k": (lambda ids, px: dict(input_ids=ids, pixel_values=px, do_sample=True, top_k=2.5),
                    "top_k must be an integer, got 2.5"),
    "string seed": (lambda ids, px: dict(input_ids=ids, pixel_values=px, seed="x"), "seed must be an integer or None"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_refuses(target, drafts, case):
    make_kwargs, message = API_CASES[case]
    ids, px = llava_prompt(0)
    with pytest.raises(ValueError, match=message):
        SpeculativeDecoder(target, drafts["text-only"], method="dynamic").generate(**make_kwargs(ids, px))


@pytest.mark.parametrize("draft_vocab", [2.5, True, torch.tensor([1.0, 2.0])], ids=["float", "bool", "float-tensor"])
def test_api_refuses_a_draft_vocab_that_is_not_an_int(target, drafts, draft_vocab):
    with pytest.raises(ValueError, match="draft_vocab must be 'auto', None, an int or a LongTensor"):
        SpeculativeDecoder(target, drafts["text-only"], method="dynamic", draft_vocab=draft_vocab)


def test_api_integer_likes_are_fine(target):
    ids, px = llava_prompt(0)
    out = SpeculativeDecoder(target, None, method="ar").generate(input_ids=ids.int(), pixel_values=px,
                                                                  max_new_tokens=torch.tensor(3))
    assert out.stats["new_tokens"] == 3


def test_api_caps_max_new_tokens_at_the_context(target, drafts):
    """prompt + max_new_tokens past the context: a warning, and the tokens that fit (as generate() gives them)."""
    ids = text_prompt(5, length=500)
    with torch.inference_mode():
        ref = target.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    with pytest.warns(UserWarning, match="generating at most 12"):
        out = SpeculativeDecoder(target, drafts["vlm"], method="dynamic").generate(input_ids=ids, max_new_tokens=100)
    assert out.sequences.tolist() == ref.tolist()


@pytest.mark.parametrize("bad, role", [(None, "target"), ("a/path", "target")])
def test_api_target_must_be_a_model(bad, role):
    with pytest.raises(ValueError, match=f"{role} must be a loaded model"):
        SpeculativeDecoder(bad, None, method="ar")


def test_api_draft_must_be_a_model(target):
    with pytest.raises(ValueError, match="draft must be a loaded model"):
        SpeculativeDecoder(target, "HuggingFaceTB/SmolLM2-135M", method="chain")


def test_api_refuses_meta_weights(target):
    with torch.device("meta"):
        meta = tiny_lm(1, hidden=32, layers=1)
    with pytest.raises(ValueError, match="draft's weights are on the meta device"):
        SpeculativeDecoder(target, meta, method="chain")
    with pytest.raises(ValueError, match="target's weights are on the meta device"):
        SpeculativeDecoder(meta, None, method="ar")


TREE_CASES = {
    "max_depth=2.5": (dict(max_depth=2.5), "TreeConfig.max_depth must be an integer"),
    "max_depth=abc": (dict(max_depth="abc"), "TreeConfig.max_depth must be an integer"),
    "max_depth=0": (dict(max_depth=0), "TreeConfig.max_depth must be >= 1"),
    "child_mass=abc": (dict(child_mass="abc"), "TreeConfig.child_mass must be a number"),
    "child_mass=nan": (dict(child_mass=float("nan")), r"TreeConfig.child_mass must be in \(0, 1\]"),
    "choices without a parent": (dict(choices=[[0], [1, 0]]), "TreeConfig.choices: .* has no parent"),
    "choices not paths": (dict(choices=[1, 2]), "TreeConfig.choices must be a non-empty list of paths"),
}


@pytest.mark.parametrize("case", list(TREE_CASES))
def test_api_refuses_bad_tree_options(target, drafts, case):
    options, message = TREE_CASES[case]
    with pytest.raises(ValueError, match=message):
        SpeculativeDecoder(target, drafts["text-only"], method="dynamic", **options)


def test_api_refuses_static_ranks_beyond_the_draft_vocabulary(target, drafts):
    with pytest.raises(ValueError, match="static tree choices use draft rank 200"):
        SpeculativeDecoder(target, drafts["text-only"], method="static", choices=[[0], [200]])
    with pytest.raises(ValueError, match="draft rank 20, but the draft proposes from 16"):
        SpeculativeDecoder(target, drafts["text-only"], method="static", choices=[[20]], draft_vocab=16)


# ---------------------------------------------------------------------------------------------
# the command line: bad arguments refused while parsing (exit 2, one line, nothing loaded)



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad inputs on disk: images, a model-like folder, plain files."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "ok.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "big.jpg", quality=95)
    data = (root / "big.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("not an image")
    (root / "bomb.png").write_bytes(_png_header_only(14000, 14000))
    (root / "adir").mkdir()
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    (root / "data.json").write_text("[]")
    return root


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its data is 8x8): what PIL's pixel cap reads, in bytes."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    ihdr = png[12:29]  # chunk type + data
    ihdr[4:12] = struct.pack(">II", width, height)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(png)


@pytest.fixture
def no_loading(monkeypatch):
    """Any model loading fails the test: the refusals come before it."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the bad argument was refused")

    monkeypatch.setattr("specllava.models.hf.load_pair", boom)
    monkeypatch.setattr("specllava.models.hf.load_model", boom)


def usage_error(argv, capsys) -> str:
    """Run the CLI, expect exit status 2 and exactly one line on stderr; return that line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


G = ["generate", "--prompt", "Describe this image."]
PARSE_CASES = {  # argv (with {d} = the files folder) -> what the one line says
    "temperature -1": (G + ["--temperature", "-1"], "argument --temperature: must be >= 0"),
    "temperature nan": (G + ["--temperature", "nan"], "expected a finite number"),
    "top-p 0": (G + ["--top-p", "0"], r"argument --top-p: must be in \(0, 1\]"),
    "top-p 1.5": (G + ["--top-p", "1.5"], r"argument --top-p: must be in \(0, 1\]"),
    "top-k -3": (G + ["--top-k", "-3"], "argument --top-k: must be >= 0, got -3"),
    "max-new-tokens 0": (G + ["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    "max-new-tokens -5": (G + ["--max-new-tokens", "-5"], "must be >= 1, got -5"),
    "max-new-tokens 2.5": (G + ["--max-new-tokens", "2.5"], "expected an integer, got '2.5'"),
    "threads 0": (G + ["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    "threads -1": (G + ["--threads", "-1"], "argument --threads: must be >= 1, got -1"),
    "draft-vocab 0": (G + ["--draft-vocab", "0"], "argument --draft-vocab: must be >= 1"),
    "budget 0": (G + ["--budget", "0"], "argument --budget: must be >= 1"),
    "empty prompt": (["generate", "--prompt", "  "], "argument --prompt: the prompt is empty"),
    "tree-option child_mass=abc": (G + ["--tree-option", "child_mass=abc"], "tree option child_mass takes a number, got 'abc'"),
    "tree-option max_depth=2.5": (G + ["--tree-option", "max_depth=2.5"], "tree option max_depth takes an integer, got '2.5'"),
    "tree-option max_depth=abc": (G + ["--tree-option", "max_depth=abc"], "tree option max_depth takes an integer"),
    "tree-option child_mass=2": (G + ["--tree-option", "child_mass=2"], r"child_mass=2: TreeConfig.child_mass must be in \(0, 1\]"),
    "tree-option no value": (G + ["--tree-option", "node_budget"], "must look like NAME=VALUE"),
    "tree-option unknown": (G + ["--tree-option", "depth=3"], "unknown tree option 'depth'"),
    "tree-option bad choices": (G + ["--tree-option", "choices=[[0],[1,1]]"], "has no parent"),
    "image is a directory": (G + ["--image", "{d}/adir"], "is a directory, not an image file"),
    "image missing": (G + ["--image", "{d}/missing.png"], "image file not found"),
    "image truncated": (G + ["--image", "{d}/truncated.jpg"], "cannot decode image file .*truncated"),
    "image not an image": (G + ["--image", "{d}/notes.txt"], "not an image file PIL can read"),
    "image 14000x14000": (G + ["--image", "{d}/bomb.png"], "over the cap of 89,478,485 pixels .*MAX_IMAGE_PIXELS"),
    "target is a file": (G + ["--target", "{d}/notes.txt"], "is a file; give the model's folder"),
    "target folder without config": (G + ["--target", "{d}/adir"], "has no config.json"),
    "target path missing": (G + ["--target", "{d}/nowhere"], "model folder not found"),
    "draft is a text file": (G + ["--draft", "{d}/notes.txt"], "not an EAGLE head"),
    "unknown method": (G + ["--method", "beam"], "invalid choice: 'beam'"),
    "bench temperature 0 -1": (["bench", "--temperature", "0", "-1"], "argument --temperature: must be >= 0, got -1"),
    "bench data missing": (["bench", "--data", "{d}/missing.json"], "argument --data: file not found"),
    "bench image-root missing": (["bench", "--image-root", "{d}/nowhere"], "folder not found"),
    "bench limit 0": (["bench", "--limit", "0"], "argument --limit: must be >= 1"),
    "bench repeats 0": (["bench", "--repeats", "0"], "argument --repeats: must be >= 1"),
    "bench variant max_depth=abc": (["bench", "--variant", "v=dynamic:max_depth=abc"], "tree option max_depth takes an integer"),
    "build-data limit 0": (["build-data", "--limit-clipart", "0"], "argument --limit-clipart: must be >= 1"),
    "build-data test-fraction 1.5": (["build-data", "--test-fraction", "1.5"], r"must be in \[0, 1\)"),
    "build-data clipart-root missing": (["build-data", "--clipart-root", "{d}/nowhere"], "folder not found"),
    "train-draft data missing": (["train-draft", "--data", "{d}/missing.json"], "argument --data: file not found"),
    "train-draft target is a file": (["train-draft", "--data", "{d}/data.json", "--target", "{d}/notes.txt"],
                                     "is a file; give the model.s folder"),
    "train-eagle data missing": (["train-eagle", "--data", "{d}/missing.json"], "argument --data: file not found"),
    "train-target threads 0": (["train-target", "--threads", "0"], "argument --threads: must be >= 1"),
    "train-target checkpoint-every 0": (["train-target", "--checkpoint-every", "0"], "must be >= 1, got 0"),
    "train-draft lr -1": (["train-draft", "--data", "{d}/data.json", "--lr", "-1"], "argument --lr: must be > 0"),
    "train-eagle held-out-fraction 1": (["train-eagle", "--data", "{d}/data.json", "--held-out-fraction", "1"],
                                        r"must be in \[0, 1\)"),
    "eval-target weights missing": (["eval-target", "--weights", "{d}/w.safetensors", "--out", "{d}/r.json"],
                                    "argument --weights: file not found"),
    "ship-default draft-run missing": (["ship-default", "--draft-run", "{d}/nowhere"], "folder not found"),
}


@pytest.mark.parametrize("case", list(PARSE_CASES))
def test_cli_refuses_while_parsing(case, files, capsys, no_loading):
    argv, message = PARSE_CASES[case]
    line = usage_error([a.replace("{d}", str(files)) for a in argv], capsys)
    assert re.search(message, line), line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_cli_refuses_an_unreadable_image(files, capsys, no_loading, tmp_path):
    img = tmp_path / "secret.png"
    img.write_bytes((files / "ok.png").read_bytes())
    img.chmod(0)
    assert "permission denied" in usage_error(G + ["--image", str(img)], capsys)


@pytest.mark.parametrize("name", ["ok.png", "big.jpg"])  # over the cap; over twice the cap (PIL's own error)
def test_cli_refuses_an_image_over_the_pixel_cap(files, capsys, no_loading, monkeypatch, name):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        line = usage_error(G + ["--image", str(files / name)], capsys)
    assert "over the cap of 1,000 pixels" in line and "MAX_IMAGE_PIXELS" in line


@pytest.mark.parametrize("argv, message", [
    (G + ["--method", "chain", "--budget", "auto"], "--budget auto calibrates the dynamic tree"),
    (["bench", "--variant", "e=dynamic:draft=eagle"], "pass the head with --eagle PATH"),
    (["bench", "--variant", "o=dynamic:draft=other"], "pass the second draft model with --other-draft DIR"),
], ids=["budget-auto-chain", "variant-eagle", "variant-other"])
def test_cli_refuses_before_loading(argv, message, capsys, no_loading, tmp_path):
    """Checks across arguments: still exit 2 and one line, and still before any model loads."""
    out = tmp_path / "out"
    code = main(argv + (["--out", str(out)] if argv[0] == "bench" else []))
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # bench leaves no empty output folder


def test_cli_runtime_failure_is_one_line_exit_1(capsys, monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    monkeypatch.setattr("specllava.models.hf.load_pair", fail)
    assert main(G) == 1
    err = capsys.readouterr().err
    assert err.strip() == "specllava generate: error: CUDA out of memory. Tried to allocate 20.00 GiB more detail"
    with pytest.raises(RuntimeError, match="CUDA out of memory"):  # --debug, anywhere: the traceback
        main(G + ["--debug"])


def test_cli_missing_file_at_runtime_is_one_line(capsys, monkeypatch):
    def fail(*a, **k):
        raise FileNotFoundError(2, "No such file or directory", "/cache/target/model.safetensors")

    monkeypatch.setattr("specllava.models.hf.load_pair", fail)
    assert main(G) == 1
    assert capsys.readouterr().err.strip() == (
        "specllava generate: error: No such file or directory: /cache/target/model.safetensors")


def test_cli_ctrl_c_before_decoding(capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("specllava.models.hf.load_pair", interrupted)
    assert main(G) == 130
    err = capsys.readouterr().err
    assert "specllava generate: interrupted" in err and "Traceback" not in err


def test_top_level_help_imports_nothing_heavy():
    """`specllava --help` lists every command without importing torch (measured: docs/inputs.md)."""
    import subprocess
    import sys

    code = ("import sys\nfrom specllava.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "train-eagle" in out.stdout and "bench" in out.stdout


def test_command_table_matches_the_modules():
    """The lazy top-level listing (cli.COMMANDS) names every command with its module's own help line,
    and the constants the parsers use without importing torch equal the core's."""
    from specllava import cli
    from specllava.bench import cli as bench_cli
    from specllava.bench.methods import ALL_METHODS
    from specllava.core.config import METHODS, TreeConfig
    from specllava.core.quant import QUANT_CHOICES

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert helps == {name: help_line for name, (_, help_line) in cli.COMMANDS.items()}
    assert cli.METHODS == METHODS and cli.QUANT_CHOICES == QUANT_CHOICES
    assert cli.TREE_FIELDS == tuple(TreeConfig.__dataclass_fields__) and bench_cli.ALL_METHODS == ALL_METHODS
    from specllava import options
    from specllava.models.options import DTYPES

    assert options.DTYPE_CHOICES == ("auto", *DTYPES)


# ---------------------------------------------------------------------------------------------
# the command line end to end on a tiny assembled pair: unusual but valid input works

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tiny_llava import tiny_sources

    from specllava.models.assemble import assemble_models, load_models

    root = tmp_path_factory.mktemp("pair")
    (root / "no-assets").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = assemble_models(root / "cache", tiny_sources(), assets_dir=root / "no-assets")
        return paths, load_models(paths)


def reference_tokens(models, prompt: str, image=None, max_new_tokens=10) -> list[int]:
    from specllava.models.hf import chat_inputs

    inputs = chat_inputs(models.processor, prompt, image)
    with torch.inference_mode():
        ref = models.target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return ref[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("method", ["chain", "static", "dynamic"])
def test_cli_text_only_prompt_is_exact(pair, capsys, method):
    paths, models = pair
    code = main(["generate", "--target", str(paths.target_dir), "--draft", str(paths.draft_dir), "--prompt",
                 "Tell me a story.", "--method", method, "--max-new-tokens", "10", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == reference_tokens(models, "Tell me a story.")


def test_cli_draft_alone_drafts_for_the_default_target(pair, capsys, monkeypatch):
    """--draft DIR without --target: the default target (here stood in for by the tiny one) with that draft."""
    from types import SimpleNamespace

    import specllava.models as models_pkg

    paths, models = pair
    asked = {}

    def default_models(dtype=None, draft=True):
        asked["draft"] = draft
        return SimpleNamespace(target=models.target, draft=None, processor=models.processor,
                               paths=SimpleNamespace(trained={"target": False, "draft": False}))

    monkeypatch.setattr(models_pkg, "load_default_models", default_models)
    code = main(["generate", "--draft", str(paths.draft_dir), "--prompt", "Hi", "--max-new-tokens", "10", "--json"])
    assert code == 0 and asked == {"draft": False}  # the default draft is not loaded
    assert json.loads(capsys.readouterr().out)["tokens"] == reference_tokens(models, "Hi")


def test_cli_prompt_longer_than_the_context(pair, capsys):
    paths, models = pair
    context = models.target.config.text_config.max_position_embeddings
    code = main(["generate", "--target", str(paths.target_dir), "--method", "ar", "--prompt", "word " * context])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after transformers' loading bar
    assert code == 2 and "Traceback" not in err
    assert last.startswith("specllava generate: error: the prompt has") and f"context holds {context}" in last


def test_cli_max_new_tokens_past_the_context_is_capped(pair, capsys):
    paths, models = pair
    context = models.target.config.text_config.max_position_embeddings
    code = main(["generate", "--target", str(paths.target_dir), "--draft", str(paths.draft_dir), "--prompt", "Hi",
                 "--max-new-tokens", str(10 * context), "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and "specllava generate: warning: max_new_tokens=" in err and "generating at most" in err
    assert "Traceback" not in err and "warnings.warn" not in err
    n = json.loads(out)["stats"]["new_tokens"]
    assert n <= context


def test_cli_ctrl_c_keeps_what_was_streamed(pair, capsys, monkeypatch):
    from transformers import TextStreamer

    paths, _ = pair
    put = TextStreamer.put
    calls = []

    def put_then_interrupt(self, value):
        calls.append(1)
        if len(calls) == 4:  # the prompt, the first token, two verification steps: then Ctrl-C
            raise KeyboardInterrupt
        put(self, value)

    monkeypatch.setattr(TextStreamer, "put", put_then_interrupt)
    code = main(["generate", "--target", str(paths.target_dir), "--draft", str(paths.draft_dir), "--prompt", "Hi",
                 "--max-new-tokens", "40", "--method", "chain"])
    out, err = capsys.readouterr()
    assert code == 130 and "specllava generate: interrupted" in err and "Traceback" not in err
    # the text accepted before Ctrl-C was printed (this tiny model's text is newlines, one per token), and no more
    assert 2 <= out.count("\n") < 40


def test_assemble_print_dir_prints_only_the_folder(capsys, monkeypatch, tmp_path):
    from specllava.models import assemble

    paths = assemble.AssembledModels(target_dir=tmp_path / "target", draft_dir=tmp_path / "draft",
                                     manifest={"trained": {"target": True, "draft": True}})
    monkeypatch.setattr(assemble, "assemble_default_models", lambda cache_dir=None, force=False: paths)
    assert main(["assemble", "--print-dir"]) == 0
    assert capsys.readouterr().out == f"{tmp_path}\n"
