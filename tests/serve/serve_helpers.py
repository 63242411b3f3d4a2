"""Helpers for the serving tests (imported by name: pyproject puts tests/serve on sys.path): a tiny
assembled LLaVA pair (EfficientNet tower + 2-layer random Llama with a byte-level tokenizer and the
default pair's chat template, see tests/models/tiny_llava.py) and a real server on it, `create_app`
run by uvicorn in a thread on a free port of 127.0.0.1."""

import base64
import io
import socket
import threading
import time
import warnings
from contextlib import contextmanager

import numpy as np
import uvicorn
from PIL import Image

import torch
from tiny_llava import tiny_sources, tiny_tokenizer  # tests/models: tiny SmolLM2 stand-ins
from transformers import LlamaConfig, LlamaForCausalLM

from specllava import SpeculativeDecoder
from specllava.models.assemble import assemble_models, load_models
from specllava.serve.app import create_app
from specllava.serve.engine import Engine
from specllava.serve.protocol import Limits


def _sharp_language_model():
    """A 2-layer random Llama whose weights are large enough for peaked next-token distributions:
    greedy answers then differ from prompt to prompt (a leak would show) and the 1-layer draft
    made from it agrees with it often enough to be accepted."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval(), tokenizer


def assemble_tiny(root):
    """The tiny pair's directories (`AssembledModels`) under `root`: random projector, untrained
    1-layer draft, 512-token context."""
    (root / "assets").mkdir()
    sources = tiny_sources()
    sources.language_model = _sharp_language_model
    sources.fingerprint = {**sources.fingerprint, "language_model": "tiny-sharp-llama-seed0"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return assemble_models(root / "cache", sources, assets_dir=root / "assets")


def load_tiny(paths):
    """(target, draft, processor) of `assemble_tiny`'s pair, in float32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = load_models(paths, dtype=torch.float32)
    return m.target, m.draft, m.processor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlowDecoder(SpeculativeDecoder):
    """A decoder that sleeps `delay_s` after each decoding step, so that a test can catch a
    request while it decodes."""

    def __init__(self, *args, delay_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay_s = delay_s

    def step(self, sequences):
        results = super().step(sequences)
        time.sleep(self.delay_s)
        return results


@contextmanager
def running_server(target, draft, processor, *, method="dynamic", max_batch=1, max_queue=64, max_tokens=64,
                   request_timeout_s=60.0, make_decoder=None, security=None, **limits):
    """(base URL, engine, app) of a live server; it stops (and its scheduler ends) on exit."""
    make_decoder = make_decoder or (lambda: SpeculativeDecoder(target, draft, method=method))
    engine = Engine(target, draft, processor, make_decoder,
                    max_batch=max_batch, max_queue=max_queue, max_tokens=max_tokens,
                    request_timeout_s=request_timeout_s, method=method)
    app = create_app(engine, Limits(max_tokens=max_tokens, **limits), security)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", engine, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()


def image_bytes(seed=0, size=(64, 80), fmt="PNG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def solid_png(w, h) -> bytes:
    """A one-colour PNG: many pixels in few bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(text, image=None):
    """One user message in OpenAI's format, with an optional image (bytes) as a data: URL."""
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    return [{"role": "user", "content": content}]
