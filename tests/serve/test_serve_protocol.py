"""Request parsing and validation without a server: what each field becomes, and what is refused."""

import pytest
from PIL import Image

from serve_helpers import data_url, image_bytes, user

from specllava.models.hf import chat_inputs
from specllava.serve.engine import encode_chat
from specllava.serve.protocol import APIError, Limits, parse_completion, parse_request

LIMITS = Limits(max_tokens=64, max_images=1)  # as for LLaVA-1.5


def test_defaults_follow_specllava_generate():
    req = parse_request({"messages": user("Hi")}, LIMITS)
    assert (req.temperature, req.top_p, req.top_k, req.seed, req.max_tokens, req.stop) == (0.0, 1.0, 0, None, None, [])
    assert req.image is None and not req.stream


def test_fields_are_read():
    req = parse_request({
        "model": "specllava", "messages": user("Hi", image_bytes()), "max_completion_tokens": 9, "max_tokens": 3,
        "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 4, "stop": "x", "stream": True,
        "stream_options": {"include_usage": True}, "n": 1, "user": "me", "logprobs": False, "presence_penalty": 0,
    }, LIMITS)  # fmt: skip
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed, req.stop) == (9, 0.7, 0.9, 5, 4, ["x"])
    assert req.stream and req.include_usage and req.image.size == (80, 64)


def test_sampling_fields_of_the_openai_api():
    req = parse_request({"messages": user("Hi"), "n": 3, "logprobs": True, "top_logprobs": 5, "seed": 2**63 - 1}, LIMITS)
    assert (req.n, req.logprobs, req.top_logprobs, req.seed) == (3, True, 5, 2**63 - 1)
    assert parse_request({"messages": user("Hi"), "seed": -(2**63), "temperature": 1}, LIMITS).seed == -(2**63)
    opts = {"include_usage": True, "include_obfuscation": False}  # what newer openai clients may send
    assert parse_request({"messages": user("Hi"), "stream": True, "stream_options": opts}, LIMITS).include_usage


def test_completions_requests():
    req = parse_completion({"prompt": "Once upon", "max_tokens": 5, "logprobs": 2, "n": 2, "echo": False}, LIMITS)
    assert (req.raw_prompt, req.max_tokens, req.logprobs, req.top_logprobs, req.n) == ("Once upon", 5, True, 2, 2)
    assert req.conversation == [{"role": "user", "content": [{"type": "text", "text": "Once upon"}]}]
    assert not parse_completion({"prompt": ["x"]}, LIMITS).logprobs
    for body, words in [({"prompt": ["a", "b"]}, "one prompt per request"), ({"prompt": ""}, "empty"),
                        ({"prompt": "a", "echo": True}, "echo=True is not supported"),
                        ({"prompt": "a", "suffix": "z"}, "suffix"), ({"prompt": "a\ud800"}, "lone surrogate"),
                        ({"prompt": "a", "max_tokens": True}, "valid integer"), ({"prompt": 5}, "prompt"),
                        ({"messages": user("hi")}, "prompt")]:
        with pytest.raises(APIError, match=words):
            parse_completion(body, LIMITS)


def test_body_cap_follows_the_limits():
    """The cap holds every image at its byte cap (base64) and the text at its character cap."""
    small = Limits(max_images=1, max_image_bytes=1000, max_prompt_chars=100)
    assert small.body_cap() == 1000 * 4 // 3 + 1024 + 600 + 1024 * 1024
    assert Limits(max_images=2, max_image_bytes=1000, max_prompt_chars=100).body_cap() == small.body_cap() + 1000 * 4 // 3 + 1024
    assert Limits(max_images=0, max_prompt_chars=100).body_cap() == 600 + 1024 * 1024


def test_decompression_bomb_is_image_too_large(monkeypatch):
    """An image over PIL's own decompression-bomb guard is refused as too large, not as unreadable."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses over 2x this at open
    with pytest.raises(APIError, match="too large to decode") as info:
        parse_request({"messages": user("hi", image_bytes(size=(20, 20)))}, Limits(max_image_pixels=10**6))
    assert info.value.code == "image_too_large"


def test_nulls_mean_defaults():
    req = parse_request({"messages": user("Hi"), "n": None, "stream": None, "temperature": None, "stop": None,
                         "max_tokens": None, "seed": None, "top_p": None}, LIMITS)
    assert (req.temperature, req.top_p, req.max_tokens, req.stop, req.stream) == (0.0, 1.0, None, [], False)


def test_image_goes_before_the_text_of_its_message():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": data_url(image_bytes())}}]}]
    conv = parse_request({"messages": msgs}, LIMITS).conversation
    assert conv == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
    ]


def test_encoding_equals_specllava_generate(served_models):
    """One user message with an image encodes exactly as `specllava generate --prompt --image` does."""
    _, _, processor = served_models
    img = Image.open(__import__("io").BytesIO(image_bytes())).convert("RGB")
    req = parse_request({"messages": user("Describe this image.", image_bytes())}, LIMITS)
    ours, theirs = encode_chat(processor, req.conversation, req.image), chat_inputs(processor, "Describe this image.", img)
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["pixel_values"].equal(theirs["pixel_values"])
    req = parse_request({"messages": user("Hi")}, LIMITS)
    assert encode_chat(processor, req.conversation)["input_ids"].tolist() == chat_inputs(processor, "Hi")["input_ids"].tolist()


# (body, status, param, words in the message)
BAD = {
    "not an object": ([1, 2], 400, None, "JSON object"),
    "no messages": ({"model": "specllava"}, 400, "messages", "messages"),
    "empty messages": ({"messages": []}, 400, "messages", "messages"),
    "messages not a list": ({"messages": "hi"}, 400, "messages", "messages"),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "role"),
    "no content": ({"messages": [{"role": "user"}]}, 400, "messages.0.content", "content"),
    "unknown part": ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages.0.content.0", "audio"),
    "last is assistant": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400,
                          "messages", "last message"),
    "unknown model": ({"model": "gpt-4o", "messages": user("hi")}, 404, "model", "gpt-4o"),
    "max_tokens 0": ({"messages": user("hi"), "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    "max_tokens over cap": ({"messages": user("hi"), "max_tokens": 65}, 400, "max_tokens", "at most 64"),
    "max_completion_tokens -1": ({"messages": user("hi"), "max_completion_tokens": -1}, 400, "max_completion_tokens", ""),
    "max_tokens not int": ({"messages": user("hi"), "max_tokens": "ten"}, 400, "max_tokens", ""),
    "temperature -0.1": ({"messages": user("hi"), "temperature": -0.1}, 400, "temperature", "temperature"),
    "temperature 2.5": ({"messages": user("hi"), "temperature": 2.5}, 400, "temperature", "temperature"),
    "top_p 0": ({"messages": user("hi"), "top_p": 0}, 400, "top_p", "top_p"),
    "top_p 1.5": ({"messages": user("hi"), "top_p": 1.5}, 400, "top_p", "top_p"),
    "top_k -2": ({"messages": user("hi"), "top_k": -2}, 400, "top_k", "top_k"),
    "n 9": ({"messages": user("hi"), "n": 9}, 400, "n", "at most 8 choices"),
    "n 0": ({"messages": user("hi"), "n": 0}, 400, "n", "greater than or equal to 1"),
    "top_logprobs without logprobs": ({"messages": user("hi"), "top_logprobs": 2}, 400, "top_logprobs", "logprobs=true"),
    "top_logprobs 21": ({"messages": user("hi"), "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "20"),
    "max_tokens true": ({"messages": user("hi"), "max_tokens": True}, 400, "max_tokens", "valid integer"),
    "max_tokens 5.0": ({"messages": user("hi"), "max_tokens": 5.0}, 400, "max_tokens", "valid integer"),
    "temperature true": ({"messages": user("hi"), "temperature": True}, 400, "temperature", "valid number"),
    "temperature '0.5'": ({"messages": user("hi"), "temperature": "0.5"}, 400, "temperature", "valid number"),
    "stream 1": ({"messages": user("hi"), "stream": 1}, 400, "stream", "valid boolean"),
    "seed 2**64": ({"messages": user("hi"), "seed": 2**64}, 400, "seed", "64-bit signed integer"),
    "seed 2**63": ({"messages": user("hi"), "seed": 2**63}, 400, "seed", "64-bit signed integer"),
    "seed -2**63-1": ({"messages": user("hi"), "seed": -(2**63) - 1}, 400, "seed", "64-bit signed integer"),
    "lone surrogate": ({"messages": user("hi \ud800 there")}, 400, "messages.0.content.0.text", "lone surrogate"),
    "lone surrogate in a string content": ({"messages": [{"role": "user", "content": "a\udfff"}]}, 400,
                                           "messages.0.content", "lone surrogate"),
    "lone surrogate in stop": ({"messages": user("hi"), "stop": ["\ud800"]}, 400, "stop.0", "lone surrogate"),
    "repetition_penalty": ({"messages": user("hi"), "repetition_penalty": 1.2}, 400, "repetition_penalty",
                           "temperature, top_p, top_k"),
    "min_new_tokens": ({"messages": user("hi"), "min_new_tokens": 5}, 400, "min_new_tokens", "not supported"),
    "num_beams": ({"messages": user("hi"), "num_beams": 4}, 400, "num_beams", "beam search"),
    "stream_options unknown": ({"messages": user("hi"), "stream_options": {"x": 1}}, 400, "stream_options.x", ""),
    "tools": ({"messages": user("hi"), "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    "unknown argument": ({"messages": user("hi"), "frobnicate": 1}, 400, "frobnicate", "Unrecognized"),
    "empty stop": ({"messages": user("hi"), "stop": ""}, 400, "stop", "stop"),
    "five stops": ({"messages": user("hi"), "stop": list("abcde")}, 400, "stop", "at most 4"),
    "two images": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image_bytes(0))}},
        {"type": "image_url", "image_url": {"url": data_url(image_bytes(1))}}]}]}, 400, "messages", "at most 1"),
    "broken base64": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR*w0KG"}}]}]}, 400, "image_url", "base64"),
    "not base64 data url": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]}]}, 400, "image_url", "data:image/png;base64"),
    "not an image": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(b"hello, I am text")}}]}]}, 400, "image_url", "not an image"),
    "truncated image": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image_bytes()[:200])}}]}]}, 400, "image_url", "not an image"),
    "remote image": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, 400, "image_url", "--allow-remote-images"),
    "image url missing": ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
                          "messages.0.content.0", "image_url"),
    "image in assistant message": ({"messages": [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(image_bytes())}}]},
        {"role": "user", "content": "hi"}]}, 400, "messages.0.content.0", "user messages only"),
}  # fmt: skip


@pytest.mark.parametrize("body, status, param, words", BAD.values(), ids=BAD.keys())
def test_bad_requests_are_refused_in_openai_shape(body, status, param, words):
    with pytest.raises(APIError) as info:
        parse_request(body, LIMITS)
    err = info.value
    assert err.status == status and err.param == param and words in err.message
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_image_caps():
    big = image_bytes(size=(100, 100))
    with pytest.raises(APIError, match="pixels, over the cap of 9999") as info:
        parse_request({"messages": user("hi", big)}, Limits(max_image_pixels=9999))
    assert info.value.code == "image_too_large"
    with pytest.raises(APIError, match=f"over the byte cap of {len(big) - 1} bytes"):
        parse_request({"messages": user("hi", big)}, Limits(max_image_bytes=len(big) - 1))
    assert parse_request({"messages": user("hi", big)}, Limits(max_image_pixels=10000, max_image_bytes=len(big))).image


def test_remote_images_are_fetched_when_allowed(tmp_path):
    """--allow-remote-images: the URL is downloaded (a local http server here), within the caps."""
    import functools
    import http.server
    import threading

    (tmp_path / "a.png").write_bytes(image_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{url}/a.png"}}]}]}
        assert parse_request(body, Limits(allow_remote_images=True)).image.size == (80, 64)
        body["messages"][0]["content"][0]["image_url"]["url"] = f"{url}/missing.png"
        with pytest.raises(APIError, match="could not fetch the image"):
            parse_request(body, Limits(allow_remote_images=True))
    finally:
        httpd.shutdown()
