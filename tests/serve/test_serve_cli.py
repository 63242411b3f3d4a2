"""`specllava serve` itself: its flags and defaults, a real process on the tiny pair, and the
default pair behind the same code the command runs."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from serve_helpers import free_port, image_bytes, user

from specllava.cli import build_parser

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_defaults_are_those_of_specllava_generate():
    args = build_parser().parse_args(["serve"])
    gen = build_parser().parse_args(["generate", "--prompt", "x"])
    assert (args.target, args.draft, args.method, args.draft_quant) == (gen.target, gen.draft, gen.method, gen.draft_quant)
    assert (args.method, args.dtype, args.host, args.port, args.max_batch) == ("dynamic", "auto", "127.0.0.1", 8000, 8)
    assert not args.allow_remote_images


@pytest.mark.parametrize("flag", ["--max-batch=0", "--max-queue=-1", "--request-timeout=0", "--max-tokens=x",
                                  "--port=70000", "--target=/no/such/folder"])
def test_bad_flags_are_refused(flag, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", flag])
    assert flag.split("=")[0] in capsys.readouterr().err


def test_tree_options_and_budget_reach_every_decoder(tiny_paths, monkeypatch):
    from specllava.serve.cli import build

    args = build_parser().parse_args(["serve", "--target", str(tiny_paths.target_dir), "--draft", str(tiny_paths.draft_dir),
                                      "--dtype", "float32", "--max-batch", "2", "--tree-option", "max_depth=3",
                                      "--tree-option", "node_budget=40", "--budget", "7"])
    _, engine = build(args)
    try:
        assert (engine.decoder.config.max_depth, engine.decoder.config.node_budget, engine.max_batch) == (3, 7, 2)
    finally:
        engine.close()


def test_budget_auto_sizes_each_requests_tree_by_the_batch(tiny_paths, monkeypatch):
    """--budget auto with --max-batch N: the decoder gets a node budget per batch size from the same
    calibration (a lone request keeps --budget auto's own); with --max-batch 1 it gets none."""
    import specllava.tuning.budget as budget
    from specllava.serve.cli import build

    seen = {}
    monkeypatch.setattr(budget, "auto_node_budget", lambda *a, **k: (9, {}))
    monkeypatch.setattr(budget, "verify_cost_curve", lambda target: "cost")
    monkeypatch.setattr(budget, "acceptance_profile", lambda *a, **k: seen.update(args=a, kwargs=k) or "profile")
    monkeypatch.setattr(budget, "measure_batch_rest", lambda target, draft, inp, prof, opts, sizes, **k:
                        seen.update(rest_sizes=list(sizes)) or {b: 0.001 * b for b in sizes})
    monkeypatch.setattr(budget, "batch_node_budgets", lambda cost, prof, sizes, rest: {b: 12 // b for b in sizes}
                        if (cost, prof, rest[2]) == ("cost", "profile", 0.002) else None)
    flags = ["serve", "--target", str(tiny_paths.target_dir), "--draft", str(tiny_paths.draft_dir), "--dtype", "float32",
             "--budget", "auto"]
    for max_batch, table in [(4, {1: 9, 2: 6, 3: 4, 4: 3}), (1, None)]:
        _, engine = build(build_parser().parse_args([*flags, "--max-batch", str(max_batch)]))
        try:
            assert engine.decoder.config.node_budget == 9 and engine.decoder.batch_budgets == table
        finally:
            engine.close()
    assert seen["kwargs"]["draft_quant"] == "auto" and "pixel_values" in seen["args"][2][0]  # profiled on the photo
    assert seen["rest_sizes"] == [1, 2, 3, 4]  # each batch size's drafting time measured


def test_serve_loads_models_as_generate_does(tiny_paths, monkeypatch):
    """The same load options as generate (`models.options`), --device-map included, and real loads."""
    import torch

    import specllava.models.hf as hf
    from specllava.models.options import LoadOptions
    from specllava.serve.cli import load_models

    flags = ["--target", str(tiny_paths.target_dir), "--draft", str(tiny_paths.draft_dir), "--dtype", "bfloat16",
             "--attn-implementation", "eager"]
    target, draft, _ = load_models(build_parser().parse_args(["serve", *flags]))
    assert target.dtype == draft.dtype == torch.bfloat16
    assert target.config.get_text_config()._attn_implementation == "eager"
    seen = []
    monkeypatch.setattr(hf, "load_pair", lambda *a, **k: seen.append(a) or (None, None, None, {}))
    load_models(build_parser().parse_args(["serve", *flags, "--device-map", "auto"]))
    gen = build_parser().parse_args(["generate", "--prompt", "x", *flags, "--device-map", "auto"])
    assert seen[0][2] == LoadOptions.from_args(gen) and seen[0][2].device_map == "auto"


@pytest.mark.parametrize("argv, message", [(["--method", "chain", "--budget", "auto"], "--budget auto calibrates the dynamic tree"),
                                           (["--tree-option", "max_depth=0"], "max_depth")])
def test_bad_tree_settings_exit_2_before_loading(argv, message, capsys):
    from specllava.cli import main

    try:
        code = main(["serve", *argv])
    except SystemExit as stop:  # argparse's own refusals
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "loading" not in err


@pytest.mark.slow  # a fresh Python process importing torch and transformers: 10-20 s here
def test_serve_process_answers_and_says_what_it_loads(tiny_paths, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "specllava", "serve", "--target", str(tiny_paths.target_dir), "--draft",
           str(tiny_paths.draft_dir), "--dtype", "float32", "--port", str(port), "--threads", "1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    assert json.loads(resp.read())["status"] == "ok"
                break
            except OSError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="specllava", messages=user("Hi", image_bytes()), max_tokens=5)
        assert r.usage.completion_tokens == 5
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert "specllava serve: loading target" in text and "models loaded in" in text and "ready at" in text


@pytest.mark.slow
def test_default_pair_serves_the_decoders_answer():
    """The embedded default pair, built as `specllava serve` builds it (dtype auto and all): the
    served answer is the library's, token for token, and its drafts are accepted."""
    import threading

    import uvicorn

    from specllava.serve.cli import build
    from specllava.serve.engine import encode_chat
    from specllava.serve.protocol import Limits, parse_request

    args = build_parser().parse_args(["serve", "--max-tokens", "48"])
    app, engine = build(args)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.config.port}"
        photo = (Path(SRC) / "specllava" / "assets" / "example.jpg").read_bytes()
        messages = [{"role": "user", "content": [
            {"type": "text", "text": "Describe this image."},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + __import__("base64").b64encode(photo).decode()}},
        ]}]  # fmt: skip
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="specllava", messages=messages, max_tokens=48)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in
                           c.chat.completions.create(model="specllava", messages=messages, max_tokens=48, stream=True)
                           if ch.choices)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
    req = parse_request({"messages": messages}, Limits())
    inputs = encode_chat(engine.processor, req.conversation, req.image)
    out = engine.decoder.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], max_new_tokens=48)
    expected = engine.tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert r.choices[0].message.content == expected == streamed
    assert expected.strip(), "the default pair answered nothing"
    assert r.model_extra["specllava"]["mean_accepted_length"] > 1.5
