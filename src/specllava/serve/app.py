"""The FastAPI app: OpenAI's chat-completions and completions APIs over an `Engine`, plus
/v1/models, /health, /metrics and the web page at /.

`create_app(engine, limits, security)` builds it; `specllava serve` runs it with uvicorn. The
engine may come later (`attach(app, engine)`): until then the API answers 503 (starting), as it
does once `app.state.closing` is set (shutting down). Every error a client can cause is answered
in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status (429 when
the queue is full, with Retry-After), and the server keeps serving. `security.py` says who may
call the API.

Responses carry OpenAI's fields and one more, `specllava`: the request's speculative statistics
(mean accepted length, draft tokens proposed and accepted, target forwards, ...); with n > 1 each
choice carries its own and the top-level one is the first choice's. Streamed chunks carry them
too, with `pieces`: the chunk's text split by token, each piece marked as coming from an accepted
draft proposal or from the target, and the verification step that emitted it.
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
from starlette.middleware.cors import CORSMiddleware

from .engine import Engine, Job, QueueFull
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .protocol import APIError, ChatRequest, Limits, parse_completion, parse_request
from .security import Security, refusal

STATIC = Path(__file__).with_name("static")
log = logging.getLogger("specllava.serve")
_POLL_S = 0.25  # how often a waiting request checks that its client is still there
_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


def create_app(engine: Engine | None, limits: Limits, security: Security | None = None) -> FastAPI:
    app = FastAPI(title="specllava", summary="OpenAI-compatible server with lossless speculative decoding",
                  docs_url=None, redoc_url=None)  # their pages load scripts from a CDN; /openapi.json stays
    security = security or Security()
    st = app.state
    st.engine, st.limits, st.security, st.closing, st.replica = None, limits, security, False, None
    st.metrics = metrics = Metrics(lambda: st.engine.queue_length() if st.engine else 0,
                                   lambda: st.engine.running if st.engine else 0)
    if engine is not None:
        attach(app, engine)

    def error_response(err: APIError, headers: dict | None = None) -> JSONResponse:
        metrics.error(err.code, err.type)
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, err: APIError):
        return error_response(err, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(APIError(str(err.detail), err.status_code, kind))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(request, parse_request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, parse_completion, chat=False)

    async def _complete(request: Request, parse, chat: bool):
        try:
            return await _answer(request, parse, chat)
        except APIError:
            raise
        except Exception as err:  # noqa: BLE001  (answered in OpenAI's shape; the server keeps serving)
            log.exception("completion failed")
            raise APIError(f"internal error: {type(err).__name__}: {err}", status=500, type="server_error") from err

    async def _answer(request: Request, parse, chat: bool):
        engine, limits = st.engine, st.limits
        cap = limits.body_cap()
        body = await _read_body(request, cap)
        if body is None:
            raise APIError(f"the request body is over {cap} bytes (the images and text a request may hold)",
                           status=413, code="request_too_large")
        payload = _parse_json(body)
        req = await run_in_threadpool(parse, payload, limits)
        inputs = await engine.encode_async(req)
        try:
            jobs = engine.submit(req, inputs, asyncio.get_running_loop())
        except QueueFull:
            raise APIError(f"the server is busy: {engine.queue.maxsize} requests are already waiting; retry later",
                           status=429, type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(engine.retry_after_s(metrics.recent_latency_s))}) from None
        first = await _next_event(jobs, request)
        if first is None:  # the client went away while its request waited
            return Response(status_code=499)
        if first["type"] == "error":
            _cancel(jobs)
            raise first["error"]
        prefix = "chatcmpl" if chat else "cmpl"
        meta = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": limits.model_name}
        fmt = _ChatFormat(meta) if chat else _CompletionFormat(meta)
        if req.stream:
            return StreamingResponse(_sse(jobs, first, fmt, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        done: dict[int, dict] = {}
        event = first
        while True:
            if event["type"] == "error":
                _cancel(jobs)
                raise event["error"]
            if event["type"] == "done":
                done[event["index"]] = event
                if len(done) == len(jobs):
                    break
            event = await _next_event(jobs, request)
            if event is None:
                return Response(status_code=499)
        results = [done[i] for i in range(len(jobs))]
        return {**meta, "object": fmt.object, "choices": [fmt.choice(i, r, req) for i, r in enumerate(results)],
                "usage": _usage(jobs[0], results), "specllava": results[0]["stats"]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(st.limits)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != st.limits.model_name:
            raise APIError(f"The model {name!r} does not exist", status=404, type="not_found_error", code="model_not_found")
        return _model_card(st.limits)

    @app.get("/health")
    async def health():
        engine = st.engine
        if engine is None or st.closing:
            return JSONResponse({"status": "starting" if engine is None else "shutting_down"}, status_code=503,
                                headers={"Retry-After": "5"})
        return {"status": "ok", "model": st.limits.model_name, "method": engine.method, "max_batch": engine.max_batch,
                "queue_length": engine.queue_length(), "running": engine.running, "max_tokens": st.limits.max_tokens,
                "auth": bool(security.api_keys)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(_Guard, app_state=st)  # innermost of the two: CORS answers preflights first
    if security.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(security.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    return app


def attach(app: FastAPI, engine: Engine) -> None:
    """Give a starting app its engine: the API serves from now on, within the engine's limits
    (its images per request, its prompt's character bound)."""
    st = app.state
    st.limits = dataclasses.replace(st.limits, max_images=min(st.limits.max_images, engine.max_images),
                                    max_prompt_chars=engine.max_prompt_chars)
    metrics = st.metrics
    engine.on_finish = lambda job, result: metrics.finish(job.prompt_tokens, result, time.monotonic() - job.created)
    engine.on_start = lambda job: metrics.started(job.started - job.created)
    engine.on_step = lambda job, emitted: metrics.step(emitted)
    engine.on_batch = metrics.batch
    st.engine = engine


class _Guard:
    """ASGI middleware: the security checks (`security.refusal`), 503 while starting or shutting
    down, and the count of API requests by endpoint and status."""

    def __init__(self, app, app_state):
        self.app, self.st = app, app_state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st, path = self.st, scope.get("path", "")
        err = refusal(scope, st.security)
        headers = {}
        if err is None and path.startswith("/v1/") and scope.get("method") == "POST":
            if st.engine is None:
                err = APIError("the server is starting: the models are still loading; retry shortly", status=503,
                               type="server_error", code="starting")
            elif st.closing:
                err = APIError("the server is shutting down", status=503, type="server_error", code="shutting_down")
            headers = {"Retry-After": "5"} if err else {}
        endpoint = _ENDPOINTS.get(path)
        replica = getattr(st, "replica", None)
        if replica is not None:  # a Ray Serve replica (`serve.ray`) says which one answered
            send = _with_header(send, b"x-specllava-replica", str(replica).encode())
        if err is not None:
            st.metrics.error(err.code, err.type)
            if endpoint:
                st.metrics.requests.labels(endpoint, str(err.status)).inc()
            if err.status == 401:
                headers["WWW-Authenticate"] = "Bearer"
            return await JSONResponse(err.body(), status_code=err.status, headers=headers)(scope, receive, send)
        if not endpoint:
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                st.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counting_send)


def _with_header(send, name: bytes, value: bytes):
    async def sending(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return sending


def _parse_json(body: bytes):
    try:
        return json.loads(body)
    except RecursionError:
        raise APIError("the request body is nested too deeply to be a request", code="json_too_deep") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(f"the request body is not valid JSON ({err})") from None


async def _read_body(request: Request, cap: int) -> bytes | None:
    """The request body, or None when it is over `cap` bytes. The rest of an oversized body is read
    and dropped rather than left unread, so the client gets the 413 instead of a reset connection."""
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= cap:
            parts.append(chunk)
        elif parts:
            parts = []  # drop what was kept: the memory goes back at once
    return b"".join(parts) if size <= cap else None


def _cancel(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancelled.set()


async def _next_event(jobs: list[Job], request: Request) -> dict | None:
    """The next event of the request's jobs (they share one queue); None (and the jobs cancelled)
    once the client has disconnected, which is checked at least every _POLL_S seconds, also while
    events keep coming."""
    job = jobs[0]
    while True:
        if time.monotonic() - job.checked_client >= _POLL_S:
            job.checked_client = time.monotonic()
            if await request.is_disconnected():
                _cancel(jobs)
                return None
        try:
            return await asyncio.wait_for(job.events.get(), _POLL_S)
        except TimeoutError:
            pass


class _ChatFormat:
    """OpenAI's chat-completion response and chunk shapes."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, meta: dict):
        self.meta = meta

    def choice(self, index: int, result: dict, req: ChatRequest) -> dict:
        lp = {"content": result["logprobs"], "refusal": None} if req.logprobs else None
        return {"index": index, "message": {"role": "assistant", "content": result["text"]}, "logprobs": lp,
                "finish_reason": result["finish_reason"], "specllava": result["stats"]}

    def first(self, index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, index: int, text: str, logprobs: list | None, finish=None) -> dict:
        return {"index": index, "delta": {"content": text} if text or finish is None else {},
                "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None}, "finish_reason": finish}


class _CompletionFormat(_ChatFormat):
    """OpenAI's (legacy) completions shapes: `text` instead of a message, its own logprobs shape."""

    object, chunk_object = "text_completion", "text_completion"

    def choice(self, index: int, result: dict, req: ChatRequest) -> dict:
        lp = _legacy_logprobs(result["logprobs"]) if req.logprobs else None
        return {"index": index, "text": result["text"], "logprobs": lp, "finish_reason": result["finish_reason"],
                "specllava": result["stats"]}

    def first(self, index: int) -> None:
        return None  # no role chunk in this API

    def delta(self, index: int, text: str, logprobs: list | None, finish=None) -> dict:
        return {"index": index, "text": text, "logprobs": None if logprobs is None else _legacy_logprobs(logprobs),
                "finish_reason": finish}


def _legacy_logprobs(entries: list[dict]) -> dict:
    """The completions API's shape; text_offset counts characters of the answer, a token that ends
    inside a character counted where that character starts."""
    offsets, raw = [], b""
    for e in entries:
        offsets.append(len(raw.decode("utf-8", "ignore")))
        raw += bytes(e["bytes"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


async def _sse(jobs: list[Job], first: dict, fmt: _ChatFormat, req: ChatRequest):
    """OpenAI's chunk stream: for each choice the role, the text deltas and the finish reason
    (choices interleaved as they come), then [usage], then [DONE]. Leaving early (the client
    disconnected) cancels the generations at their next step."""

    def chunk(choice: dict | None, extra=None, **top) -> str:
        body = {**fmt.meta, "object": fmt.chunk_object, "choices": [] if choice is None else [choice], **top}
        if extra is not None:
            body["specllava"] = extra
        return f"data: {json.dumps(body)}\n\n"

    event, done, finished = first, False, {}
    sent_lp = [0] * len(jobs)  # logprobs entries sent per choice
    try:
        for i in range(len(jobs)):
            if (c := fmt.first(i)) is not None:
                yield chunk(c)
        while True:
            i = event["index"]
            if event["type"] == "delta":
                lp = event.get("logprobs") if req.logprobs else None
                sent_lp[i] += len(lp or [])
                yield chunk(fmt.delta(i, event["text"], lp), extra={"pieces": event["pieces"], **event["stats"]})
            elif event["type"] == "done":
                lp = event["logprobs"][sent_lp[i]:] if req.logprobs else None
                yield chunk(fmt.delta(i, "", lp, event["finish_reason"]), extra=event["stats"])
                finished[i] = event
                if len(finished) == len(jobs):
                    if req.include_usage:
                        yield chunk(None, usage=_usage(jobs[0], [finished[k] for k in sorted(finished)]))
                    break
            else:
                _cancel(jobs)
                yield f"data: {json.dumps(event['error'].body())}\n\n"
                break
            event = await jobs[0].events.get()
        yield "data: [DONE]\n\n"
        done = True
    finally:
        if not done:
            _cancel(jobs)


def _usage(job: Job, results: list[dict]) -> dict:
    n = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": n, "total_tokens": job.prompt_tokens + n}


def _model_card(limits: Limits) -> dict:
    return {"id": limits.model_name, "object": "model", "created": 0, "owned_by": "specllava"}
