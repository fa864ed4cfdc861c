"""The one error tree of the proxy, and how a proxy-made error reads on the wire.

Every error the proxy answers a client with is a `ProxyError`; each subclass
carries the HTTP status and the OpenAI-style `code` it is answered with, so the
handler never decides a status itself (h11's `error_status_hint`)::

    CanaryProxyError
    ├── ConfigError                 a config file or flag is wrong (never reaches a client)
    └── ProxyError                  answered to a client in OpenAI's error shape
        ├── BadHttp                 400 bad_http (not HTTP/1.1 the proxy may forward)
        ├── BadRequestBody          400 bad_json
        ├── BadFeedback             400 bad_feedback (POST /v1/feedback without an id or a score)
        ├── UnknownRequest          404 unknown_request_id (feedback for an id not remembered)
        ├── NoRoute                 404 no_route
        ├── RequestTimeout          408 request_timeout (the client went silent mid-body)
        ├── BodyTooLarge            413 body_too_large
        ├── HeadTooLarge            431 headers_too_large
        ├── UpstreamError           502 (a backend attempt failed: base of the next four)
        │   ├── UpstreamUnreachable 502 upstream_unreachable
        │   ├── UpstreamProtocolError 502 upstream_protocol_error
        │   ├── UpstreamStatus      (not answered: a backend's own 5xx/429 that made us fall back)
        │   └── UpstreamTimeout     504 upstream_timeout
        ├── Overloaded              503 overloaded (with Retry-After)
        ├── PoolExhausted           503 pool_timeout (with Retry-After; the proxy's capacity)
        └── Draining                503 draining (with Retry-After)

Library exceptions (aiohttp, asyncio) are translated into this tree at one
boundary, the backend attempt in `proxy.http.forwarding`, always with `raise ... from exc`.
"""

from __future__ import annotations

import json

__all__ = [
    "BadFeedback",
    "BadHttp",
    "BadRequestBody",
    "BodyTooLarge",
    "CanaryProxyError",
    "ConfigError",
    "Draining",
    "HeadTooLarge",
    "NoRoute",
    "Overloaded",
    "PoolExhausted",
    "ProxyError",
    "RequestTimeout",
    "UnknownRequest",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStatus",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "error_body",
]


class CanaryProxyError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(CanaryProxyError):
    """A configuration is invalid. `problems` holds one line per mistake, each naming its path."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems: tuple[str, ...] = (
            (problems,) if isinstance(problems, str) else tuple(problems)
        )
        super().__init__("; ".join(self.problems))


class ProxyError(CanaryProxyError):
    """An error the proxy answers a client with, in OpenAI's error shape."""

    status: int = 500
    code: str = "proxy_error"
    retry_after_s: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadHttp(ProxyError):
    """The request is not HTTP/1.1 that can be forwarded safely (request smuggling, bad framing)."""

    status = 400
    code = "bad_http"


class BadRequestBody(ProxyError):
    status = 400
    code = "bad_json"


class BadFeedback(ProxyError):
    status = 400
    code = "bad_feedback"


class UnknownRequest(ProxyError):
    """Feedback for a request id this process does not remember (`proxy.telemetry.feedback`)."""

    status = 404
    code = "unknown_request_id"


class HeadTooLarge(ProxyError):
    """The request head is larger than any model server takes (RFC 6585 §5)."""

    status = 431
    code = "headers_too_large"


class NoRoute(ProxyError):
    status = 404
    code = "no_route"


class RequestTimeout(ProxyError):
    """The client stopped sending its request body; not a fault of any backend."""

    status = 408
    code = "request_timeout"


class BodyTooLarge(ProxyError):
    status = 413
    code = "body_too_large"


class UpstreamError(ProxyError):
    """A backend attempt failed. `error_type` is the `error.type` it is counted under."""

    status = 502
    code = "upstream_error"
    error_type = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"
    error_type = "connect_error"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"
    error_type = "protocol_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    error_type = "timeout"


class UpstreamStatus(UpstreamError):
    """A backend answered 5xx or 429 before any byte reached the client.

    It is never answered as such: either the route falls back to stable, or the
    backend's own response passes through untouched.
    """

    code = "upstream_status"

    def __init__(self, status: int) -> None:
        super().__init__(f"backend answered {status}")
        self.upstream_status = status
        self.error_type = str(status)


class Overloaded(ProxyError):
    status = 503
    code = "overloaded"
    retry_after_s = 1


class PoolExhausted(ProxyError):
    """Every connection to the backend stayed busy for its pool timeout.

    The request never reached the backend: this is the proxy's own capacity
    (`max_connections`), counted as `pool_timeout` and never against the variant.
    """

    status = 503
    code = "pool_timeout"
    error_type = "pool_timeout"
    retry_after_s = 1


class Draining(ProxyError):
    status = 503
    code = "draining"
    retry_after_s = 5


def error_body(error: ProxyError) -> bytes:
    """The JSON body of a proxy-made error, shaped like OpenAI's so SDKs show it."""
    return json.dumps(
        {"error": {"message": error.message, "type": "proxy_error", "code": error.code}},
        separators=(",", ":"),
    ).encode()
