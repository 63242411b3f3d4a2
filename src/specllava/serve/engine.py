"""The generation scheduler: a bounded first-come-first-served queue and one scheduler thread
that decodes up to N requests together, step by step (continuous batching).

`Engine(target, draft, processor, make_decoder, max_batch=N, max_queue=Q)` runs one thread over
one `SpeculativeDecoder` (from `make_decoder()`) and its step API (`core.decoder`): between two
steps it admits waiting requests in arrival order while fewer than N decode (`decoder.start`: the
prefill and the first token), then calls `decoder.step` on all of them, and hands each request
its new tokens. Requests wait in one FIFO queue of at most Q; `submit` raises `QueueFull` beyond
that (the app answers 429).

A request's state lives in its own `Job` and its decoder `Sequence` (caches, image, sampling
generator): nothing is shared with another request, and a step is the same for a sequence alone
or in a batch (`core.decoder`'s contract), so at temperature 0 an answer is the same alone or
under load, and a seeded sampled request too (its generator is seeded from the request alone).

`_Tracker` follows one request: after each step it turns the new tokens into text, marks which
came from accepted draft proposals (the step's first `len(path) - 1` tokens) and which from the
target (the step's last, its bonus token, and the prefill's first token), holds back text that
may be the start of a stop sequence, and hands the job an event. Between steps the scheduler ends
a request (`Sequence.finish`) whose client went away, whose stop sequence appeared or whose time
ran out; the others go on.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..core.model_info import is_vlm
from ..core.sampling import sampling_args
from .protocol import APIError, ChatRequest


log = logging.getLogger("specllava.serve")


class QueueFull(Exception):
    """The waiting queue is at its bound (answered with 429)."""


@dataclass(eq=False)  # compared and hashed by identity
class Job:
    """One choice of one request on its way through the queue and the scheduler. Events for the
    client arrive on `events` (an asyncio queue of the server's loop, shared by the request's
    choices): dicts with "type" delta | done | error, and the choice's "index"."""

    request: ChatRequest
    inputs: dict  # input_ids [1, prompt_len] (+ pixel_values)
    max_new_tokens: int
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() by which it must be done
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # shared by the n choices of one request
    index: int = 0  # which choice of its request (events carry it)
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)
    started: float | None = None  # when the scheduler picked it up
    checked_client: float = 0.0  # when the app last checked that the client is still connected

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    def emit(self, event: dict) -> None:
        event["index"] = self.index
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the server's loop is gone (shutting down): nobody is listening
            self.cancelled.set()


class Engine:
    """Owns the models, the queue and the scheduler; `encode` and `submit` are its public face."""

    def __init__(self, target, draft, processor, make_decoder: Callable[[], object], *, max_batch: int = 1,
                 max_queue: int = 64, max_tokens: int = 512, request_timeout_s: float = 300.0, method: str = "dynamic",
                 on_finish: Callable[[Job, dict], None] | None = None, encode_threads: int = 2):
        if max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"--max-queue must be >= 1, got {max_queue}")
        self.target, self.draft, self.processor = target, draft, processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.method, self.max_tokens, self.request_timeout_s = method, max_tokens, request_timeout_s
        self.context = _context_length(target)
        self.max_images = _images_per_request(target)
        self.image_token = getattr(processor, "image_token", None) if self.max_images else None
        # A token spans at most this many characters of text, so a prompt longer than context x that
        # cannot fit the context, whatever it says: refused before the tokenizer sees it.
        self.max_prompt_chars = self.context * _longest_token_chars(self.tokenizer)
        self.eos = _eos_ids(target)
        self.on_finish = on_finish
        self.on_start: Callable[[Job], None] | None = None
        self.on_step: Callable[[Job, int], None] | None = None  # (job, tokens its step emitted)
        self.on_batch: Callable[[int], None] | None = None  # sequences decoded by one step
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        # Prompts are encoded off the event loop and off the scheduler, by a few threads each with its
        # own copy of the processor: a fast tokenizer refuses concurrent calls on one instance
        # ("Already borrowed"), and one shared lock would make every request wait for the longest.
        self._local = threading.local()
        self._encoder = ThreadPoolExecutor(max_workers=encode_threads, thread_name_prefix="specllava-encode")
        self.max_batch = max_batch
        self._active: list[_Running] = []  # decoding now, in arrival order (the scheduler's own)
        self.decoder = make_decoder()
        self.thread = threading.Thread(target=self._schedule, name="specllava-scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------------------
    async def encode_async(self, request: ChatRequest) -> dict:
        """`encode` in the engine's encoding threads (the event loop keeps serving meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self._encoder, self.encode, request)

    def encode(self, request: ChatRequest) -> dict:
        """The prompt's tensors (the chat template, then the processor), checked against the context."""
        chars = self.check_text(request)
        try:
            return self._encode(request)
        finally:
            if chars > _LARGE_PROMPT_CHARS:
                _release_memory()

    def _encode(self, request: ChatRequest) -> dict:
        processor = getattr(self._local, "processor", None)
        if processor is None:
            processor = self._local.processor = copy.deepcopy(self.processor)
        if request.raw_prompt is not None:  # /v1/completions: the text as it is, as a tokenizer call encodes it
            inputs = dict(getattr(processor, "tokenizer", processor)(request.raw_prompt, return_tensors="pt"))
        else:
            images = request.images if len(request.images) > 1 else request.image
            inputs = encode_chat(processor, request.conversation, images)
        n = int(inputs["input_ids"].shape[1])
        what = "prompt" if request.raw_prompt else "messages"
        if n >= self.context:
            raise APIError(f"This model's maximum context length is {self.context} tokens, but the {what} take {n}",
                           param=what, code="context_length_exceeded")
        if request.max_tokens is not None and n + request.max_tokens > self.context:
            raise APIError(f"This model's maximum context length is {self.context} tokens; you requested "
                           f"{n + request.max_tokens} ({n} in the {what}, {request.max_tokens} in the completion)",
                           param="max_tokens", code="context_length_exceeded")
        return inputs

    def check_text(self, request: ChatRequest) -> int:
        """What the text may not hold, checked before any tokenization: more characters than the
        context can take, and the image placeholder written as text (the processor would expand it
        into image tokens with no image, or more than the images given). Returns the characters."""
        texts = [p["text"] for m in request.conversation for p in m["content"] if p["type"] == "text"]
        what = "prompt" if request.raw_prompt else "messages"
        chars = sum(map(len, texts))
        if chars > self.max_prompt_chars:
            raise APIError(f"the {what} hold {chars} characters: more than this model's context of {self.context} "
                           f"tokens can take (at most {self.max_prompt_chars} characters)", param=what,
                           code="context_length_exceeded")
        if self.image_token and any(self.image_token in t for t in texts):
            raise APIError(f"the text contains the image placeholder {self.image_token!r}: send images as image_url "
                           "parts (the server places them); the placeholder may not appear as text", param=what,
                           code="image_token_in_text")
        return chars

    def submit(self, request: ChatRequest, inputs: dict, loop: asyncio.AbstractEventLoop) -> list[Job]:
        """Queue the request's n choices, each a job of its own (choice i samples with seed + i),
        all or none: `QueueFull` when the queue has no room for all of them."""
        room = self.context - int(inputs["input_ids"].shape[1])
        max_new = min(request.max_tokens or self.max_tokens, room)
        deadline, events = time.monotonic() + self.request_timeout_s, asyncio.Queue()
        jobs = [Job(request, inputs, max_new, loop, deadline=deadline, events=events, index=i,
                    seed=None if request.seed is None else request.seed + i) for i in range(request.n)]
        if len(jobs) > self.queue.maxsize:
            raise APIError(f"n={len(jobs)}: each choice takes a place in the queue, which holds {self.queue.maxsize} "
                           "(specllava serve --max-queue)", param="n", code="unsupported_parameter")
        with self._lock:  # only this (the event loop's) thread adds to the queue; the scheduler only takes
            if self.queue.maxsize - self.queue.qsize() < len(jobs):
                raise QueueFull
            for job in jobs:
                self.queue.put_nowait(job)
        return jobs

    def retry_after_s(self, recent_latency_s: float | None) -> int:
        """A guess at when the queue has room again, for 429's Retry-After: the queue's work over
        the batch, from the recent request latency; between 1 and 60 s."""
        per_request = recent_latency_s or 1.0
        return int(min(60, max(1, round(per_request * (self.queue_length() + 1) / self.max_batch))))

    def queue_length(self) -> int:
        return self.queue.qsize()

    def close(self) -> None:
        """Stop the scheduler: queued requests are dropped, running ones end at the next step."""
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
        with self._lock:
            for run in self._active:
                run.job.cancelled.set()
        self.queue.put(None)
        self.thread.join(timeout=30)
        self._encoder.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------
    def _schedule(self) -> None:
        """Admit (FCFS, up to max_batch), end what must end, step the rest; until close()."""
        while True:
            if not self._admit():
                return
            for run in list(self._active):  # between steps: cancel, stop sequence, time limit
                if (reason := run.tracker.stop_reason()) is not None:
                    run.seq.finish(reason)  # "stop", "cancelled" or "time_limit": core's reasons too
                    run.tracker.stopped = reason
            self._retire()
            live = list(self._active)
            if not live:
                continue
            try:
                results = self.decoder.step([run.seq for run in live])
            except Exception as err:  # noqa: BLE001  (the failed step's requests fail; the server goes on)
                log.exception("a decoding step failed")
                for run in live:
                    self._fail(run.job, err)
                with self._lock:
                    self._active = [run for run in self._active if run not in live]
                continue
            if self.on_batch is not None:
                self.on_batch(len(results))
            by_seq = {id(r.sequence): r for r in results}
            for run in live:
                result = by_seq.get(id(run.seq))
                if result is not None:
                    run.tracker.on_step(result.tree, result.verdict)
                    run.tracker.add(result.tokens, result.logits)
            self._retire()

    def _admit(self) -> bool:
        """Start waiting requests while fewer than max_batch decode: block for one when none
        does. False once close() was called."""
        while len(self._active) < self.max_batch:
            try:
                job = self.queue.get(block=not self._active)
            except queue.Empty:
                return True
            if job is None:
                for run in self._active:
                    run.seq.finish("cancelled")
                    run.tracker.stopped = "cancelled"
                self._retire()
                return False
            if job.cancelled.is_set():
                continue
            if time.monotonic() > job.deadline:
                job.emit({"type": "error", "error": APIError(
                    f"the request waited its whole time limit ({self.request_timeout_s:g} s) in the queue; retry later",
                    status=503, type="timeout", code="queue_timeout")})
                continue
            job.started = time.monotonic()
            if self.on_start is not None:
                self.on_start(job)
            try:
                run = self._start(job)
            except Exception as err:  # noqa: BLE001  (a failed request must not stop the scheduler)
                log.exception("starting a generation failed")
                self._fail(job, err)
                continue
            with self._lock:
                self._active.append(run)
        return True

    def _start(self, job: Job) -> "_Running":
        """The request's prefill and first token (`decoder.start`)."""
        req = job.request
        tracker = _Tracker(job, self.tokenizer, self.eos, self.method, self.on_step)
        # what else the processor gave (LLaVA-NeXT's image_sizes, ...) goes on, as in generate()
        seq = self.decoder.start(**job.inputs, max_new_tokens=job.max_new_tokens,
                                 **sampling_args(req.temperature, req.top_k, req.top_p), seed=job.seed,
                                 keep_logits=req.logprobs)
        tracker.add(seq.tokens, seq.first_logits)
        return _Running(job, seq, tracker)

    def _retire(self) -> None:
        """Finish the requests whose sequence has ended: their last text, stats and event."""
        done = [run for run in self._active if run.seq.finished]
        if not done:
            return
        with self._lock:
            self._active = [run for run in self._active if not run.seq.finished]
        for run in done:
            result = run.tracker.finish()
            # counted before the client hears of it, so what it reads next (/metrics, /health) includes it
            if self.on_finish is not None:
                self.on_finish(run.job, result)
            run.job.emit({"type": "done", **result})

    def _fail(self, job: Job, err: Exception) -> None:
        job.emit({"type": "error", "error": APIError(f"generation failed: {type(err).__name__}: {err}", status=500,
                                                     type="server_error")})

    @property
    def running(self) -> int:
        return len(self._active)


@dataclass(eq=False)
class _Running:
    job: Job
    seq: object  # core.sequence.Sequence
    tracker: "_Tracker"


class _Tracker:
    """One request's text, marks, logprobs and stats as its steps come (see the module docstring)."""

    def __init__(self, job: Job, tokenizer, eos: set[int], method: str, on_step=None):
        self.job, self.tokenizer, self.eos, self.method, self.step_hook = job, tokenizer, eos, method, on_step
        self.stops = job.request.stop
        self.tokens: list[int] = []
        self.ends: list[int] = []  # ends[i]: length of the text once token i is decoded
        self.kinds: list[tuple[bool, int]] = []  # (from an accepted draft proposal, step) per token
        self.text, self.sent = "", 0
        self.cut: int | None = None  # where a stop sequence starts
        self.pending_accepted = 0
        self.steps = self.accepted = self.drafted = 0
        self.hist: list[int] = []
        self.stopped: str | None = None
        self.t_first: float | None = None
        self.top = job.request.top_logprobs
        self.logprobs: list[dict] = []  # per token, with logprobs on (OpenAI's chat shape)
        self.lp_sent = 0  # logprobs entries already sent with a delta

    # the scheduler calls these after each step: on_step, then add with the step's tokens ---------
    def on_step(self, tree, verdict) -> None:
        k = len(verdict.path) - 1  # accepted draft tokens this step; the step's last token is the bonus
        self.pending_accepted = k
        self.steps += 1
        self.accepted += k
        self.drafted += len(tree) - 1
        self.hist += [0] * (k + 1 - len(self.hist))
        self.hist[k] += 1
        if self.step_hook is not None:
            self.step_hook(self.job, k + 1)

    def add(self, new: list[int], logits: torch.Tensor | None = None) -> None:
        """The tokens a step (or the prefill) emitted, with the target's logits behind them when
        the request wants logprobs."""
        if self.t_first is None:
            self.t_first = time.monotonic()
        k, self.pending_accepted = self.pending_accepted, 0
        if logits is not None and new:
            self.logprobs += self._logprobs(logits[: len(new)], new)
        for i, tok in enumerate(new):
            self.tokens.append(int(tok))
            self.kinds.append((i < k, self.steps))
            self.ends.append(len(self._decode(self.tokens)))
        self.text = self._decode(self.tokens)
        self._emit_text(final=False)

    def stop_reason(self) -> str | None:
        """Why the request must end now (checked between steps): "stop" (a stop sequence
        appeared), "cancelled" (the client went away), "time_limit", or None."""
        if self.cut is not None:
            return "stop"
        if self.job.cancelled.is_set():
            return "cancelled"
        if time.monotonic() > self.job.deadline:
            return "time_limit"
        return None

    # ------------------------------------------------------------------------------------------
    def _logprobs(self, logits: torch.Tensor, tokens: list[int]) -> list[dict]:
        """OpenAI's logprobs entries of `tokens` under the target's raw logits [k, V] (before
        temperature, top_p and top_k: the model's own distribution), with the `top` likeliest."""
        logp = torch.log_softmax(logits.float(), dim=-1)  # [k, V]
        chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
        tops = logp.topk(self.top, dim=-1) if self.top else None
        out = []
        for i, tok in enumerate(tokens):
            entry = self._token_entry(tok, chosen[i])
            entry["top_logprobs"] = ([self._token_entry(int(t), float(v)) for v, t in
                                      zip(tops.values[i].tolist(), tops.indices[i].tolist())] if tops is not None else [])
            out.append(entry)
        return out

    def _token_entry(self, tok: int, logprob: float) -> dict:
        raw = token_bytes(self.tokenizer, tok)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: named by its bytes, as OpenAI does
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(raw)}

    def _decode(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return text.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for its next byte

    def _safe_end(self) -> int:
        """How much of the text can go out: up to a stop sequence, and short of any tail that may
        still become one."""
        if self.stops:
            start = max(0, self.sent - max(map(len, self.stops)))
            hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.cut = min(hits)
                return self.cut
            hold = max((n for s in self.stops for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
            return len(self.text) - hold
        return len(self.text)

    def _emit_text(self, final: bool) -> None:
        if final:
            end = self.cut if self.cut is not None else len(self.text)
        else:
            end = self._safe_end()
        if end <= self.sent:
            return
        event = {"type": "delta", "text": self.text[self.sent:end], "pieces": self._pieces(self.sent, end),
                 "stats": self.stats()}
        if self.job.request.logprobs:  # the tokens whose text this delta completes (at the end: begins)
            n = sum(1 for i, e in enumerate(self.ends) if (e <= end or (final and (self.ends[i - 1] if i else 0) < end)))
            event["logprobs"], self.lp_sent = self.logprobs[self.lp_sent:n], max(self.lp_sent, n)
        self.job.emit(event)
        self.sent = end

    def _pieces(self, a: int, b: int) -> list[list]:
        """[text, drafted, step] for each token's share of text[a:b] (for the page's marking)."""
        pieces, start = [], 0
        for end, (drafted, step) in zip(self.ends, self.kinds):
            lo, hi = max(start, a), min(end, b)
            if hi > lo:
                pieces.append([self.text[lo:hi], drafted, step])
            start = max(start, end)
        return pieces

    def stats(self) -> dict:
        """The request's speculative statistics so far."""
        forwards = 1 + self.steps  # the prefill, then one verification forward per step
        decode_s = time.monotonic() - self.t_first if self.t_first is not None else 0.0
        n = len(self.tokens)
        return {
            "method": self.method,
            "completion_tokens": n,
            "mean_accepted_length": n / forwards,
            "draft_tokens_proposed": self.drafted,
            "draft_tokens_accepted": self.accepted,
            "target_forwards": forwards,
            "steps": self.steps,
            "accept_hist": list(self.hist),
            "time_to_first_token_s": (self.t_first - self.job.created) if self.t_first is not None else None,
            "tokens_per_second": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
        }

    def finish(self) -> dict:
        if self.stopped != "stop":
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            if self.ends:  # a trailing incomplete character, held back so far, belongs to the last token
                self.ends[-1] = max(self.ends[-1], len(self.text))
            if self.stops and self._safe_end() == self.cut:  # a stop sequence completed by the last character
                self.stopped = "stop"
            self._emit_text(final=True)
        if self.cut is not None:
            reason = "stop"
            self.text = self.text[: self.cut]
        elif self.tokens and self.tokens[-1] in self.eos:
            reason = "stop"
        else:
            reason = "length"  # max_tokens, the context, or the time limit (stats say which)
        stats = self.stats()
        stats["stopped_by"] = {"stop": "stop_sequence", "time_limit": "time_limit", "cancelled": "client_disconnected"}.get(
            self.stopped, "eos" if reason == "stop" else "max_tokens")
        result = {"text": self.text, "finish_reason": reason, "completion_tokens": len(self.tokens), "stats": stats}
        if self.job.request.logprobs:
            kept = len(self.tokens) if self.cut is None else sum(
                1 for i in range(len(self.tokens)) if (self.ends[i - 1] if i else 0) < self.cut)
            result["logprobs"] = self.logprobs[:kept]
        return result


# ----------------------------------------------------------------------------------------------
def encode_chat(processor, conversation: list[dict], image=None) -> dict:
    """A conversation's prompt tensors, encoded as `specllava generate` encodes its prompt (a
    text-only model's tokenizer gets each message's text as a string: its template reads strings)."""
    from ..models.hf import encode_conversation

    if not hasattr(processor, "image_processor"):
        conversation = [{**m, "content": "".join(p["text"] for p in m["content"] if p["type"] == "text")}
                        for m in conversation]
    return encode_conversation(processor, conversation, image)


def _context_length(model) -> int:
    cfg = getattr(model.config, "text_config", None) or model.config
    return int(getattr(cfg, "max_position_embeddings", None) or 2048)


@functools.lru_cache(maxsize=4)
def _byte_decoder(tokenizer) -> dict[str, int] | None:
    """char -> byte for a byte-level BPE vocabulary (GPT-2's mapping), None for any other."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ != "ByteLevel":
        return None
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer, tok: int) -> bytes:
    """The bytes one token stands for (a byte-level token may hold part of a UTF-8 character, which
    decode() would turn into U+FFFD); a special token as its name."""
    piece = tokenizer.convert_ids_to_tokens(tok)
    if piece is None:
        return b""
    if tok in tokenizer.all_special_ids:
        return piece.encode("utf-8")
    table = _byte_decoder(tokenizer)
    if table is not None and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
        return bytes([int(piece[3:5], 16)])
    return tokenizer.decode([tok]).encode("utf-8")


# A prompt this long leaves the tokenizer's buffers in the allocator's free lists (hundreds of MB
# for a prompt at the character bound of the default pair); they are handed back to the system.
_LARGE_PROMPT_CHARS = 64 * 1024


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        return None


def _release_memory() -> None:
    """Return the freed heap to the system (glibc's malloc_trim), so that a giant prompt, refused
    or not, leaves the process at the memory it had."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


# Targets whose processor places several images in one prompt, each expanded to its own tokens.
MULTI_IMAGE_TYPES = ("llava_next", "llava_onevision")


def _images_per_request(target) -> int:
    """0 for a text-only target, 1 for LLaVA-1.5 (trained on one image per conversation), 16 for
    a target that takes several (LLaVA-NeXT); `--max-images` may lower it."""
    if not is_vlm(target):
        return 0
    return 16 if getattr(target.config, "model_type", "") in MULTI_IMAGE_TYPES else 1


def _longest_token_chars(tokenizer) -> int:
    """The most characters one token stands for: the longest entry of the vocabulary, special and
    added tokens included. Byte-level and SentencePiece vocabularies write one symbol per byte or
    character (byte-fallback tokens like <0x0A> are longer than what they stand for), so this
    bounds the characters per token from above."""
    try:
        return max(1, max(map(len, tokenizer.get_vocab())))
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return 64  # a tokenizer without a readable vocabulary: a generous guess


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}
