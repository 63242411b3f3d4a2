"""`specllava serve`: the OpenAI-compatible server (FastAPI + uvicorn) on the default pair or any
target/draft, with the same decoding defaults as `specllava generate`.

The main CLI wires this in with `add_parser(subparsers)` and calls `run(args)`.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..cli_args import positive_float, positive_int
from ..options import DecodingOptions, LoadOptions
from .protocol import Limits


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = Limits()
    p = subparsers.add_parser(
        "serve",
        help="serve an OpenAI-compatible chat API (images, streaming, metrics) and a live web page",
        description="Serve POST /v1/chat/completions (OpenAI's format, images as data: URLs, streaming), "
        "GET /v1/models, /health, /metrics (Prometheus) and a web page at / that shows the draft's accepted "
        "tokens as they stream. Without --target/--draft the embedded default pair is served. Decoding is "
        "lossless: every answer is the target's own.",
    )
    DecodingOptions.add_args(p, sampling=False, budget_calibrates_on="the shipped example photo, at start-up")
    LoadOptions.add_args(p)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default: 8000)")
    p.add_argument("--served-model-name", default=d.model_name,
                   help=f"the model name clients send and /v1/models lists (default: {d.model_name})")
    p.add_argument("--max-concurrency", type=positive_int, default=1,
                   help="requests decoded at once, each by its own worker and decoder (default: 1; more rarely pays "
                   "on a CPU, whose cores one decode already uses)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests that may wait for a worker; beyond that the server answers 429 (default: 64)")
    p.add_argument("--max-tokens", type=positive_int, default=d.max_tokens,
                   help=f"most completion tokens a request may ask for, and what it gets without max_tokens "
                   f"(default: {d.max_tokens}; never past the model's context)")
    p.add_argument("--request-timeout", type=positive_float, default=300.0, metavar="SECONDS",
                   help="a request's time limit, queueing included: when it runs out the answer ends there "
                   "(finish_reason length) or, still queued, gets 503 (default: 300)")
    p.add_argument("--max-image-bytes", type=positive_int, default=d.max_image_bytes,
                   help=f"largest image file accepted, in bytes (default: {d.max_image_bytes})")
    p.add_argument("--max-image-pixels", type=positive_int, default=d.max_image_pixels,
                   help=f"largest image accepted, in pixels (default: {d.max_image_pixels})")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="also accept http(s) image URLs, which the server then downloads (default: data: URLs only)")
    return p


def load_models(args):
    """(target, draft, processor) as `specllava generate` loads them (`cli.load_models`: the
    load options --dtype, --device, --device-map, --attn-implementation)."""
    from ..cli import load_models as load

    return load(DecodingOptions.from_args(args), LoadOptions.from_args(args))


def tree_options(args, target, draft, processor) -> dict:
    """--tree-option and --budget as `generate` takes them; auto calibrates on the shipped example photo."""
    opts = DecodingOptions.from_args(args)
    inputs = []
    if opts.budget == "auto":
        from pathlib import Path

        from PIL import Image

        from ..models.hf import chat_inputs

        with Image.open(Path(__file__).parents[1] / "assets" / "example.jpg") as img:
            inputs = [chat_inputs(processor, "Describe this image.", img.convert("RGB"))]
    return opts.resolve_tree_options(target, draft, inputs, prefix="specllava serve: ")


def build(args):
    """(app, engine) from parsed arguments: models loaded, workers started."""
    opts = DecodingOptions.from_args(args)
    opts.check()
    import torch

    from .. import SpeculativeDecoder
    from .app import create_app
    from .engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    where = "the default pair" if args.target is None else f"target {args.target}, draft {args.draft}"
    print(f"specllava serve: loading {where} ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    target, draft, processor = load_models(args)
    options = tree_options(args, target, draft, processor) if args.method != "ar" else {}
    print(f"specllava serve: models loaded in {time.perf_counter() - t:.1f} s; preparing "
          f"{args.max_concurrency} decoder(s) ({args.method}) ...", file=sys.stderr, flush=True)
    engine = Engine(
        target, draft, processor,
        lambda: SpeculativeDecoder(target, draft, **opts.decoder_kwargs(), **options),
        workers=args.max_concurrency, max_queue=args.max_queue, max_tokens=args.max_tokens,
        request_timeout_s=args.request_timeout, method=args.method,
    )  # fmt: skip
    limits = Limits(model_name=args.served_model_name, max_tokens=args.max_tokens, max_image_bytes=args.max_image_bytes,
                    max_image_pixels=args.max_image_pixels, allow_remote_images=args.allow_remote_images)
    return create_app(engine, limits), engine


def run(args) -> int:
    import uvicorn

    app, engine = build(args)
    print(f"specllava serve: ready at http://{args.host}:{args.port}/ (model {args.served_model_name!r})",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.close()
    return 0
