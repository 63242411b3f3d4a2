"""Chat-completion requests in OpenAI's format: parsing, validation and the error shape.

`parse_request(body, limits)` turns the JSON body of `POST /v1/chat/completions` into a
`ChatRequest` (the conversation with its one image decoded, and the sampling parameters), or raises
`APIError`, which the app answers as OpenAI does: a 4xx status and
`{"error": {"message", "type", "param", "code"}}`. Every check runs before the request is queued,
so a bad request never costs the models any work.

The types and ranges of the fields are checked by pydantic (`ChatCompletionRequest`); what pydantic
cannot say (unsupported values, the image bytes, the model name) is checked by hand below.
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
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What a request may ask for; set by `specllava serve`'s flags."""

    model_name: str = "specllava"
    max_tokens: int = 512  # most completion tokens a request may ask for (and the default)
    max_image_bytes: int = 20 * 1024 * 1024  # an image's encoded size, after base64 decoding
    max_image_pixels: int = 4096 * 4096
    max_images: int = 1  # LLaVA-1.5 takes one image per conversation (a text-only target none)
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0


# ----------------------------------------------------------------------------------------------
# The request body, as pydantic checks it.

class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class _StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat-completion request that this server reads. Anything else is
    refused unless it is listed in `IGNORED` (metadata that changes nothing about the answer)."""

    model_config = ConfigDict(extra="allow")

    messages: list[_Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # an extension, as in vLLM: -1 or 0 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    n: int | None = 1


# Accepted and ignored: they describe the caller or ask for a default this server has anyway.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# Accepted only at the value that changes nothing.
NEUTRAL = {
    "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "top_logprobs": None,
    "logit_bias": None, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
    "response_format": None, "modalities": None, "audio": None, "prediction": None,
}
_MAX_STOPS = 4


@dataclass
class ChatRequest:
    """A validated request: `conversation` in the processor's chat format (an image as
    `{"type": "image"}`), the decoded `image` (PIL, or None), and the generation parameters."""

    conversation: list[dict]
    image: Any
    max_tokens: int | None  # None: up to the server's limit and the context
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_request(body: Any, limits: Limits) -> ChatRequest:
    """The validated request, or `APIError` naming the first thing wrong with it."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(f"invalid value for {param}: {first['msg']}" if param else first["msg"], param=param) from None
    _check_unsupported(req)
    if req.model is not None and req.model != limits.model_name:
        raise APIError(f"The model {req.model!r} does not exist; this server serves {limits.model_name!r} (GET /v1/models)",
                       status=404, param="model", code="model_not_found")
    conversation, image_urls = _conversation(req.messages)
    if len(image_urls) > limits.max_images:
        if limits.max_images == 0:
            raise APIError("this model takes no images: its target is a text-only language model", param="messages")
        raise APIError(f"{len(image_urls)} images given, but this model takes at most {limits.max_images} per request",
                       param="messages")
    image = load_image(image_urls[0], limits) if image_urls else None
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > _MAX_STOPS or any(not s for s in stops):
        raise APIError(f"stop must be a non-empty string or a list of at most {_MAX_STOPS} non-empty strings", param="stop")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        raise APIError(f"{param} is {max_tokens}, but this server allows at most {limits.max_tokens} (specllava serve --max-tokens)",
                       param=param)
    return ChatRequest(
        conversation=conversation,
        image=image,
        max_tokens=max_tokens,
        temperature=0.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        seed=req.seed,
        stop=stops,
        stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.n not in (1, None):
        raise APIError(f"n={req.n} is not supported: this server returns one choice per request (n=1); "
                       "send several requests instead", param="n", code="unsupported_parameter")
    for name, value in (req.model_extra or {}).items():
        if name in IGNORED:
            continue
        if name in NEUTRAL:
            if value in (NEUTRAL[name], None) or (name == "response_format" and value == {"type": "text"}):
                continue
            raise APIError(f"{name}={value!r} is not supported by this server", param=name, code="unsupported_parameter")
        raise APIError(f"Unrecognized request argument supplied: {name}", param=name, code="unsupported_parameter")


def _conversation(messages: list[_Message]) -> tuple[list[dict], list[str]]:
    """(the processor's chat format, the image URLs in order). Within a message the image goes
    before its text, as LLaVA-1.5 was trained (and as `specllava generate` prompts it)."""
    conversation, urls = [], []
    for i, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        if msg.content is None:
            raise APIError(f"messages[{i}].content is missing", param=f"messages.{i}.content")
        if isinstance(msg.content, str):
            conversation.append({"role": role, "content": [{"type": "text", "text": msg.content}]})
            continue
        texts, images = [], []
        for j, part in enumerate(msg.content):
            where = f"messages.{i}.content.{j}"
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
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
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        raise APIError(f"the image bytes are not an image this server can read ({type(err).__name__})",
                       param="image_url", code="invalid_image") from None
