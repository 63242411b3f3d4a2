"""Completion requests in OpenAI's format: parsing, validation and the error shape.

`parse_request(body, limits)` turns the JSON body of `POST /v1/chat/completions` into a
`ChatRequest` (the conversation with its images decoded, and the sampling parameters), and
`parse_completion(body, limits)` that of `POST /v1/completions` (a text prompt, used as it is);
both raise `APIError`, which the app answers as OpenAI does: a 4xx status and
`{"error": {"message", "type", "param", "code"}}`. Every check runs before the request is queued,
so a bad request never costs the models any work.

The types and ranges of the fields are checked by pydantic in strict mode (`true` is not a number,
`"1"` not an integer); what pydantic cannot say (unsupported values, the image bytes, the model
name, text that is not valid Unicode) is checked by hand below.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered to the client in OpenAI's shape (a 4xx unless said otherwise)."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers  # e.g. Retry-After

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What a request may ask for; set by `specllava serve`'s flags."""

    model_name: str = "specllava"
    max_tokens: int = 512  # most completion tokens a request may ask for (and the default)
    max_image_bytes: int = 20 * 1024 * 1024  # an image's encoded size, after base64 decoding
    max_image_pixels: int = 4096 * 4096
    max_images: int = 4  # at most, for a target that takes several (LLaVA-1.5 takes one, a text-only target none)
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0
    max_n: int = 8  # most choices per request (each is decoded as a request of its own)
    max_prompt_chars: int | None = None  # set from the model: more cannot fit its context

    def body_cap(self) -> int:
        """The largest request body that can hold an acceptable request: every image at its byte
        cap in base64, the text at its character cap with every character JSON-escaped (6 bytes,
        \\uXXXX), and 1 MiB for everything else."""
        text = 6 * (self.max_prompt_chars if self.max_prompt_chars is not None else 1024 * 1024)
        return self.max_images * (self.max_image_bytes * 4 // 3 + 1024) + text + 1024 * 1024


# ----------------------------------------------------------------------------------------------
# The request body, as pydantic checks it.

_STRICT = ConfigDict(extra="allow", strict=True)
_SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit signed integer, as OpenAI's: distinct seeds stay distinct
MAX_TOP_LOGPROBS = 20


class _Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's padding of chunks against side channels: none here


class _Sampling(BaseModel):
    """The fields both endpoints read. Anything else is refused unless it is listed in `IGNORED`
    (metadata that changes nothing about the answer) or `NEUTRAL` at its neutral value."""

    model_config = _STRICT

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # an extension, as in vLLM: -1 or 0 = off
    seed: int | None = Field(default=None, ge=_SEED_RANGE[0], le=_SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    n: int | None = Field(default=1, ge=1)


class ChatCompletionRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # how many top tokens per position
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


# Accepted and ignored: they describe the caller or ask for a default this server has anyway.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# Accepted only at the value that changes nothing.
NEUTRAL = {
    "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "tools": None, "tool_choice": None,
    "functions": None, "function_call": None, "response_format": None, "modalities": None, "audio": None,
    "prediction": None,
}
# What other servers take and this one does not (the answer would not be the target's own
# distribution, or a search rather than sampling): refused by name, saying what is supported.
UNSUPPORTED = {
    "repetition_penalty": "a repetition penalty changes the target's distribution",
    "min_tokens": "a minimum length changes the target's distribution",
    "min_new_tokens": "a minimum length changes the target's distribution",
    "num_beams": "beam search is not sampling from the target",
    "use_beam_search": "beam search is not sampling from the target",
    "length_penalty": "it applies to beam search, which this server does not do",
    "min_p": "only temperature, top_p and top_k shape the sampling",
    "typical_p": "only temperature, top_p and top_k shape the sampling",
}
SUPPORTED_SAMPLING = "temperature, top_p, top_k, seed, max_tokens, max_completion_tokens, stop, n, logprobs"
_MAX_STOPS = 4


@dataclass
class ChatRequest:
    """A validated request: `conversation` in the processor's chat format (an image as
    `{"type": "image"}`), the decoded `images` (PIL, in order), and the generation parameters.
    A `/v1/completions` request has `raw_prompt`, its text used as it is (no chat template), and
    its conversation holds that text alone."""

    conversation: list[dict]
    images: list = field(default_factory=list)
    max_tokens: int | None = None  # None: up to the server's limit and the context
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0  # most likely alternatives reported per token (with logprobs)
    raw_prompt: str | None = None

    @property
    def image(self):
        """The one image (LLaVA-1.5 takes one), or None."""
        return self.images[0] if self.images else None


def _validate(model: type[BaseModel], body: Any) -> BaseModel:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        msg = first["msg"]
        if first["loc"] and first["loc"][-1] == "seed" and first["type"] in ("greater_than_equal", "less_than_equal"):
            msg = "a seed is a 64-bit signed integer, from -2**63 to 2**63 - 1"
        raise APIError(f"invalid value for {param}: {msg}" if param else msg, param=param) from None
    _check_unsupported(req)
    return req


def _common(req: _Sampling, limits: Limits, max_tokens_param: str, max_tokens: int | None) -> dict:
    """The fields both endpoints share, checked: model, n, stop, max_tokens, sampling."""
    if req.model is not None and req.model != limits.model_name:
        raise APIError(f"The model {req.model!r} does not exist; this server serves {limits.model_name!r} (GET /v1/models)",
                       status=404, param="model", code="model_not_found")
    n = req.n or 1
    if n > limits.max_n:
        raise APIError(f"n={n}: this server returns at most {limits.max_n} choices per request", param="n",
                       code="unsupported_parameter")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > _MAX_STOPS or any(not s for s in stops):
        raise APIError(f"stop must be a non-empty string or a list of at most {_MAX_STOPS} non-empty strings", param="stop")
    for i, s in enumerate(stops):
        _check_unicode(s, f"stop.{i}" if isinstance(req.stop, list) else "stop")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(f"{max_tokens_param} is {max_tokens}, but this server allows at most {limits.max_tokens} "
                       "(specllava serve --max-tokens)", param=max_tokens_param)
    return dict(
        max_tokens=max_tokens,
        temperature=0.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        seed=req.seed,
        stop=stops,
        stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        n=n,
    )


def parse_request(body: Any, limits: Limits) -> ChatRequest:
    """The validated chat request, or `APIError` naming the first thing wrong with it."""
    req = _validate(ChatCompletionRequest, body)
    if req.top_logprobs and not req.logprobs:
        raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
    max_tokens, param = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens is not None
                         else (req.max_tokens, "max_tokens"))
    common = _common(req, limits, param, max_tokens)
    conversation, image_urls = _conversation(req.messages)
    if len(image_urls) > limits.max_images:
        if limits.max_images == 0:
            raise APIError("this model takes no images: its target is a text-only language model", param="messages")
        raise APIError(f"{len(image_urls)} images given, but this model takes at most {limits.max_images} per request",
                       param="messages")
    images = [load_image(url, limits) for url in image_urls]
    return ChatRequest(conversation=conversation, images=images, logprobs=bool(req.logprobs),
                       top_logprobs=req.top_logprobs or 0, **common)


def parse_completion(body: Any, limits: Limits) -> ChatRequest:
    """The validated `/v1/completions` request (one text prompt), or `APIError`."""
    req = _validate(CompletionRequest, body)
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(f"prompt: one prompt per request (got a list of {len(prompt)}); send several requests, "
                           "or use n for several completions of one prompt", param="prompt",
                           code="unsupported_parameter")
        prompt = prompt[0]
    if not prompt:
        raise APIError("prompt is empty", param="prompt")
    _check_unicode(prompt, "prompt")
    for name, neutral in (("echo", False), ("suffix", None), ("best_of", None)):
        value = getattr(req, name)
        if value not in (neutral, None) and not (name == "best_of" and value == (req.n or 1)):
            raise APIError(f"{name}={value!r} is not supported by this server", param=name, code="unsupported_parameter")
    common = _common(req, limits, "max_tokens", req.max_tokens)
    conversation = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    return ChatRequest(conversation=conversation, raw_prompt=prompt, logprobs=req.logprobs is not None,
                       top_logprobs=req.logprobs or 0, **common)


def _check_unsupported(req: _Sampling) -> None:
    for name, value in (req.model_extra or {}).items():
        if name in IGNORED:
            continue
        if name in NEUTRAL:
            if value in (NEUTRAL[name], None) or (name == "response_format" and value == {"type": "text"}):
                continue
            raise APIError(f"{name}={value!r} is not supported by this server", param=name, code="unsupported_parameter")
        if name in UNSUPPORTED:
            raise APIError(f"{name} is not supported: {UNSUPPORTED[name]}. This server samples from the target "
                           f"itself, shaped by {SUPPORTED_SAMPLING}", param=name, code="unsupported_parameter")
        raise APIError(f"Unrecognized request argument supplied: {name}", param=name, code="unsupported_parameter")


def _check_unicode(text: str, param: str) -> None:
    """Text must be valid Unicode: JSON's \\ud800 escapes can carry a lone surrogate, which no
    tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise APIError(f"{param} is not valid Unicode: a lone surrogate {text[err.start]!r} at character {err.start}",
                       param=param, code="invalid_unicode") from None


def _conversation(messages: list[_Message]) -> tuple[list[dict], list[str]]:
    """(the processor's chat format, the image URLs in order). Within a message the image goes
    before its text, as LLaVA-1.5 was trained (and as `specllava generate` prompts it)."""
    conversation, urls = [], []
    for i, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        if msg.content is None:
            raise APIError(f"messages[{i}].content is missing", param=f"messages.{i}.content")
        if isinstance(msg.content, str):
            _check_unicode(msg.content, f"messages.{i}.content")
            conversation.append({"role": role, "content": [{"type": "text", "text": msg.content}]})
            continue
        texts, images = [], []
        for j, part in enumerate(msg.content):
            where = f"messages.{i}.content.{j}"
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                _check_unicode(part["text"], where + ".text")
                texts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url:
                    raise APIError("an image_url part needs {\"image_url\": {\"url\": \"data:image/...;base64,...\"}}", param=where)
                if role != "user":
                    raise APIError("images are accepted in user messages only", param=where)
                images.append({"type": "image"})
                urls.append(url)
            else:
                raise APIError(f"content part of type {kind!r} is not supported: use 'text' (with a string 'text') "
                               "or 'image_url'", param=where)
        conversation.append({"role": role, "content": images + texts})
    if conversation[-1]["role"] != "user":
        raise APIError("the last message must come from the user", param="messages")
    return conversation, urls


def load_image(url: str, limits: Limits):
    """The RGB PIL image behind a `data:` URL (or, when allowed, an http(s) URL), within the caps."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise APIError("an image data URL must look like data:image/png;base64,<base64 bytes>", param="image_url")
        if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
            raise APIError(f"the image is over the byte cap of {limits.max_image_bytes} bytes", param="image_url",
                           code="image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError("the image data URL is not valid base64", param="image_url") from None
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise APIError("remote image URLs are refused by this server: send the image inline as a data: URL "
                           "(base64), or start the server with --allow-remote-images", param="image_url",
                           code="remote_images_disabled")
        data = _fetch(url, limits)
    else:
        raise APIError("image_url must be a data: URL (base64) or an http(s) URL", param="image_url")
    return decode_image(data, limits)


def _fetch(url: str, limits: Limits) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_timeout_s) as resp:  # noqa: S310 (opt-in)
            data = resp.read(limits.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise APIError(f"could not fetch the image at {url}: {err}", param="image_url") from None
    if len(data) > limits.max_image_bytes:
        raise APIError(f"the image is over the byte cap of {limits.max_image_bytes} bytes", param="image_url",
                       code="image_too_large")
    return data


def decode_image(data: bytes, limits: Limits):
    from PIL import Image, UnidentifiedImageError

    from ..images import to_rgb

    if len(data) > limits.max_image_bytes:
        raise APIError(f"the image is over the byte cap of {limits.max_image_bytes} bytes", param="image_url",
                       code="image_too_large")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size  # read from the header, before any pixel is decoded
        if w * h > limits.max_image_pixels:
            raise APIError(f"the image is {w}x{h} = {w * h} pixels, over the cap of {limits.max_image_pixels}",
                           param="image_url", code="image_too_large")
        return to_rgb(img)  # the loader of the CLI and bench: EXIF orientation, 16-bit and float pixels
    except APIError:
        raise
    except Image.DecompressionBombError as err:  # PIL's own guard: more pixels than it will decode
        raise APIError(f"the image is too large to decode ({err})", param="image_url", code="image_too_large") from None
    except ValueError as err:
        if "too large" in str(err).lower():  # PIL's guard on decompressed chunks ("Decompressed Data Too Large")
            raise APIError(f"the image is too large to decode ({err})", param="image_url", code="image_too_large") from None
        raise APIError(f"the image bytes are not an image this server can read ({type(err).__name__})",
                       param="image_url", code="invalid_image") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise APIError(f"the image bytes are not an image this server can read ({type(err).__name__})",
                       param="image_url", code="invalid_image") from None
