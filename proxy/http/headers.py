"""Which headers cross the proxy, both ways (SPEC §5), and the request head it sends. Pure.

Rules:
1. Hop-by-hop headers never cross: Connection, Keep-Alive, TE, Trailer,
   Transfer-Encoding, Upgrade, every Proxy-* header, and every header the
   Connection header names (RFC 9110 §7.6.1).
2. The proxy owns the framing and the addressing: Host, Content-Length and Expect
   are not copied; the proxy writes its own for the backend.
3. X-Forwarded-For gets the peer appended; X-Forwarded-Proto and -Host are kept
   from a trusted peer and otherwise set from what this hop saw.
4. A backend with an API key gets it in place of the client's credentials (its
   `Authorization` and `x-api-key`): `Authorization: Bearer <key>`, or `x-api-key:
   <key>` for an Anthropic backend (its `anthropic-version` passes as the client sent
   it). Without one, the client's credentials pass through.
5. `x-request-id` goes to the backend (vLLM and TGI log it) and back to the client;
   `x-canary-variant` tells the client who really answered.
6. Headers travel as the bytes that were received; names keep their case and
   repeated headers their order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from multidict import CIMultiDict

from proxy.config.model import Variant

__all__ = [
    "REQUEST_ID",
    "VARIANT",
    "request_head",
    "response_headers",
]

REQUEST_ID: Final = "x-request-id"
VARIANT: Final = "x-canary-variant"

_HOP_BY_HOP: Final = (
    b"connection",
    b"keep-alive",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
)
# Never copied to the backend: the proxy writes these itself.
_NOT_FORWARDED: Final = frozenset(
    {
        *_HOP_BY_HOP,
        b"host",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        REQUEST_ID.encode(),
    }
)
# Never copied back to the client: the proxy frames the response itself.
_NOT_RETURNED: Final = frozenset(
    {*_HOP_BY_HOP, b"content-length", REQUEST_ID.encode(), VARIANT.encode()}
)
# A client's credentials: replaced when the proxy holds the backend's key (Rule 4).
_CREDENTIALS: Final = frozenset({b"authorization", b"x-api-key"})
# Connection options that name no header.
_CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b""})


def request_head(
    method: str,
    target: bytes,
    raw_headers: Iterable[tuple[bytes, bytes]],
    *,
    host: bytes,
    peer: str | None,
    peer_trusted: bool,
    scheme: str,
    api_key: str | None,
    request_id: str,
    content_length: int | None,
    traceparent: str | None = None,
    x_api_key: bool = False,
) -> bytes:
    """The HTTP/1.1 request head to send to the backend for a client request.

    Args:
        target: the request target for the backend (base path, path and query), raw.
        raw_headers: the client's headers as received.
        content_length: the body's length, None for no body.
        traceparent: the W3C trace context for the backend, in place of the client's.
        x_api_key: `api_key` goes in an `x-api-key` header (Anthropic), not as a bearer.
    """
    kept: list[tuple[bytes, bytes, bytes]] = []  # (lower-case name, name, value)
    listed: set[bytes] = set()
    forwarded_for: list[bytes] = []
    forwarded_proto = forwarded_host = client_host = None
    for name, value in raw_headers:
        lowered = name.lower()
        if lowered not in _NOT_FORWARDED:
            if not lowered.startswith(b"proxy-"):
                kept.append((lowered, name, value))
        elif lowered == b"x-forwarded-for":
            forwarded_for.append(value)
        elif lowered == b"host":
            client_host = value
        elif lowered == b"connection":
            listed.update(token.strip().lower() for token in value.split(b","))
        elif lowered == b"x-forwarded-proto":
            forwarded_proto = value
        elif lowered == b"x-forwarded-host":
            forwarded_host = value
    listed -= _CONNECTION_OPTIONS
    drop_auth = api_key is not None
    if traceparent is not None:
        listed.add(b"traceparent")
    lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode(), target, host)]
    for lowered, name, value in kept:
        if (listed and lowered in listed) or (drop_auth and lowered in _CREDENTIALS):
            continue
        lines.append(b"%s: %s\r\n" % (name, value))
    if peer:
        forwarded_for.append(peer.encode())
    if forwarded_for:
        lines.append(b"X-Forwarded-For: %s\r\n" % b", ".join(forwarded_for))
    proto = (forwarded_proto if peer_trusted else None) or scheme.encode()
    lines.append(b"X-Forwarded-Proto: %s\r\n" % proto)
    forwarded = (forwarded_host if peer_trusted else None) or client_host
    if forwarded:
        lines.append(b"X-Forwarded-Host: %s\r\n" % forwarded)
    if api_key is not None:
        key_line = b"x-api-key: %s\r\n" if x_api_key else b"Authorization: Bearer %s\r\n"
        lines.append(key_line % api_key.encode())
    lines.append(b"x-request-id: %s\r\n" % request_id.encode())
    if traceparent is not None:
        lines.append(b"traceparent: %s\r\n" % traceparent.encode())
    if content_length is not None:
        lines.append(b"Content-Length: %d\r\n" % content_length)
    lines.append(b"\r\n")
    return b"".join(lines)


# Plain str for the header writer, and cheaper than an enum's `.value` per request.
_VARIANT_NAMES: Final = {variant: variant.value for variant in Variant}


def response_headers(
    upstream: Iterable[tuple[bytes, bytes]],
    *,
    variant: Variant,
    request_id: str,
) -> CIMultiDict[str]:
    """The headers to send to the client for a backend response with `upstream` headers."""
    kept: list[tuple[str, str]] = []
    listed: set[bytes] = set()
    for name, value in upstream:
        lowered = name.lower()
        if lowered == b"connection":
            listed.update(token.strip().lower() for token in value.split(b","))
        elif lowered not in _NOT_RETURNED and not lowered.startswith(b"proxy-"):
            kept.append((_text(name), _text(value)))
    listed -= _CONNECTION_OPTIONS
    if listed:
        kept = [(name, value) for name, value in kept if name.lower().encode() not in listed]
    out: CIMultiDict[str] = CIMultiDict(kept)
    out[VARIANT] = _VARIANT_NAMES[variant]
    out[REQUEST_ID] = request_id
    return out


def _text(raw: bytes) -> str:
    """Header bytes as text for aiohttp, which writes UTF-8: valid UTF-8 passes unchanged."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")
