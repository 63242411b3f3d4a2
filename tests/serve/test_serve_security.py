"""Who may call the server and from where: API keys (401 in OpenAI's shape), allowed hosts (DNS
rebinding), JSON-only bodies (415), CORS off unless origins are named, the warning on a public
address without a key, 503 while starting, and a bind failure before any model loads."""

import json
import urllib.error
import urllib.request

import openai
import pytest

from serve_helpers import free_port, running_server, user

from specllava.cli import build_parser
from specllava.serve.cli import bind, security_from_args
from specllava.serve.protocol import Limits
from specllava.serve.security import Security, default_allowed_hosts, exposure_warning

KEYS = ("sk-first", "sk-second")


def request(url, path="/v1/chat/completions", body=None, headers=None, method=None):
    """(status, headers, parsed JSON or text) of a raw request."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, hdrs, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        status, hdrs, raw = err.code, err.headers, err.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode()


JSON = {"Content-Type": "application/json"}
BODY = {"messages": user("Hi"), "max_tokens": 3}


@pytest.fixture(scope="module")
def keyed(served_models):
    with running_server(*served_models, security=Security(api_keys=KEYS, allowed_hosts=default_allowed_hosts("127.0.0.1"))) as live:
        yield live


def test_api_key_is_required_on_the_api(keyed):
    url, _, _ = keyed
    for key in KEYS:  # several keys, each accepted
        r = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0).chat.completions.create(
            model="specllava", messages=user("Hi"), max_tokens=3)
        assert r.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    status, headers, err = request(url, body=BODY, headers=JSON)  # no key at all
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert err["error"]["code"] == "invalid_api_key" and "didn't provide an API key" in err["error"]["message"]
    assert set(err["error"]) == {"message", "type", "param", "code"}
    # what a load balancer, a scraper and a browser read without a key
    assert request(url, "/health")[0] == 200 and request(url, "/metrics")[0] == 200 and request(url, "/")[0] == 200
    assert json.loads(urllib.request.urlopen(url + "/health").read())["auth"] is True


def test_only_json_bodies_are_accepted(keyed):
    """A cross-origin page can POST text/plain without a preflight; the API refuses it."""
    url, _, _ = keyed
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {**auth, **({"Content-Type": ctype} if ctype else {})}
        status, _, err = request(url, body=json.dumps(BODY).encode(), headers=headers)
        assert status == 415 and err["error"]["code"] == "unsupported_media_type", ctype
    status, _, _ = request(url, body=BODY, headers={**auth, "Content-Type": "application/json; charset=utf-8"})
    assert status == 200


def test_foreign_host_headers_are_refused(keyed):
    """DNS rebinding: a page on evil.example whose name resolves to 127.0.0.1 sends Host: evil.example."""
    url, _, _ = keyed
    port = url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
        status, _, err = request(url, "/health", headers={"Host": host})
        assert status == 400 and err["error"]["code"] == "invalid_host", host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST"):
        assert request(url, "/health", headers={"Host": host})[0] == 200, host


def test_cors_is_off_unless_origins_are_named(served_models, keyed):
    url, _, _ = keyed
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    status, headers, _ = request(url, headers=preflight, method="OPTIONS")
    assert "Access-Control-Allow-Origin" not in headers
    allowed = Security(allowed_origins=("https://app.example",))
    with running_server(*served_models, security=allowed) as (url2, _, _):
        status, headers, _ = request(url2, headers={**preflight, "Origin": "https://app.example"}, method="OPTIONS")
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://app.example"
        status, headers, _ = request(url2, headers=preflight, method="OPTIONS")
        assert headers.get("Access-Control-Allow-Origin") != "https://evil.example"


def test_security_flags_and_environment(monkeypatch):
    parse = lambda *a: security_from_args(build_parser().parse_args(["serve", *a]))  # noqa: E731
    monkeypatch.delenv("SPECLLAVA_API_KEY", raising=False)
    s = parse()
    assert s.api_keys == () and "localhost" in s.allowed_hosts and "*" not in s.allowed_hosts and s.allowed_origins == ()
    assert parse("--api-key", "a", "--api-key", "b").api_keys == ("a", "b")
    monkeypatch.setenv("SPECLLAVA_API_KEY", "k1, k2")
    assert parse().api_keys == ("k1", "k2") and parse("--api-key", "c").api_keys == ("c",)
    assert parse("--host", "0.0.0.0").allowed_hosts == ("*",)
    assert parse("--host", "0.0.0.0", "--allowed-hosts", "Api.Example,10.0.0.5").allowed_hosts == ("api.example", "10.0.0.5")
    assert parse("--allowed-origins", "https://a.example").allowed_origins == ("https://a.example",)


def test_public_address_without_a_key_warns():
    warning = exposure_warning("0.0.0.0", Security())
    assert "without an API key" in warning and "anyone" in warning and "--api-key" in warning
    assert exposure_warning("0.0.0.0", Security(api_keys=("k",))) is None
    assert exposure_warning("127.0.0.1", Security()) is None and exposure_warning("::1", Security()) is None


def test_bind_fails_clearly_before_anything_loads(capsys):
    taken = bind("127.0.0.1", free_port())
    try:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="the port is in use"):
            bind("127.0.0.1", port)
        from specllava.cli import main

        assert main(["serve", "--port", str(port)]) == 1
        err = capsys.readouterr().err
        assert "port is in use" in err and "loading" not in err
    finally:
        taken.close()
    with pytest.raises(OSError, match="not an address or a name"):
        bind("no-such-host.invalid", free_port())


def test_api_answers_503_while_starting(served_models):
    """The app before its engine is attached (models loading): 503 with Retry-After, /health says so."""
    import threading
    import time

    import uvicorn

    from specllava.serve.app import attach, create_app
    from specllava.serve.engine import Engine
    from specllava import SpeculativeDecoder

    target, draft, processor = served_models
    app = create_app(None, Limits(max_tokens=8))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    engine = None
    try:
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{server.config.port}"
        status, headers, err = request(url, body=BODY, headers=JSON)
        assert status == 503 and err["error"]["code"] == "starting" and headers["Retry-After"]
        status, _, health = request(url, "/health")
        assert status == 503 and health["status"] == "starting"
        engine = Engine(target, draft, processor, lambda: SpeculativeDecoder(target, draft), max_tokens=8)
        attach(app, engine)
        assert request(url, body=BODY, headers=JSON)[0] == 200
        app.state.closing = True
        status, _, err = request(url, body=BODY, headers=JSON)
        assert status == 503 and err["error"]["code"] == "shutting_down"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        if engine is not None:
            engine.close()
