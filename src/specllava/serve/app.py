"""The FastAPI app: OpenAI's chat-completions API over an `Engine`, plus /v1/models, /health,
/metrics and the web page at /.

`create_app(engine, limits)` builds it; `specllava serve` runs it with uvicorn. Every error a client
can cause is answered in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a
4xx status (429 when the queue is full), and the server keeps serving.

Responses carry OpenAI's fields and one more, `specllava`: the request's speculative statistics
(mean accepted length, draft tokens proposed and accepted, target forwards, ...). Streamed chunks
carry it too, with `pieces`: the chunk's text split by token, each piece marked as coming from an
accepted draft proposal or from the target, and the verification step that emitted it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Job, QueueFull
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .protocol import APIError, Limits, parse_request

STATIC = Path(__file__).with_name("static")
log = logging.getLogger("specllava.serve")
_POLL_S = 0.25  # how often a waiting request checks that its client is still there


def create_app(engine: Engine, limits: Limits) -> FastAPI:
    app = FastAPI(title="specllava", summary="OpenAI-compatible server with lossless speculative decoding",
                  docs_url=None, redoc_url=None)  # their pages load scripts from a CDN; /openapi.json stays
    limits = dataclasses.replace(limits, max_images=min(limits.max_images, engine.max_images))
    metrics = Metrics(engine.queue_length, lambda: engine.running)
    engine.on_finish = lambda job, result: metrics.finish(job.prompt_tokens, result, time.monotonic() - job.created)
    app.state.engine, app.state.limits, app.state.metrics = engine, limits, metrics
    body_cap = limits.max_image_bytes * 4 // 3 + 1024 * 1024  # one base64 image and the rest of the request

    @app.exception_handler(APIError)
    async def api_error(_request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(str(err.detail), err.status_code, kind).body(), status_code=err.status_code)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            response = await _chat(request)
        except APIError as err:
            metrics.requests.labels(str(err.status)).inc()
            raise
        except Exception as err:  # noqa: BLE001  (answered in OpenAI's shape; the server keeps serving)
            log.exception("chat completion failed")
            metrics.requests.labels("500").inc()
            raise APIError(f"internal error: {type(err).__name__}: {err}", status=500, type="server_error") from err
        metrics.requests.labels(str(getattr(response, "status_code", 200))).inc()
        return response

    async def _chat(request: Request):
        body = await _read_body(request, body_cap)
        if body is None:
            raise APIError(f"the request body is over {body_cap} bytes", status=413, code="request_too_large")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(f"the request body is not valid JSON ({err})") from None
        req = await run_in_threadpool(parse_request, payload, limits)
        inputs = await run_in_threadpool(engine.encode, req)
        try:
            job = engine.submit(req, inputs, asyncio.get_running_loop())
        except QueueFull:
            raise APIError(f"the server is busy: {engine.queue.maxsize} requests are already waiting; retry later",
                           status=429, type="rate_limit_error", code="queue_full") from None
        first = await _next_event(job, request)
        if first is None:  # the client went away while its request waited
            return Response(status_code=499)
        if first["type"] == "error":
            raise first["error"]
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": limits.model_name}
        if req.stream:
            return StreamingResponse(_sse(job, first, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        event = first
        while event["type"] == "delta":
            event = await _next_event(job, request)
            if event is None:
                return Response(status_code=499)
        if event["type"] == "error":
            raise event["error"]
        return {
            **meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": event["text"]},
                         "logprobs": None, "finish_reason": event["finish_reason"]}],
            "usage": _usage(job, event),
            "specllava": event["stats"],
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(limits)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != limits.model_name:
            raise APIError(f"The model {name!r} does not exist", status=404, type="not_found_error", code="model_not_found")
        return _model_card(limits)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": limits.model_name, "method": engine.method, "workers": len(engine.threads),
                "queue_length": engine.queue_length(), "running": engine.running, "max_tokens": limits.max_tokens}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _read_body(request: Request, cap: int) -> bytes | None:
    """The request body, or None when it is over `cap` bytes. The rest of an oversized body is read
    and dropped rather than left unread, so the client gets the 413 instead of a reset connection."""
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= cap:
            parts.append(chunk)
    return b"".join(parts) if size <= cap else None


async def _next_event(job: Job, request: Request) -> dict | None:
    """The job's next event; None (and the job cancelled) once the client has disconnected, which
    is checked at least every _POLL_S seconds, also while events keep coming."""
    while True:
        if time.monotonic() - job.checked_client >= _POLL_S:
            job.checked_client = time.monotonic()
            if await request.is_disconnected():
                job.cancelled.set()
                return None
        try:
            return await asyncio.wait_for(job.events.get(), _POLL_S)
        except TimeoutError:
            pass


async def _sse(job: Job, first: dict, meta: dict):
    """OpenAI's chunk stream: the role, the text deltas, the finish reason, [usage], [DONE].
    Leaving early (the client disconnected) cancels the generation at its next step."""

    def chunk(delta: dict, finish=None, extra=None) -> str:
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if extra is not None:
            body["specllava"] = extra
        return f"data: {json.dumps(body)}\n\n"

    event, done = first, False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            if event["type"] == "delta":
                yield chunk({"content": event["text"]}, extra={"pieces": event["pieces"], **event["stats"]})
            elif event["type"] == "done":
                yield chunk({}, event["finish_reason"], extra=event["stats"])
                if job.request.include_usage:
                    yield f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': [], 'usage': _usage(job, event)})}\n\n"
                break
            else:
                yield f"data: {json.dumps(event['error'].body())}\n\n"
                break
            event = await job.events.get()
        yield "data: [DONE]\n\n"
        done = True
    finally:
        if not done:
            job.cancelled.set()


def _usage(job: Job, event: dict) -> dict:
    n = event["completion_tokens"]
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": n, "total_tokens": job.prompt_tokens + n}


def _model_card(limits: Limits) -> dict:
    return {"id": limits.model_name, "object": "model", "created": 0, "owned_by": "specllava"}
