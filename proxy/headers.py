"""Which headers cross the proxy, both ways (SPEC §5). Pure.

Rules:
1. Hop-by-hop headers never cross: Connection, Keep-Alive, TE, Trailer,
   Transfer-Encoding, Upgrade, every Proxy-* header, and every header the
   Connection header names (RFC 9110 §7.6.1).
2. The proxy owns the framing and the addressing: Host, Content-Length and Expect
   are not copied; the client library frames and addresses the backend request.
3. X-Forwarded-For gets the peer appended; X-Forwarded-Proto and -Host are kept
   from a trusted peer and otherwise set from what this hop saw.
4. A backend with an API key gets `Authorization: Bearer <key>` in place of the
   client's; without one, the client's Authorization passes through.
5. `x-request-id` goes to the backend (vLLM and TGI log it) and back to the client;
   `x-canary-variant` tells the client who really answered.
"""

from __future__ import annotations

from typing import Final

from multidict import CIMultiDict, MultiMapping

__all__ = [
    "REQUEST_ID",
    "VARIANT",
    "request_headers",
    "response_headers",
]

REQUEST_ID: Final = "x-request-id"
VARIANT: Final = "x-canary-variant"

_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never copied to the backend: the proxy sets or frames these itself.
_NOT_FORWARDED: Final = _HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    REQUEST_ID,
}
# Never copied back to the client: the proxy frames the response itself.
_NOT_RETURNED: Final = _HOP_BY_HOP | {"content-length", REQUEST_ID, VARIANT}


def _copy(headers: MultiMapping[str], dropped: frozenset[str]) -> CIMultiDict[str]:
    if "connection" in headers:
        dropped = dropped | {
            token.strip().lower()
            for value in headers.getall("connection")
            for token in value.split(",")
        }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered not in dropped and not lowered.startswith("proxy-"):
            out.add(name, value)
    return out


def request_headers(
    incoming: MultiMapping[str],
    *,
    peer: str | None,
    peer_trusted: bool,
    scheme: str,
    api_key: str | None,
    request_id: str,
) -> CIMultiDict[str]:
    """The headers to send to the backend for a client request with `incoming` headers."""
    out = _copy(incoming, _NOT_FORWARDED)
    forwarded_for = ", ".join(incoming.getall("x-forwarded-for", ()))
    if peer:
        forwarded_for = f"{forwarded_for}, {peer}" if forwarded_for else peer
    if forwarded_for:
        out["X-Forwarded-For"] = forwarded_for
    proto = incoming.get("x-forwarded-proto") if peer_trusted else None
    out["X-Forwarded-Proto"] = proto or scheme
    host = (incoming.get("x-forwarded-host") if peer_trusted else None) or incoming.get("host")
    if host:
        out["X-Forwarded-Host"] = host
    if api_key is not None:
        out["Authorization"] = f"Bearer {api_key}"
    out[REQUEST_ID] = request_id
    return out


def response_headers(
    upstream: MultiMapping[str],
    *,
    variant: str,
    request_id: str,
) -> CIMultiDict[str]:
    """The headers to send to the client for a backend response with `upstream` headers."""
    out = _copy(upstream, _NOT_RETURNED)
    out[VARIANT] = variant
    out[REQUEST_ID] = request_id
    return out
