"""`specllava generate` end to end on a tiny assembled LLaVA pair saved to disk."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from specllava.cli import main
from specllava.models.assemble import load_models
from specllava.models.hf import chat_inputs


@pytest.fixture(scope="module")
def pair(assembled_pair, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = load_models(assembled_pair, dtype=torch.float32)
    img = tmp_path_factory.mktemp("cli") / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(img)
    return assembled_pair, models, img


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_equals_target_generate(pair, capsys):
    paths, models, img = pair
    code, out, _ = run_cli(
        ["generate", "--dtype", "float32", "--target", str(paths.target_dir), "--draft", str(paths.draft_dir), "--image", str(img),
         "--prompt", "Describe this image.", "--max-new-tokens", "12", "--json"],
        capsys,
    )
    assert code == 0
    result = json.loads(out)
    assert {"text", "tokens", "stats"} <= set(result)
    assert {"new_tokens", "target_forwards", "draft_forwards", "mean_accepted", "accept_hist"} <= set(result["stats"])
    inputs = chat_inputs(models.processor, "Describe this image.", Image.open(img).convert("RGB"))
    with torch.inference_mode():
        ref = models.target.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert result["tokens"] == ref[0, inputs["input_ids"].shape[1]:].tolist()


def test_generate_streams_text_to_stdout_and_stats_to_stderr(pair, capsys):
    paths, _, img = pair
    code, out, err = run_cli(
        ["generate", "--dtype", "float32", "--target", str(paths.target_dir), "--draft", str(paths.draft_dir), "--image", str(img),
         "--prompt", "Hi", "--max-new-tokens", "8", "--method", "chain"],
        capsys,
    )
    assert code == 0
    assert "mean accepted length" in err and "[chain] 8 tokens" in err
    assert "mean accepted length" not in out


def test_generate_clear_errors(pair, capsys):
    paths, _, img = pair
    with pytest.raises(SystemExit) as exc:  # refused while parsing the arguments, before any loading
        main(["generate", "--dtype", "float32", "--target", str(paths.target_dir), "--image", "missing.png", "--prompt", "x"])
    assert exc.value.code == 2 and "image file not found: missing.png" in capsys.readouterr().err
    code, _, err = run_cli(["generate", "--dtype", "float32", "--target", str(paths.target_dir), "--image", str(img), "--prompt", "x"], capsys)
    assert code == 2 and "--method dynamic (or use --method ar) needs --draft" in err
    with pytest.raises(SystemExit):
        main(["generate", "--dtype", "float32", "--prompt", "x", "--tree-option", "node_budget"])


def test_generate_budget_auto_calibrates_once_and_stays_exact(pair, capsys, tmp_path, monkeypatch):
    from specllava.tuning import budget

    monkeypatch.setattr(budget, "CACHE_DIR", tmp_path / "calibration")
    paths, models, img = pair
    args = ["generate", "--dtype", "float32", "--target", str(paths.target_dir), "--draft", str(paths.draft_dir), "--image", str(img),
            "--prompt", "Describe this image.", "--max-new-tokens", "10", "--json", "--budget", "auto"]
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "--budget auto: node_budget = " in err
    assert len(list((tmp_path / "calibration").glob("*.json"))) == 2  # cost curve + acceptance profile
    inputs = chat_inputs(models.processor, "Describe this image.", Image.open(img).convert("RGB"))
    with torch.inference_mode():
        ref = models.target.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert json.loads(out)["tokens"] == ref[0, inputs["input_ids"].shape[1]:].tolist()
    code, _, err = run_cli(args[:-2] + ["--method", "chain", "--budget", "auto"], capsys)
    assert code == 2 and "--budget auto calibrates the dynamic tree" in err


# ---------------------------------------------------------------------------------------------
# one set of decoding options (specllava.options) for generate, serve and bench

def _flags(command: str) -> dict:
    from specllava.cli import build_parser

    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.option_strings[0]: a for a in sub._actions if a.option_strings}


SHARED = ["--target", "--draft", "--draft-vocab", "--draft-quant", "--tree-option", "--budget",
          "--dtype", "--device", "--device-map", "--attn-implementation"]


@pytest.mark.parametrize("command, flags", [("serve", SHARED + ["--method"]),
                                            ("bench", SHARED + ["--max-new-tokens", "--top-k", "--top-p"])])
def test_decoding_flags_are_declared_once(command, flags):
    """generate, serve and bench declare the shared flags through specllava.options: the same check
    (type), default and choices, so they cannot drift (serve has --draft-vocab, every --target is
    checked by cli_args.model_source)."""
    gen, other = _flags("generate"), _flags(command)
    for flag in flags:
        a, b = gen[flag], other[flag]
        assert (a.type, a.default, a.choices, a.nargs) == (b.type, b.default, b.choices, b.nargs), flag
    assert _flags("train-draft")["--target"].type is gen["--target"].type


def test_options_round_trip_and_reach_the_decoder(pair):
    from specllava.cli import build_parser
    from specllava.options import DecodingOptions

    paths, _, img = pair
    args = build_parser("generate").parse_args(
        ["generate", "--prompt", "x", "--method", "chain", "--draft-vocab", "16", "--draft-quant", "none",
         "--tree-option", "chain_length=3", "--budget", "9", "--temperature", "0.5", "--seed", "7"])
    opts = DecodingOptions.from_args(args)
    assert opts == DecodingOptions(method="chain", draft_vocab=16, draft_quant="none", tree_options=(("chain_length", 3),),
                                   budget=9, temperature=0.5, seed=7)
    assert opts.decoder_kwargs() == {"method": "chain", "draft_vocab": 16, "draft_quant": "none"}
    assert DecodingOptions().decoder_kwargs()["draft_vocab"] == "auto"  # a server's decoder: greedy and sampled


def test_serve_takes_draft_vocab(pair):
    from specllava.cli import build_parser
    from specllava.serve.cli import build

    paths, _, _ = pair
    args = build_parser("serve").parse_args(["serve", "--target", str(paths.target_dir), "--draft", str(paths.draft_dir),
                                             "--dtype", "float32", "--draft-vocab", "16"])
    _, engine = build(args)
    try:
        decoder = engine.decoder
        assert decoder.draft_vocab is not None and len(decoder.draft_vocab) <= 16  # 16 ids, less the image token
    finally:
        engine.close()


def test_seeds_are_mixed_whole():
    """Every integer seed has a stream of its own: 2**64 is not seed 0, -1 is not 2**64 - 1; the
    seeds in [0, 2**64) keep their SplitMix64 values."""
    from specllava.core.sampling import mix_seed, request_generator

    def splitmix64(x):
        m = 2**64 - 1
        x = (x + 0x9E3779B97F4A7C15) & m
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return (x ^ (x >> 31)) & (2**63 - 1)

    for seed in (0, 1, 2, 12345, 2**63, 2**64 - 1):
        assert mix_seed(seed) == splitmix64(seed)
    seeds = [0, 2**64, 2**65, 2**128, -1, 2**64 - 1, -(2**64), 1, 2**64 + 1]
    assert len({mix_seed(s) for s in seeds}) == len(seeds)
    draws = {s: torch.rand(4, generator=request_generator(s)).tolist() for s in seeds}
    assert len({tuple(d) for d in draws.values()}) == len(seeds)


def test_generate_takes_any_integer_seed(pair, capsys):
    """--seed 2**64 and -1 are seeds like any other: reproducible, and not seed 0's sample."""
    paths, _, _ = pair
    base = ["generate", "--dtype", "float32", "--target", str(paths.target_dir), "--draft", str(paths.draft_dir),
            "--prompt", "Hi", "--max-new-tokens", "24", "--json", "--temperature", "1"]
    tokens = []
    for seed in (2**64, 2**64, 0, -1):
        code, out, _ = run_cli(base + [f"--seed={seed}"], capsys)
        assert code == 0
        tokens.append(json.loads(out)["tokens"])
    assert tokens[0] == tokens[1]  # reproducible
    assert tokens[0] != tokens[2]  # 2**64 is not seed 0 (24 tokens at T=1 from a random model: they differ)
