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
    "string eos_token_id": (lambda ids, px: dict(input_ids=ids, pixel_values=px, eos_token_id="x"),
                            "eos_token_id must be a token id .int., a list of them or None, got 'x'"),
    "float eos_token_id in a list": (lambda ids, px: dict(input_ids=ids, pixel_values=px, eos_token_id=[2, 1.5]),
                                     "eos_token_id must be a token id"),
    "attention_mask of another length": (lambda ids, px: dict(input_ids=ids, pixel_values=px,
                                                              attention_mask=torch.ones(1, ids.shape[1] - 1, dtype=torch.long)),
                                         r"attention_mask must be a tensor of input_ids' shape \(1, \d+\), got \(1, \d+\)"),
    "meta input_ids": (lambda ids, px: dict(input_ids=ids.to("meta"), pixel_values=px), "input_ids is on the meta device"),
    "meta pixel_values": (lambda ids, px: dict(input_ids=ids, pixel_values=px.to("meta")), "pixel_values is on the meta device"),
    "NaN pixel_values": (lambda ids, px: dict(input_ids=ids, pixel_values=px.clone().fill_(float("nan"))),
                         "pixel_values holds NaN or infinite values"),
    "inf pixel_values": (lambda ids, px: dict(input_ids=ids, pixel_values=torch.where(px > 0, float("inf"), px)),
                         "pixel_values holds NaN or infinite values"),
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
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "fifo.png")  # nothing ever writes to it: reading it would block forever
    (root / "loop.png").symlink_to(root / "loop2.png")
    (root / "loop2.png").symlink_to(root / "loop.png")
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
    "image is a FIFO": (G + ["--image", "{d}/fifo.png"], "fifo.png is not a regular file"),
    "image symlink loop": (G + ["--image", "{d}/loop.png"], "cannot open image file .*loop.png: Too many levels of symbolic links"),
    "image empty path": (G + ["--image", ""], "argument --image: the image file path is empty"),
    "target empty path": (G + ["--target", ""], "argument --target: the model path is empty"),
    "bench data is a FIFO": (["bench", "--data", "{d}/fifo.png"], "is not a regular file"),
    "prompt invalid UTF-8": (["generate", "--prompt", "caf\udcc3 \udcff"], "the prompt is not valid UTF-8 .byte 0xc3 at character 3"),
    "seed 1.5": (G + ["--seed", "1.5"], "argument --seed: expected an integer, got '1.5'"),
    "train-eagle seed 2**64": (["train-eagle", "--data", "{d}/data.json", "--seed", str(2**64)],
                               r"argument --seed: must be an integer in \[0, 2\*\*64\)"),
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


@pytest.mark.parametrize("command", ["", "generate", "assemble", "build-data", "train-target", "eval-target",
                                     "ship-default", "train-draft", "train-eagle", "bench", "serve"])
def test_help_imports_nothing_heavy(command):
    """`specllava --help` and every `specllava COMMAND --help` without importing torch or
    transformers (measured: docs/inputs.md)."""
    import subprocess
    import sys

    argv = [command, "--help"] if command else ["--help"]
    code = (f"import sys\nfrom specllava.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not heavy, f'imported {heavy}'\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert ("train-eagle" in out.stdout and "bench" in out.stdout) if not command else f"specllava {command}" in out.stdout


def test_training_help_defaults_are_the_configs():
    """The training commands read their defaults from the config classes' source (for a fast
    --help): each value read equals the imported class's."""
    import dataclasses

    from specllava.training import distill, eagle, target
    from specllava.training.cli import source_defaults

    for module, cls in ((distill, distill.DistillConfig), (eagle, eagle.EagleConfig), (target, target.TargetTrainConfig)):
        read = vars(source_defaults(module.__name__, cls.__name__))
        real = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        assert read == real
    assert source_defaults(distill.__name__, "DRAFT_PRESETS") == distill.DRAFT_PRESETS


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


# ---------------------------------------------------------------------------------------------
# images: one loader (specllava.images) for generate, bench and the server

def _exif_rotated(tmp_path):
    """A 30x20 JPEG stored as 20x30 with the EXIF orientation 'rotate 90 CW to view' (6): its left
    half dark, once upright."""
    upright = np.zeros((20, 30, 3), dtype=np.uint8)
    upright[:, 15:] = 255
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    return path


def _loaders():
    from specllava.images import open_image
    from specllava.serve.protocol import Limits, decode_image

    return {"cli/bench": open_image, "server": lambda path: decode_image(path.read_bytes(), Limits())}


@pytest.mark.parametrize("loader", ["cli/bench", "server"])
def test_images_high_bit_depth_exif_and_alpha(tmp_path, loader):
    load = _loaders()[loader]
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    for name in ("grey16.png", "float.tif"):  # a ramp from black to white, as it looks
        img = np.asarray(load(tmp_path / name), dtype=np.float64)
        assert img.shape == (32, 32, 3) and abs(img.mean() - 127.5) < 2, (name, img.mean())
        assert img[0, 0, 0] == 0 and img[-1, -1, 0] == 255
    upright = np.asarray(load(_exif_rotated(tmp_path)))
    assert upright.shape == (20, 30, 3)  # EXIF orientation applied
    assert upright[:, :10].mean() < 40 and upright[:, 20:].mean() > 215
    assert np.asarray(load(tmp_path / "clear.png")).min() == 255  # transparency on white


def test_generate_and_bench_use_the_shared_loader(monkeypatch, tmp_path):
    import specllava.images as images
    from specllava import cli
    from specllava.bench import harness
    from specllava.bench.prompts import BenchPrompt

    seen = []
    monkeypatch.setattr(images, "open_image", lambda path: seen.append(path) or Image.new("RGB", (4, 4)))
    assert cli._open_image("a.png").size == (4, 4)
    monkeypatch.setattr("specllava.models.hf.chat_inputs", lambda proc, text, image: {"input_ids": torch.ones(1, 3).long()})
    harness.prepare_inputs(None, BenchPrompt(id="p", prompt="x", image=tmp_path / "b.png"), torch.float32, "cpu")
    assert seen == ["a.png", tmp_path / "b.png"]


# ---------------------------------------------------------------------------------------------
# standard output that cannot take the answer; Ctrl-C at any moment

def _env():
    import sys

    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def test_closed_stdout_is_refused_before_loading():
    import subprocess
    import sys

    out = subprocess.run(["sh", "-c", f"exec '{sys.executable}' -m specllava generate --prompt Hi >&-"],
                         capture_output=False, stderr=subprocess.PIPE, text=True, env=_env(), timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ("specllava generate: error: standard output is closed: the output would be lost; "
                                  "redirect it (e.g. > out.txt or > /dev/null)")


def test_output_that_cannot_be_written_is_an_error(monkeypatch, capsys):
    from specllava.cli import run_guarded

    class ClosedPipe:
        def write(self, text):
            return len(text)

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert run_guarded("specllava generate", lambda: print("the answer")) == 1
    assert "standard output was closed before all the output was written" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/PID/maps")
@pytest.mark.parametrize("argv", [["generate", "--prompt", "Hi"], ["train-eagle", "--data", "x.json"]])
def test_ctrl_c_while_starting_is_exit_130_without_a_traceback(argv, tmp_path):
    """Ctrl-C while a command imports torch (its first seconds): one line, exit 130."""
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "x.json").write_text("[]")
    proc = subprocess.Popen([sys.executable, "-m", "specllava", *argv], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:  # wait until torch's library is being loaded
        try:
            if "libtorch" in open(f"/proc/{proc.pid}/maps").read():
                break
        except OSError:
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().endswith("interrupted"), err


def test_prompt_with_the_image_placeholder_is_refused(pair, capsys):
    paths, _ = pair
    code = main(["generate", "--target", str(paths.target_dir), "--method", "ar", "--prompt", "<image> What is it?"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("specllava generate: error: the prompt contains '<image>'"), last


# ---------------------------------------------------------------------------------------------
# results that would be overwritten; training data that cannot be used

def test_bench_refuses_a_non_empty_out_unless_overwrite(tmp_path, capsys, no_loading):
    from specllava.bench import cli as bench_cli
    from specllava.cli import build_parser

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    code = main(["bench", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {out} is not empty" in err and "--overwrite" in err
    bench_cli.check_args(build_parser("bench").parse_args(["bench", "--out", str(out), "--overwrite"]))  # accepted


def test_train_eagle_refuses_earlier_results_unless_resume_or_overwrite(tmp_path, capsys, files, monkeypatch):
    import specllava.training.eagle as eagle

    monkeypatch.setattr(eagle, "train_eagle", lambda cfg, log: {"after": {}, "eval": {}})
    out = tmp_path / "run"
    out.mkdir()
    (out / "eagle_head.safetensors").write_bytes(b"")
    argv = ["train-eagle", "--data", str(files / "data.json"), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds the results of an earlier run (eagle_head.safetensors)" in err and "--overwrite" in err
    assert main(argv + ["--overwrite"]) == 0 and main(argv + ["--resume"]) == 0


def _llava_json(folder, n=2, answered=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        conv = [{"from": "human", "value": "<image>\nDescribe."}] + ([{"from": "gpt", "value": f"Dots {i}."}] if answered else [])
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": conv})
    (folder / "data.json").write_text(json.dumps(records))
    return folder / "data.json"


def test_train_eagle_features_follow_the_data(pair, tmp_path):
    """A features.pt of other data is computed again, a foreign one is refused by name, and data
    without a single answer is refused before training (not a ZeroDivisionError)."""
    from specllava.training.common import load_records
    from specllava.training.eagle import extract_features

    paths, models = pair
    cache = tmp_path / "features.pt"
    first, root1 = load_records(_llava_json(tmp_path / "a", n=2))
    second, root2 = load_records(_llava_json(tmp_path / "b", n=3))
    a = extract_features(models.target, models.processor, [(r, root1) for r in first], cache)
    b = extract_features(models.target, models.processor, [(r, root2) for r in second], cache, log=lambda m: None)
    assert (len(a), len(b)) == (2, 3)
    again = extract_features(models.target, models.processor, [(r, root2) for r in second], cache)
    assert [torch.equal(x["feats"], y["feats"]) for x, y in zip(again, b)] == [True] * 3  # reused
    import pickle

    cache.write_bytes(pickle.dumps(object()))
    with pytest.raises(ValueError, match="features.pt is not a features file written by train-eagle .*delete it"):
        extract_features(models.target, models.processor, [(r, root2) for r in second], cache)


def test_train_eagle_on_unusable_data_names_the_data(pair, tmp_path, capsys):
    from specllava.training.cli import main as training_main

    paths, _ = pair
    data = _llava_json(tmp_path / "d", n=2)
    for png in (tmp_path / "d").glob("*.png"):
        png.unlink()  # every record's image is missing
    code = training_main(["train-eagle", "--target", str(paths.target_dir), "--data", str(data), "--out",
                          str(tmp_path / "run"), "--steps", "1", "--no-bf16"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"specllava train-eagle: error: no usable training records in {data}"), last


@pytest.mark.parametrize("command", ["train-draft", "train-eagle"])
def test_training_data_that_is_not_json_is_named(command, tmp_path, capsys, monkeypatch):
    import specllava.training.target as target_mod

    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1,')
    monkeypatch.setattr(target_mod, "load_model", lambda *a, **k: (torch.nn.Linear(1, 1), None))
    import specllava.training.distill as distill

    monkeypatch.setattr(distill, "load_target", lambda *a, **k: (None, None), raising=False)
    code = main([command, "--data", str(broken), "--out", str(tmp_path / "run")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"{broken} is not valid JSON" in last, last


# ---------------------------------------------------------------------------------------------
# models that cannot load: one line, at once

def test_unknown_model_type_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    code = main(["generate", "--target", str(tmp_path), "--method", "ar", "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "has model_type 'no-such-architecture', which transformers" in err and "upgrade transformers" in err


def test_unreachable_hub_fails_at_once_in_one_line(monkeypatch, capsys):
    import time

    import specllava.models.hf as hf

    monkeypatch.setattr(hf, "hub_unreachable", lambda: "huggingface.co: Name or service not known")
    t = time.perf_counter()
    code = main(["generate", "--target", "nobody/no-such-model", "--method", "ar", "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Retrying" not in err, err
    assert "the hub cannot be reached (huggingface.co: Name or service not known)" in err
    assert "huggingface-cli download nobody/no-such-model" in err
    assert time.perf_counter() - t < 10  # no retries (about 30 s of them otherwise)
