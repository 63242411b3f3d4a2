"""Many clients at once: nothing lost, no errors, and no request's state leaking into another's: at
temperature 0 every answer equals the same request alone, and a seeded sampled one too."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from serve_helpers import image_bytes, running_server, user

# The tiny pair still prefills an EfficientNet image per request (~0.15 s here): 48 requests take
# about 10-20 s per server on this 2-core machine.
pytestmark = pytest.mark.slow

CLIENTS, PER_CLIENT = 16, 3
PROMPTS = ["Describe this image.", "What colour is it?", "Count the shapes.", "Hi"]


def requests():
    """CLIENTS x PER_CLIENT requests: different prompts, images, lengths; a quarter sampled with a seed."""
    out = []
    for i in range(CLIENTS * PER_CLIENT):
        kw = dict(messages=user(PROMPTS[i % len(PROMPTS)], image_bytes(i % 5)), max_tokens=8 + i % 9)
        if i % 4 == 3:
            kw.update(temperature=0.8, seed=1000 + i)
        out.append(kw)
    return out


_clients = threading.local()  # one openai client per client thread (and per server)


def ask(url, kw) -> tuple[str, int]:
    c = getattr(_clients, url, None)
    if c is None:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        setattr(_clients, url, c)
    r = c.chat.completions.create(model="specllava", **kw)
    return r.choices[0].message.content, r.usage.completion_tokens


@pytest.fixture(scope="module")
def alone(served_models):
    """Each request's answer when it is the only one on the server."""
    with running_server(*served_models) as (url, _, _):
        return [ask(url, kw) for kw in requests()]


@pytest.mark.parametrize("max_batch", [1, 4])
def test_concurrent_clients_get_their_alone_answers(served_models, alone, max_batch):
    todo = requests()
    with running_server(*served_models, max_batch=max_batch) as (url, engine, _):
        t = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:  # one thread per client, each sending its requests in turn
            per_client = list(pool.map(lambda k: [ask(url, kw) for kw in todo[k::CLIENTS]], range(CLIENTS)))
        took = time.monotonic() - t
        assert engine.queue_length() == 0 and engine.running == 0
    together = [None] * len(todo)
    for k, answers in enumerate(per_client):
        together[k::CLIENTS] = answers
    assert together == alone
    assert all(0 < n <= kw["max_tokens"] for (_, n), kw in zip(together, todo))
    assert took < 60, f"{len(todo)} requests from {CLIENTS} clients took {took:.1f} s"
