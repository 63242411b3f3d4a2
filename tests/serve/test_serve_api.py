"""The live server driven by the official openai client and by plain HTTP: answers equal the
target's own, streaming, stop sequences, statistics, metrics, and every bad input refused in
OpenAI's error shape while the server keeps serving."""

import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from serve_helpers import SlowDecoder, data_url, image_bytes, running_server, solid_png, user

from specllava.serve.engine import encode_chat
from specllava.serve.protocol import Limits, parse_request


def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def reference(served_models, messages, max_tokens) -> tuple[str, int]:
    """(text, tokens) of the target's own greedy generate() for the request."""
    target, _, processor = served_models
    req = parse_request({"messages": messages}, Limits())
    inputs = encode_chat(processor, req.conversation, req.image)
    with torch.inference_mode():
        out = target.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    return processor.tokenizer.decode(new, skip_special_tokens=True), len(new)


def post(url, body: bytes | dict, path="/v1/chat/completions"):
    """(status, parsed JSON) of a raw POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=30) as resp:
        return resp.status, resp.headers.get("content-type"), resp.read().decode()


def metric(url, name) -> float:
    _, _, text = get(url, "/metrics")
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


def test_greedy_answer_equals_target_generate(server, served_models):
    url, _, _ = server
    messages = user("Describe this image.", image_bytes(0))
    r = client(url).chat.completions.create(model="specllava", messages=messages, max_tokens=24)
    text, n = reference(served_models, messages, 24)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.object == "chat.completion" and r.model == "specllava"
    assert r.usage.completion_tokens == n == 24 and r.usage.total_tokens == r.usage.prompt_tokens + n
    stats = r.model_extra["specllava"]
    assert stats["completion_tokens"] == 24 and stats["method"] == "dynamic" and stats["stopped_by"] == "max_tokens"
    assert stats["target_forwards"] == stats["steps"] + 1
    assert stats["mean_accepted_length"] == pytest.approx(24 / stats["target_forwards"])
    assert stats["draft_tokens_accepted"] == sum(k * c for k, c in enumerate(stats["accept_hist"])) <= stats["draft_tokens_proposed"]


def test_multi_turn_answer_equals_target_generate(server, served_models):
    url, _, _ = server
    messages = [{"role": "system", "content": "Be brief."}, *user("Hi", image_bytes(2)),
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is it?"}]
    r = client(url).chat.completions.create(model="specllava", messages=messages, max_tokens=16)
    assert r.choices[0].message.content == reference(served_models, messages, 16)[0]


def test_text_only_answer_equals_target_generate(server, served_models):
    url, _, _ = server
    messages = user("Name three colours.")
    r = client(url).chat.completions.create(model="specllava", messages=messages, max_tokens=16)
    assert r.choices[0].message.content == reference(served_models, messages, 16)[0]


def test_stats_equal_the_decoders_own(server, served_models):
    """The response's statistics are those `SpeculativeDecoder.generate` reports for the request."""
    url, engine, _ = server
    target, _, processor = served_models
    messages = user("What is in the picture?", image_bytes(3))
    r = client(url).chat.completions.create(model="specllava", messages=messages, max_tokens=30)
    req = parse_request({"messages": messages}, Limits())
    inputs = encode_chat(processor, req.conversation, req.image)
    out = engine.decoder.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], max_new_tokens=30)
    s = r.model_extra["specllava"]
    assert s["target_forwards"] == out.stats["target_forwards"] and s["accept_hist"] == out.stats["accept_hist"]
    assert s["mean_accepted_length"] == pytest.approx(out.stats["mean_accepted"])
    assert s["draft_tokens_proposed"] == round(out.stats["tree_nodes_mean"] * out.stats["steps"])


def test_streaming_equals_the_whole_answer_and_marks_draft_tokens(server, served_models):
    url, _, _ = server
    messages = user("Describe this image.", image_bytes(0))
    chunks = list(client(url).chat.completions.create(model="specllava", messages=messages, max_tokens=24, stream=True,
                                                      stream_options={"include_usage": True}))
    text, n = reference(served_models, messages, 24)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == text
    pieces = [p for c in chunks if c.choices and "pieces" in (c.model_extra.get("specllava") or {})
              for p in c.model_extra["specllava"]["pieces"]]
    assert "".join(p[0] for p in pieces) == text
    assert any(p[1] for p in pieces), "no token was marked as an accepted draft proposal"
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == "length"
    assert final[0].model_extra["specllava"]["completion_tokens"] == n
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n


def test_stream_ends_with_done(server):
    url, _, _ = server
    req = urllib.request.Request(url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"messages": user("Hi", image_bytes(1)), "max_tokens": 5, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [e for e in resp.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_stop_sequence_cuts_text_and_generation(server, served_models):
    url, _, _ = server
    messages = user("Describe this image.", image_bytes(0))
    full, _ = reference(served_models, messages, 40)
    stop = full[10:12]
    assert stop and full.find(stop) >= 3
    c = client(url)
    r = c.chat.completions.create(model="specllava", messages=messages, max_tokens=40, stop=[stop, "never-there"])
    assert r.choices[0].message.content == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop" and r.model_extra["specllava"]["stopped_by"] == "stop_sequence"
    assert r.usage.completion_tokens < 40  # generation ended early
    streamed = c.chat.completions.create(model="specllava", messages=messages, max_tokens=40, stop=stop, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == full[: full.find(stop)]


def test_seeded_sampling_repeats_and_differs_by_seed(server):
    url, _, _ = server
    c = client(url)
    messages = user("Tell a story.", image_bytes(2))
    ask = lambda seed: c.chat.completions.create(model="specllava", messages=messages, max_tokens=20, temperature=0.9,
                                                 top_p=0.95, seed=seed).choices[0].message.content  # noqa: E731
    assert ask(7) == ask(7)
    assert len({ask(7), ask(8), ask(9)}) > 1


def test_models_health_metrics_and_page(server):
    url, _, _ = server
    assert [m.id for m in client(url).models.list()] == ["specllava"]
    status, _, body = get(url, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    before = metric(url, "specllava_completion_tokens_total")
    client(url).chat.completions.create(model="specllava", messages=user("Hi", image_bytes(1)), max_tokens=6)
    assert metric(url, "specllava_completion_tokens_total") == before + 6
    status, ctype, text = get(url, "/metrics")
    assert ctype.startswith("text/plain")
    for name in ("specllava_requests_total{endpoint=\"chat\",status=\"200\"}", "specllava_step_accepted_length_bucket",
                 "specllava_queue_wait_seconds_bucket", "process_resident_memory_bytes", "python_gc_objects_collected_total",
                 "python_info", "specllava_queue_length", "specllava_running_requests", "specllava_request_latency_seconds_bucket",
                 "specllava_time_to_first_token_seconds_bucket", "specllava_prompt_tokens_total",
                 "specllava_draft_tokens_accepted_total", "specllava_finished_total{reason=\"max_tokens\"}"):
        assert name in text, name
    status, ctype, html = get(url, "/")
    assert status == 200 and ctype.startswith("text/html") and "/static/app.js" in html
    assert get(url, "/static/app.js")[0] == 200


BAD_HTTP = {
    "invalid JSON": (b'{"messages": [', 400, "not valid JSON"),
    "missing messages": ({"model": "specllava"}, 400, "messages"),
    "unknown model": ({"model": "nope", "messages": user("hi")}, 404, "nope"),
    "broken base64": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}, 400, "base64"),
    "not an image": ({"messages": user("hi", b"GIF89a but not really")}, 400, "not an image"),
    "too many pixels": ({"messages": user("hi", solid_png(200, 200))}, 400, "pixels, over the cap"),
    "too many bytes": ({"messages": user("hi", image_bytes(size=(150, 150), fmt="BMP"))}, 400, "over the byte cap"),
    "body too large": ({"messages": user("x" * 2_000_000)}, 413, "request body is over"),
    "two images": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image_bytes(0))}},
        {"type": "image_url", "image_url": {"url": data_url(image_bytes(1))}}]}]}, 400, "at most 1"),
    "prompt over the context": ({"messages": user("word " * 600)}, 400, "maximum context length"),
    "prompt + max_tokens over the context": ({"messages": user("Hi", image_bytes()), "max_tokens": 64,
                                              "max_completion_tokens": 500}, 400, "maximum context length"),
    "max_tokens 0": ({"messages": user("hi"), "max_tokens": 0}, 400, "max_tokens"),
    "temperature 3": ({"messages": user("hi"), "temperature": 3}, 400, "temperature"),
    "top_p 0": ({"messages": user("hi"), "top_p": 0}, 400, "top_p"),
    "n 30": ({"messages": user("hi"), "n": 30}, 400, "at most 8 choices"),
    "remote image": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]}, 400, "--allow-remote-images"),
}  # fmt: skip


@pytest.fixture(scope="module")
def capped_server(served_models):
    """Small caps, so that over-cap inputs are cheap to send."""
    with running_server(*served_models, max_tokens=500, max_image_pixels=100 * 100, max_image_bytes=50_000) as live:
        yield live


@pytest.mark.parametrize("body, status, words", BAD_HTTP.values(), ids=BAD_HTTP.keys())
def test_bad_input_gets_openai_error_and_server_keeps_serving(capped_server, body, status, words):
    url, _, _ = capped_server
    got, err = post(url, body)
    assert got == status, err
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert words in err["error"]["message"]
    assert post(url, {"messages": user("Hi", image_bytes(1)), "max_tokens": 3})[0] == 200


def test_openai_client_raises_on_errors(server):
    url, _, _ = server
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(url).chat.completions.create(model="gpt-4o", messages=user("hi"))
    with pytest.raises(openai.BadRequestError, match="num_beams is not supported"):
        client(url).chat.completions.create(model="specllava", messages=user("hi"), extra_body={"num_beams": 4})
    status, _, _ = get(url, "/health")
    assert status == 200


@pytest.fixture(scope="module")
def slow_server(served_models):
    """One worker whose decoder sleeps 20 ms a step, a queue of 1 and a 1.5 s time limit."""
    target, draft, processor = served_models
    with running_server(target, draft, processor, max_queue=1, max_tokens=300, request_timeout_s=1.5,
                        make_decoder=lambda: SlowDecoder(target, draft, method="dynamic", delay_s=0.02)) as live:
        yield live


def test_full_queue_answers_429(slow_server):
    url, _, _ = slow_server
    results = []

    def ask():
        results.append(post(url, {"messages": user("Hi", image_bytes(1)), "max_tokens": 30}))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    busy = [err for status, err in results if status == 429]
    assert busy and all(err["error"]["code"] == "queue_full" for err in busy)
    assert sum(status == 200 for status, _ in results) >= 1
    assert metric(url, 'specllava_requests_total{endpoint="chat",status="429"}') >= len(busy)


def test_time_limit_ends_the_answer(slow_server):
    url, _, _ = slow_server
    status, r = post(url, {"messages": user("Hi", image_bytes(1)), "max_tokens": 300})
    assert status == 200 and r["choices"][0]["finish_reason"] == "length"
    assert r["specllava"]["stopped_by"] == "time_limit" and r["usage"]["completion_tokens"] < 300


def test_disconnect_cancels_generation(slow_server):
    """A streaming client that goes away: its generation stops at the next step, and the worker
    is free for the next request well before the 300 tokens would have been done."""
    url, engine, _ = slow_server
    before = metric(url, 'specllava_finished_total{reason="client_disconnected"}')
    body = json.dumps({"messages": user("Hi", image_bytes(1)), "max_tokens": 300, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=30)
    resp.readline()  # the first event has arrived: generation is under way
    resp.close()
    deadline = time.monotonic() + 5
    while metric(url, 'specllava_finished_total{reason="client_disconnected"}') == before or engine.running:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)


def test_disconnect_cancels_a_non_streaming_request(slow_server):
    import socket
    from urllib.parse import urlparse

    url, engine, _ = slow_server
    before = metric(url, 'specllava_finished_total{reason="client_disconnected"}')
    body = json.dumps({"messages": user("Hi", image_bytes(1)), "max_tokens": 300}).encode()
    where = urlparse(url)
    with socket.create_connection((where.hostname, where.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 5
        while not engine.running:  # wait until it decodes
            assert time.monotonic() < deadline
            time.sleep(0.02)
    deadline = time.monotonic() + 5
    while metric(url, 'specllava_finished_total{reason="client_disconnected"}') == before or engine.running:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)


def test_requests_are_served_first_come_first_served(served_models):
    target, draft, processor = served_models
    done = []
    with running_server(target, draft, processor, make_decoder=lambda: SlowDecoder(target, draft, delay_s=0.02)) as (url, _, _):

        def ask(i):
            post(url, {"messages": user(f"Request {i}", image_bytes(i)), "max_tokens": 12})
            done.append(i)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
            time.sleep(0.1)  # sent in order 0, 1, 2, ... while the first still decodes
        for t in threads:
            t.join()
    assert done == list(range(5))


def test_text_only_target(tmp_path):
    """A plain causal LM target and draft with a tokenizer (no processor): text answers equal its
    generate(), and an image is refused."""
    from tiny_llava import tiny_language_model, tiny_tokenizer

    tok = tiny_tokenizer()
    target, draft = tiny_language_model(len(tok), seed=0), tiny_language_model(len(tok), seed=1)
    target.generation_config.eos_token_id = tok.eos_token_id
    with running_server(target, draft, tok) as (url, _, _):
        messages = [{"role": "system", "content": "Be brief."}, *user("Name three colours.")]
        r = client(url).chat.completions.create(model="specllava", messages=messages, max_tokens=12)
        text = tok.apply_chat_template([{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                                         else m["content"][0]["text"]} for m in messages],
                                       add_generation_prompt=True, tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            ref = target.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        assert r.choices[0].message.content == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
        status, err = post(url, {"messages": user("What is it?", image_bytes())})
        assert status == 400 and "takes no images" in err["error"]["message"]
