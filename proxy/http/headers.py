"""Which headers cross the proxy, both ways (SPEC §5), and the request head it sends. Pure.

Rules:
1. Hop-by-hop headers never cross: Connection, Keep-Alive, TE, Trailer,
   Transfer-Encoding, Upgrade, every Proxy-* header, and every header the
   Connection header names (RFC 9110 §7.6.1). The one exception is a WebSocket
   upgrade: its request goes on with `Connection: Upgrade` and its `Upgrade`, and a
   101 comes back with the backend's (`upgrade_head`, `switching_head`); the
   Sec-WebSocket-* headers are end to end and cross as any other.
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
7. A client's `x-canary-shadow` never reaches a backend: only the proxy's shadow
   requests carry it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from proxy.config.model import Variant

__all__ = [
    "REQUEST_ID",
    "SHADOW",
    "VARIANT",
    "request_head",
    "response_headers",
    "switching_head",
    "upgrade_head",
]

REQUEST_ID: Final = "x-request-id"
VARIANT: Final = "x-canary-variant"
# Marks the proxy's shadow requests (`proxy.http.shadow`): never taken from a client, so
# a backend can trust it.
SHADOW: Final = "x-canary-shadow"

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
        SHADOW.encode(),
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
    shadow: bool = False,
) -> bytes:
    """The HTTP/1.1 request head to send to the backend for a client request.

    Args:
        target: the request target for the backend (base path, path and query), raw.
        raw_headers: the client's headers as received.
        content_length: the body's length, None for no body.
        traceparent: the W3C trace context for the backend, in place of the client's.
        x_api_key: `api_key` goes in an `x-api-key` header (Anthropic), not as a bearer.
        shadow: a shadow request (`x-canary-shadow: 1`, rule 7).
    """
    # One pass, writing the kept headers as it goes, and one join at the end: the head
    # is built for every request. A Connection header that names other headers (rare)
    # sends the kept ones through a second pass (`_without_listed`).
    parts = [method.encode(), b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    kept_from = len(parts)
    listed: set[bytes] | None = None
    forwarded_for: list[bytes] = []
    forwarded_proto = forwarded_host = client_host = None
    drop_auth = api_key is not None
    for name, value in raw_headers:
        lowered = name.lower()
        if lowered not in _NOT_FORWARDED:
            if lowered.startswith(b"proxy-") or (drop_auth and lowered in _CREDENTIALS):
                continue
            if traceparent is not None and lowered == b"traceparent":
                continue
            parts += (name, b": ", value, b"\r\n")
        elif lowered == b"x-forwarded-for":
            forwarded_for.append(value)
        elif lowered == b"host":
            client_host = value
        elif lowered == b"connection":
            tokens = {token.strip().lower() for token in value.split(b",")}
            listed = tokens if listed is None else listed | tokens
        elif lowered == b"x-forwarded-proto":
            forwarded_proto = value
        elif lowered == b"x-forwarded-host":
            forwarded_host = value
    if listed is not None:
        listed -= _CONNECTION_OPTIONS
        if listed:
            parts[kept_from:] = _without_listed(parts[kept_from:], listed)
    if peer:
        forwarded_for.append(peer.encode())
    if forwarded_for:
        parts += (b"X-Forwarded-For: ", b", ".join(forwarded_for), b"\r\n")
    proto = (forwarded_proto if peer_trusted else None) or scheme.encode()
    parts += (b"X-Forwarded-Proto: ", proto, b"\r\n")
    forwarded = (forwarded_host if peer_trusted else None) or client_host
    if forwarded:
        parts += (b"X-Forwarded-Host: ", forwarded, b"\r\n")
    if api_key is not None:
        parts += (b"x-api-key: " if x_api_key else b"Authorization: Bearer ", api_key.encode())
        parts.append(b"\r\n")
    parts += (b"x-request-id: ", request_id.encode(), b"\r\n")
    if traceparent is not None:
        parts += (b"traceparent: ", traceparent.encode(), b"\r\n")
    if shadow:
        parts.append(b"x-canary-shadow: 1\r\n")
    if content_length is not None:
        parts.append(b"Content-Length: %d\r\n" % content_length)
    parts.append(b"\r\n")
    return b"".join(parts)


def _without_listed(kept: list[bytes], listed: set[bytes]) -> list[bytes]:
    """The kept header parts (name, ": ", value, CRLF; four each) less the headers a
    Connection header named."""
    out: list[bytes] = []
    for at in range(0, len(kept), 4):
        if kept[at].lower() not in listed:
            out += kept[at : at + 4]
    return out


# Plain str for the header writer, and cheaper than an enum's `.value` per request.
_VARIANT_NAMES: Final = {variant: variant.value for variant in Variant}


def response_headers(
    upstream: Iterable[tuple[bytes, bytes]],
    *,
    variant: Variant,
    request_id: str,
    extra: Mapping[str, str] | None = None,
) -> list[tuple[str, str]]:
    """The headers to send to the client for a backend response with `upstream` headers,
    and `extra` ones of the proxy's; as pairs, which aiohttp's response takes as they are."""
    kept: list[tuple[str, str]] = []
    listed: set[bytes] | None = None
    for name, value in upstream:
        lowered = name.lower()
        if lowered == b"connection":
            tokens = {token.strip().lower() for token in value.split(b",")}
            listed = tokens if listed is None else listed | tokens
        elif lowered not in _NOT_RETURNED and not lowered.startswith(b"proxy-"):
            kept.append((_text(name), _text(value)))
    if listed is not None:
        listed -= _CONNECTION_OPTIONS
        if listed:
            kept = [(name, value) for name, value in kept if name.lower().encode() not in listed]
    if extra:
        names = {name.lower() for name in extra}
        kept = [(name, value) for name, value in kept if name.lower() not in names]
        kept += extra.items()
    kept += ((VARIANT, _VARIANT_NAMES[variant]), (REQUEST_ID, request_id))
    return kept


def upgrade_head(head: bytes) -> bytes:
    """A request head from `request_head` that asks the backend to switch to WebSocket."""
    return head[:-2] + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def switching_head(
    upstream: Iterable[tuple[bytes, bytes]],
    *,
    variant: Variant,
    request_id: str,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """The 101 Switching Protocols head for the client, from the backend's 101 headers:
    its end-to-end headers (Sec-WebSocket-Accept among them) as received, its
    `Upgrade`, and the proxy's own, `extra` among them (which replace a backend's)."""
    own = {name.lower().encode() for name in extra} if extra else set()
    listed: set[bytes] = set()
    kept: list[tuple[bytes, bytes, bytes]] = []  # (lower-case name, name, value)
    upgrade = b"websocket"
    for name, value in upstream:
        lowered = name.lower()
        if lowered == b"connection":
            listed.update(token.strip().lower() for token in value.split(b","))
        elif lowered == b"upgrade":
            upgrade = value
        elif lowered not in _NOT_RETURNED and not lowered.startswith(b"proxy-"):
            kept.append((lowered, name, value))
    dropped = (listed - _CONNECTION_OPTIONS) | own
    parts = [b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: ", upgrade]
    parts.append(b"\r\n")
    for lowered, name, value in kept:
        if lowered not in dropped:
            parts += (name, b": ", value, b"\r\n")
    if extra:
        for own_name, own_value in extra.items():
            parts += (own_name.encode(), b": ", own_value.encode(), b"\r\n")
    parts += (VARIANT.encode(), b": ", _VARIANT_NAMES[variant].encode(), b"\r\n")
    parts += (REQUEST_ID.encode(), b": ", request_id.encode(), b"\r\n\r\n")
    return b"".join(parts)


def _text(raw: bytes) -> str:
    """Header bytes as text for aiohttp, which writes UTF-8: valid UTF-8 passes unchanged."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")
