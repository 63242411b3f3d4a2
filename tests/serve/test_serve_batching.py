"""The batching scheduler (`--max-batch N`): requests decoded together step by step, admitted in
arrival order between steps, each answer equal to the request alone; one request cancelled,
stopped or timed out between steps while the others go on; the batch size per step measured."""

import json
import threading
import time
import urllib.request

from specllava import SpeculativeDecoder

from serve_helpers import SlowDecoder, image_bytes, running_server, user
from test_serve_api import client, metric, post, reference


def slow_server(served_models, **kw):
    target, draft, processor = served_models
    return running_server(target, draft, processor, make_decoder=lambda: SlowDecoder(target, draft, delay_s=0.03), **kw)


def test_requests_decode_together_and_answer_as_alone(served_models):
    prompts = [user(f"Picture {i}", image_bytes(i)) for i in range(4)]
    alone = [reference(served_models, m, 20)[0] for m in prompts]
    with slow_server(served_models, max_batch=4) as (url, engine, _):
        answers = [None] * 4

        def ask(i):
            answers[i] = client(url).chat.completions.create(model="specllava", messages=prompts[i],
                                                             max_tokens=20).choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        steps, sequences = metric(url, "specllava_batch_size_count"), metric(url, "specllava_batch_size_sum")
        assert sequences / steps > 1.5, "the requests were not decoded together"
        assert metric(url, "specllava_batch_size_bucket{le=\"4.0\"}") == steps  # never more than --max-batch
        assert engine.running == 0
    assert answers == alone


def test_admission_is_first_come_first_served(served_models):
    started = []
    with slow_server(served_models, max_batch=2) as (url, engine, app):
        engine.on_start = lambda job: started.append(job.request.conversation[-1]["content"][-1]["text"])
        threads = []
        for i in range(5):
            threads.append(threading.Thread(target=post, args=(url, {"messages": user(f"R{i}"), "max_tokens": 10})))
            threads[-1].start()
            time.sleep(0.15)  # sent in order while the first ones decode
        for t in threads:
            t.join()
    assert started == [f"R{i}" for i in range(5)]


def test_one_request_cancelled_between_steps_while_the_other_goes_on(served_models):
    messages = user("Keep going", image_bytes(3))
    full = reference(served_models, messages, 40)[0]
    with slow_server(served_models, max_batch=2, max_tokens=300) as (url, engine, _):
        before = metric(url, 'specllava_finished_total{reason="client_disconnected"}')
        result = {}
        other = threading.Thread(target=lambda: result.update(r=client(url).chat.completions.create(
            model="specllava", messages=messages, max_tokens=40)))
        other.start()
        body = json.dumps({"messages": user("Hi", image_bytes(1)), "max_tokens": 300, "stream": True}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        resp = urllib.request.urlopen(req, timeout=30)
        resp.readline()  # decoding, in the batch with the other request
        resp.close()
        deadline = time.monotonic() + 10
        while metric(url, 'specllava_finished_total{reason="client_disconnected"}') == before:
            assert time.monotonic() < deadline, "the generation was not cancelled"
            time.sleep(0.05)
        other.join()
    assert result["r"].choices[0].message.content == full


def test_time_limit_and_stop_sequence_end_one_request_of_a_batch(served_models):
    messages = user("Describe this image.", image_bytes(0))
    full = reference(served_models, messages, 40)[0]
    stop = full[10:12]
    with slow_server(served_models, max_batch=3, max_tokens=300, request_timeout_s=1.5) as (url, _, _):
        out = {}
        jobs = {
            "stop": lambda: client(url).chat.completions.create(model="specllava", messages=messages, max_tokens=40,
                                                                stop=stop),
            "long": lambda: post(url, {"messages": user("Hi", image_bytes(1)), "max_tokens": 300}),
            "short": lambda: client(url).chat.completions.create(model="specllava", messages=messages, max_tokens=12),
        }
        threads = [threading.Thread(target=lambda k=k, f=f: out.update({k: f()})) for k, f in jobs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert out["stop"].choices[0].message.content == full[: full.find(stop)]
    assert out["stop"].model_extra["specllava"]["stopped_by"] == "stop_sequence"
    status, r = out["long"]
    assert status == 200 and r["specllava"]["stopped_by"] == "time_limit" and r["usage"]["completion_tokens"] < 300
    assert out["short"].choices[0].message.content == reference(served_models, messages, 12)[0]


def test_concurrent_requests_share_one_target_forward_per_step(served_models, monkeypatch):
    """Four concurrent requests: every step of the scheduler over B > 1 sequences runs ONE target
    forward for all of them (core's batched step), not one per sequence."""
    target, draft, processor = served_models
    steps = []  # (sequences stepped, target forwards in that step)

    class CountingDecoder(SpeculativeDecoder):
        def step(self, sequences):
            before = forwards[0]
            results = super().step(sequences)
            steps.append((len(results), forwards[0] - before))
            return results

    decoder = CountingDecoder(target, draft, method="dynamic")
    forwards = [0]
    original = decoder.target_backend.forward  # the target's verification forward (prefills go through generate)

    def counted(*args, **kwargs):
        forwards[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(decoder.target_backend, "forward", counted)
    prompts = [user(f"Picture {i}", image_bytes(i)) for i in range(4)]
    alone = [reference(served_models, m, 16)[0] for m in prompts]
    with running_server(target, draft, processor, max_batch=4, make_decoder=lambda: decoder) as (url, engine, _):
        gate = threading.Event()
        engine.on_start = lambda job: gate.wait(10)  # hold the first admission until all four are queued
        answers = [None] * 4

        def ask(i):
            answers[i] = client(url).chat.completions.create(model="specllava", messages=prompts[i],
                                                             max_tokens=16).choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while engine.queue_length() < 3:
            assert time.monotonic() < deadline, "the requests did not queue"
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join()
    assert answers == alone
    batched = [(b, f) for b, f in steps if b > 1]
    assert batched and batched[0][0] == 4, steps  # all four admitted before the first step
    assert all(f == 1 for _, f in batched), f"target forwards per step of B > 1 sequences: {steps}"
