"""Who may call the API, and from where: API keys, allowed hosts, JSON-only bodies, CORS.

`Security` holds the settings (`specllava serve --api-key/--allowed-hosts/--allowed-origins`);
`guard(app, security, ...)` is the ASGI middleware that enforces them, before any request reaches
an endpoint:

  Host header    must name one of the allowed hosts (default: the loopback names when the server
                 listens on a loopback address), which defeats DNS rebinding: a web page whose
                 domain resolves to 127.0.0.1 still sends its own domain as Host -> 400.
  /v1/*          with API keys set, `Authorization: Bearer <key>` must carry one of them -> 401;
                 a POST must be `Content-Type: application/json` -> 415, so a cross-origin page
                 cannot send a "simple" (preflight-free) request such as `text/plain`.
  CORS           off (no Access-Control-* header: browsers keep other origins' pages out) unless
                 `allowed_origins` names them (starlette's CORSMiddleware, added by the app).

/health, /metrics and the web page (/, /static) need no key: a load balancer and a Prometheus
scraper read the first two, and the page asks for the key itself and sends it on its API calls.

Written as a small ASGI middleware rather than with starlette's TrustedHostMiddleware because
every refusal must be in OpenAI's error shape (that one answers in plain text).
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from starlette.datastructures import Headers

from .protocol import APIError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


@dataclass(frozen=True)
class Security:
    api_keys: tuple[str, ...] = ()  # none: no key needed
    allowed_hosts: tuple[str, ...] = ("*",)  # Host header values (without the port); "*" = any
    allowed_origins: tuple[str, ...] = ()  # CORS origins; none: CORS off

    def key_ok(self, authorization: str | None) -> bool:
        if not self.api_keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        # compare_digest against every key: the time taken says nothing about which key is close
        return scheme.lower() == "bearer" and any([hmac.compare_digest(token.encode(), k.encode()) for k in self.api_keys])

    def host_ok(self, host: str | None) -> bool:
        if "*" in self.allowed_hosts:
            return True
        if not host:
            return False
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host  # drop the port ([::1]:8000 too)
        return name.lower() in self.allowed_hosts


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the server to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str) -> tuple[str, ...]:
    """The Host header values a server listening on `bind_host` accepts by default: the loopback
    names on a loopback address (a DNS-rebinding page would send its own domain), any host on a
    public one (whose name the server cannot know; name them with --allowed-hosts)."""
    if is_loopback(bind_host):
        return tuple(sorted({*LOOPBACK_HOSTS, bind_host.lower()}))
    return ("*",)


def exposure_warning(bind_host: str, security: Security) -> str | None:
    """The warning to print when the server listens beyond this machine without an API key."""
    if is_loopback(bind_host) or security.api_keys:
        return None
    return (f"WARNING: listening on {bind_host} without an API key: anyone who can reach this address can use the "
            "models (and their compute). Set --api-key or SPECLLAVA_API_KEY, or listen on 127.0.0.1.")


def refusal(scope, security: Security) -> APIError | None:
    """Why the request in `scope` may not go on (an APIError to answer with), or None."""
    headers = Headers(scope=scope)
    if not security.host_ok(headers.get("host")):
        return APIError(f"the Host header {headers.get('host')!r} is not one this server answers to "
                        "(specllava serve --allowed-hosts)", status=400, code="invalid_host")
    path = scope.get("path", "")
    if not path.startswith("/v1/"):
        return None
    if not security.key_ok(headers.get("authorization")):
        given = headers.get("authorization") is not None
        return APIError("Incorrect API key provided." if given else
                        "You didn't provide an API key: send it as 'Authorization: Bearer <key>'",
                        status=401, code="invalid_api_key")
    if scope.get("method") == "POST":
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            return APIError(f"the request body must be JSON sent as 'Content-Type: application/json', got "
                            f"{media or 'no Content-Type'!r}", status=415, code="unsupported_media_type")
    return None
