"""The API surface clients expect, through the official openai client: /v1/completions, logprobs
(the target's own), n > 1, max_completion_tokens, stream_options; and the bounded inputs: the
prompt's character bound before tokenization, nested JSON, the image placeholder as text,
Retry-After, memory after refused giant requests, and the metrics' shape."""

import json
import threading
import time

import openai
import pytest
import torch

from serve_helpers import SlowDecoder, image_bytes, running_server, user
from test_serve_api import client, get, metric, post, reference

from specllava.serve.engine import token_bytes
from specllava.serve.protocol import Limits, parse_request


def _utf8(values) -> bool:
    try:
        bytes(values).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def target_logprobs(served_models, inputs, max_tokens):
    """(tokens, log-softmax rows [n, V]) of the target's own greedy generate() for the inputs."""
    target, _, _ = served_models
    with torch.inference_mode():
        out = target.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens, torch.log_softmax(torch.cat(out.logits).float(), dim=-1)


def test_completions_answer_equals_target_generate(server, served_models):
    url, _, _ = server
    target, _, processor = served_models
    prompt = "Once upon a time"
    r = client(url).completions.create(model="specllava", prompt=prompt, max_tokens=16)
    ids = processor.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        ref = target.generate(**ids, max_new_tokens=16, do_sample=False)
    assert r.choices[0].text == processor.tokenizer.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert r.object == "text_completion" and r.usage.prompt_tokens == ids["input_ids"].shape[1]
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    streamed = list(client(url).completions.create(model="specllava", prompt=prompt, max_tokens=16, stream=True,
                                                   stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    assert streamed[-1].usage.completion_tokens == 16


def test_chat_logprobs_are_the_targets_own(server, served_models):
    url, _, processor = server[0], None, served_models[2]
    messages = user("Describe this image.", image_bytes(0))
    r = client(url).chat.completions.create(model="specllava", messages=messages, max_completion_tokens=20,
                                            logprobs=True, top_logprobs=3)
    req = parse_request({"messages": messages}, Limits())
    from specllava.serve.engine import encode_chat

    tokens, logp = target_logprobs(served_models, encode_chat(processor, req.conversation, req.image), 20)
    content = r.choices[0].logprobs.content
    assert len(content) == len(tokens) == r.usage.completion_tokens == 20
    for i, (entry, tok) in enumerate(zip(content, tokens)):
        assert bytes(entry.bytes) == token_bytes(processor.tokenizer, tok)
        assert entry.token == (bytes(entry.bytes).decode() if _utf8(entry.bytes) else
                               "bytes:" + "".join(f"\\x{b:02x}" for b in entry.bytes))
        assert entry.logprob == pytest.approx(float(logp[i, tok]), abs=1e-4)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: the argmax
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    streamed = list(client(url).chat.completions.create(model="specllava", messages=messages, max_tokens=20,
                                                        logprobs=True, stream=True))
    lp = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in lp] == [e.logprob for e in content] and all(e.top_logprobs == [] for e in lp)
    assert client(url).chat.completions.create(model="specllava", messages=messages, max_tokens=5).choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(server, served_models):
    url, _, _ = server
    r = client(url).completions.create(model="specllava", prompt="The sky is", max_tokens=8, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    entries = client(url).chat.completions.create(model="specllava", messages=user("The sky is"), max_tokens=8,
                                                  logprobs=True).choices[0]
    assert b"".join(bytes(e.bytes) for e in entries.logprobs.content).decode("utf-8", "replace") == entries.message.content
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(len(t) <= 2 and max(t.values()) == pytest.approx(v) for t, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_n_choices_are_independent_requests(server, served_models):
    url, _, _ = server
    c = client(url)
    messages = user("Tell a story.", image_bytes(2))
    greedy = c.chat.completions.create(model="specllava", messages=messages, max_tokens=12, n=3)
    assert [ch.index for ch in greedy.choices] == [0, 1, 2]
    assert {ch.message.content for ch in greedy.choices} == {reference(served_models, messages, 12)[0]}
    assert greedy.usage.completion_tokens == 36
    sampled = c.chat.completions.create(model="specllava", messages=messages, max_tokens=12, n=3, temperature=1.0, seed=40)
    alone = [c.chat.completions.create(model="specllava", messages=messages, max_tokens=12, temperature=1.0, seed=40 + i)
             .choices[0].message.content for i in range(3)]
    assert [ch.message.content for ch in sampled.choices] == alone  # choice i samples as seed + i alone
    assert len(set(alone)) > 1
    streamed = list(c.chat.completions.create(model="specllava", messages=messages, max_tokens=12, n=3, temperature=1.0,
                                              seed=40, stream=True))
    for i in range(3):
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed
                       if ch.choices and ch.choices[0].index == i) == alone[i]
    assert sum(1 for ch in streamed if ch.choices and ch.choices[0].finish_reason) == 3


def test_the_image_placeholder_as_text_is_refused_before_queueing(server):
    url, engine, _ = server
    before = metric(url, 'specllava_errors_total{code="image_token_in_text"}')
    for messages in (user("what is <image> here"), user("<image>", image_bytes(1))):
        status, err = post(url, {"messages": messages})
        assert status == 400 and err["error"]["code"] == "image_token_in_text"
    status, err = post(url, {"prompt": "<image> hi"}, path="/v1/completions")
    assert status == 400 and err["error"]["code"] == "image_token_in_text"
    assert metric(url, 'specllava_errors_total{code="image_token_in_text"}') == before + 3


def test_deeply_nested_json_is_a_400(server):
    url, _, _ = server
    status, err = post(url, b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and err["error"]["code"] == "json_too_deep"
    status, err = post(url, json.dumps({"messages": user("hi"), "metadata": {"a": [[[[{}]]]]}}).encode())
    assert status == 200


def test_a_prompt_over_the_character_bound_is_refused_before_tokenization(server, monkeypatch):
    url, engine, app = server
    calls = []
    monkeypatch.setattr("specllava.serve.engine.encode_chat", lambda *a, **k: calls.append(1))
    bound = engine.max_prompt_chars
    assert bound == engine.context * max(map(len, engine.tokenizer.get_vocab()))
    status, err = post(url, {"messages": user("x" * (bound + 1))})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded" and str(bound) in err["error"]["message"]
    assert calls == []
    limits = app.state.limits
    assert limits.max_prompt_chars == bound
    assert limits.body_cap() == limits.max_image_bytes * 4 // 3 + 1024 + 6 * bound + 1024 * 1024


def test_memory_returns_after_giant_requests(server):
    """8 MB prompts (over the character bound: never tokenized) and prompts just under it
    (tokenized, then over the context): refused, and the process keeps no memory for them."""
    import psutil

    url, engine, _ = server
    proc = psutil.Process()
    post(url, {"messages": user("x" * 10)})
    giant = json.dumps({"messages": user("y" * 8_000_000)}).encode()
    at_bound = {"messages": user("z " * (engine.max_prompt_chars // 2))}  # tokenized, then over the context
    before = proc.memory_info().rss
    for _ in range(3):
        status, err = post(url, giant)
        assert status == 400 and "characters" in err["error"]["message"]
        status, err = post(url, at_bound)
        assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    grown = (proc.memory_info().rss - before) / 2**20
    assert grown < 64, f"the process kept {grown:.0f} MiB after refusing giant requests"


def test_429_says_when_to_retry(served_models):
    target, draft, processor = served_models
    with running_server(target, draft, processor, max_queue=1, max_tokens=300,
                        make_decoder=lambda: SlowDecoder(target, draft, delay_s=0.02)) as (url, _, _):
        results = []
        threads = [threading.Thread(target=lambda: results.append(_post_with_headers(url))) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        busy = [h for status, h in results if status == 429]
        assert busy and all(1 <= int(h["Retry-After"]) <= 60 for h in busy)
        status, _ = _post_with_headers(url, n=2)  # n choices take n places in the queue: never here
        assert status == 400


def _post_with_headers(url, n=1):
    import urllib.error
    import urllib.request

    body = json.dumps({"messages": user("Hi", image_bytes(1)), "max_tokens": 30, "n": n}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers
    except urllib.error.HTTPError as err:
        return err.code, err.headers


def test_metrics_shape(server):
    url, _, _ = server
    client(url).chat.completions.create(model="specllava", messages=user("Hi"), max_tokens=4)
    post(url, {"messages": user("hi"), "temperature": True})
    _, _, text = get(url, "/metrics")
    assert "_created" not in text
    assert "specllava_mean_accepted_length " not in text and "specllava_mean_accepted_length{" not in text
    assert metric(url, 'specllava_errors_total{code="invalid_request_error"}') >= 1
    assert metric(url, "specllava_step_accepted_length_count") >= 1 and metric(url, "specllava_queue_wait_seconds_count") >= 1
    assert metric(url, "process_cpu_seconds_total") > 0


def test_a_slow_tokenization_does_not_hold_up_other_requests(server, monkeypatch):
    """Encoding runs in threads with their own processor copies, not under one lock and not on
    the event loop: a request whose encoding takes 3 s leaves the next one alone."""
    import specllava.serve.engine as engine_module

    real = engine_module.encode_chat

    def encode(processor, conversation, image=None):
        if "SLOW" in conversation[-1]["content"][-1]["text"]:
            time.sleep(3)
        return real(processor, conversation, image)

    monkeypatch.setattr(engine_module, "encode_chat", encode)
    url, _, _ = server
    slow = threading.Thread(target=post, args=(url, {"messages": user("SLOW"), "max_tokens": 2}))
    slow.start()
    time.sleep(0.3)
    t = time.monotonic()
    assert post(url, {"messages": user("fast"), "max_tokens": 2})[0] == 200
    assert time.monotonic() - t < 2.0
    slow.join()


def test_grafana_dashboard_reads_only_exported_metrics(server):
    """docs/grafana-dashboard.json: valid JSON whose every metric is one this server exports."""
    import re
    from pathlib import Path

    url, _, _ = server
    client(url).chat.completions.create(model="specllava", messages=user("Hi"), max_tokens=3)
    post(url, {"messages": user("hi"), "max_tokens": 0})
    _, _, text = get(url, "/metrics")
    exported = {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}
    dash = json.loads((Path(__file__).parents[2] / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = {m for e in exprs for m in re.findall(r"\b((?:specllava|process|python)_[a-z_]+)\b", e)}
    assert len(exprs) >= 10 and names and names <= exported, names - exported
