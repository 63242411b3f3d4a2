"""`specllava serve`: the OpenAI-compatible server (FastAPI + uvicorn) on the default pair or any
target/draft, with the same decoding defaults as `specllava generate`.

The main CLI wires this in with `add_parser(subparsers)` and calls `run(args)`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
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
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="requests decoded together, step by step, their trees verified in one target forward "
                   "(continuous batching: a waiting request joins between two steps, in arrival order); each "
                   "request's tree follows the batch size. 1: one request at a time, the others queued "
                   "(docs/serving.md measures both). Default: 8")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests that may wait for a place in the batch; beyond that the server answers 429 (default: 64)")
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
    p.add_argument("--max-images", type=positive_int, default=d.max_images,
                   help=f"most images per request for a target that takes several (LLaVA-NeXT; LLaVA-1.5 takes one, "
                   f"a text-only target none; default: {d.max_images})")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="also accept http(s) image URLs, which the server then downloads (default: data: URLs only)")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="an API key clients must send as 'Authorization: Bearer KEY' on /v1/* (repeatable; default: "
                   "the comma-separated keys of $SPECLLAVA_API_KEY, else none: no key needed)")
    p.add_argument("--allowed-hosts", type=_names, default=None, metavar="HOST,...",
                   help="Host header values the server answers to (DNS-rebinding protection; '*' = any; default: "
                   "localhost, 127.0.0.1 and [::1] when listening on a loopback address, else any)")
    p.add_argument("--allowed-origins", type=_names, default=(), metavar="ORIGIN,...",
                   help="web origins whose pages may call the API from a browser (CORS), e.g. https://app.example.com "
                   "(default: none, CORS off)")
    ray = p.add_argument_group("replicas on Ray Serve (needs Ray: pip install 'specllava[ray]'; docs/serving.md)")
    ray.add_argument("--replicas", type=positive_int, default=None, metavar="N",
                     help="run N replicas of this server on Ray Serve behind Ray's HTTP proxy on --host/--port, each "
                     "loading the models (default: one server, no Ray)")
    ray.add_argument("--max-replicas", type=positive_int, default=None, metavar="M",
                     help="let Ray's autoscaler run between --replicas and M replicas, from the requests in flight "
                     "per replica (default: exactly --replicas)")
    ray.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="the Ray cluster to run on ('auto': the one `ray start` began on this machine; default: "
                     "a local Ray started for this command)")
    ray.add_argument("--replica-cpus", type=positive_float, default=1.0, metavar="CPUS",
                     help="CPUs Ray reserves for each replica (default: 1)")
    return p


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("give one or more comma-separated names")
    return names


def security_from_args(args):
    """`Security` from --api-key (or $SPECLLAVA_API_KEY), --allowed-hosts and --allowed-origins."""
    from .security import Security, default_allowed_hosts

    keys = args.api_key if args.api_key else [k for k in os.environ.get("SPECLLAVA_API_KEY", "").split(",")]
    keys = tuple(k.strip() for k in keys if k.strip())
    hosts = args.allowed_hosts or default_allowed_hosts(args.host)
    return Security(api_keys=keys, allowed_hosts=tuple(h.lower() for h in hosts), allowed_origins=args.allowed_origins)


def limits_from_args(args) -> Limits:
    return Limits(model_name=args.served_model_name, max_tokens=args.max_tokens, max_image_bytes=args.max_image_bytes,
                  max_image_pixels=args.max_image_pixels, max_images=args.max_images,
                  allow_remote_images=args.allow_remote_images)


def load_models(args):
    """(target, draft, processor) as `specllava generate` loads them (`cli.load_models`: the
    load options --dtype, --device, --device-map, --attn-implementation)."""
    from ..cli import load_models as load

    return load(DecodingOptions.from_args(args), LoadOptions.from_args(args))


def _calibration_inputs(processor) -> list[dict]:
    """What `--budget auto` profiles acceptance on: the shipped example photo."""
    from pathlib import Path

    from PIL import Image

    from ..models.hf import chat_inputs

    with Image.open(Path(__file__).parents[1] / "assets" / "example.jpg") as img:
        return [chat_inputs(processor, "Describe this image.", img.convert("RGB"))]


def tree_options(args, target, draft, processor) -> dict:
    """--tree-option and --budget as `generate` takes them; auto calibrates on the shipped example photo."""
    opts = DecodingOptions.from_args(args)
    inputs = _calibration_inputs(processor) if opts.budget == "auto" else []
    return opts.resolve_tree_options(target, draft, inputs, prefix="specllava serve: ")


def batch_budgets(args, target, draft, processor, options: dict) -> dict[int, int] | None:
    """With --budget auto, dynamic trees and --max-batch > 1: the node budget per request for each
    batch size up to --max-batch (`tuning.budget.batch_node_budgets`, from the same cached
    calibration and each batch size's drafting time, `measure_batch_rest`, a few seconds at start),
    so that each request's tree shrinks as more requests share one verification forward; a lone
    request keeps --budget auto's budget. None otherwise (every batch size takes
    the tree options' budget)."""
    opts = DecodingOptions.from_args(args)
    if opts.budget != "auto" or opts.method != "dynamic" or args.max_batch < 2:
        return None
    from ..tuning.budget import acceptance_profile, batch_node_budgets, measure_batch_rest, verify_cost_curve

    inputs = [{k: v.to(target.dtype) if k == "pixel_values" else v for k, v in inp.items()}
              for inp in _calibration_inputs(processor)]
    cost = verify_cost_curve(target)
    profile = acceptance_profile(target, draft, inputs, options, cost, draft_vocab=opts.draft_vocab_for(draft, opts.temperature),
                                 draft_quant=opts.draft_quant)
    sizes = range(1, args.max_batch + 1)
    rest = measure_batch_rest(target, draft, inputs[0], profile, options, sizes,
                              draft_vocab=opts.draft_vocab_for(draft, opts.temperature), draft_quant=opts.draft_quant)
    table = {**batch_node_budgets(cost, profile, sizes, rest), 1: options["node_budget"]}
    print(f"specllava serve: --budget auto: node budget per request by batch size {table}", file=sys.stderr, flush=True)
    return table


def build(args):
    """(app, engine) from parsed arguments: models loaded, the scheduler started."""
    from .app import create_app

    DecodingOptions.from_args(args).check()
    engine = build_engine(args)
    return create_app(engine, limits_from_args(args), security_from_args(args)), engine


def build_engine(args):
    """The `Engine` from parsed arguments (checked already): models loaded, the scheduler started."""
    opts = DecodingOptions.from_args(args)
    import torch

    from .. import SpeculativeDecoder
    from .engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    where = "the default pair" if args.target is None else f"target {args.target}, draft {args.draft}"
    print(f"specllava serve: loading {where} ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    target, draft, processor = load_models(args)
    options = tree_options(args, target, draft, processor) if args.method != "ar" else {}
    budgets = batch_budgets(args, target, draft, processor, options)
    print(f"specllava serve: models loaded in {time.perf_counter() - t:.1f} s; preparing "
          f"the decoder ({args.method}, batches of up to {args.max_batch}) ...", file=sys.stderr, flush=True)
    engine = Engine(
        target, draft, processor,
        lambda: SpeculativeDecoder(target, draft, **opts.decoder_kwargs(), batch_budgets=budgets, **options),
        max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
        request_timeout_s=args.request_timeout, method=args.method,
    )  # fmt: skip
    return engine


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, made before any model loads, so that a port in use or a
    host that is not this machine's fails at once. Raises OSError naming the cause."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise OSError(f"cannot listen on {host}:{port}: {host!r} is not an address or a name this machine resolves "
                      f"({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart may reuse the port
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        why = "the port is in use by another program" if err.errno == 98 else (err.strerror or str(err))
        raise OSError(f"cannot listen on {host}:{port}: {why}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(args) -> int:
    """Listen at once, answer 503 (starting) while the models load in a thread, then serve; on
    SIGINT/SIGTERM answer 503 (shutting down) to new requests while the running ones finish."""
    import uvicorn

    from .app import attach, create_app
    from .security import exposure_warning

    DecodingOptions.from_args(args).check()
    security = security_from_args(args)
    if args.replicas is None and (args.max_replicas or args.ray_address):
        raise ValueError("--max-replicas and --ray-address go with --replicas N (replicas on Ray Serve)")
    try:
        sock = bind(args.host, args.port)
    except OSError as err:
        print(f"specllava serve: {err}", file=sys.stderr)
        return 1
    if (warning := exposure_warning(args.host, security)) is not None:
        print(f"specllava serve: {warning}", file=sys.stderr, flush=True)
    if args.replicas is not None:
        sock.close()  # Ray's proxy listens there
        try:
            from . import ray as on_ray
        except ImportError as err:
            raise ValueError(f"--replicas needs Ray Serve ({err}): pip install 'specllava[ray]'") from None
        return on_ray.run(args)
    app = create_app(None, limits_from_args(args), security)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.closing = True
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=30))
    failed: list[BaseException] = []

    def load():
        try:
            engine = build_engine(args)
        except BaseException as err:  # noqa: BLE001  (said below, in the main thread)
            failed.append(err)
            server.should_exit = True
            return
        attach(app, engine)
        print(f"specllava serve: ready at http://{args.host}:{args.port}/ (model {args.served_model_name!r})",
              file=sys.stderr, flush=True)

    print(f"specllava serve: listening on http://{args.host}:{args.port}/ (503 until the models are loaded)",
          file=sys.stderr, flush=True)
    loader = threading.Thread(target=load, name="specllava-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        app.state.closing = True
        if app.state.engine is not None:
            app.state.engine.close()
        sock.close()
    if failed:
        raise failed[0]
    return 0
