"""Reading a user key out of a request: pure functions over the request's parts.

Rules:
1. The route's key sources are tried in order; the first one present wins.
2. An empty value is absent: `x-user-id: ""` is no key, so the next source is tried.
3. `body:FIELD` reads a top-level field of the JSON body; strings are taken as they
   are and integers by their decimal text; anything else is absent. When the body
   has not been read yet, the answer is `NEED_BODY` and the caller reads it and asks
   again, so a body is only read when a key actually depends on it.
4. `auth` is the bearer token without "Bearer " (the scheme is matched without case),
   or, without one, the `x-api-key` header (Anthropic's clients send their key there).
5. `ip` is the peer address, unless the peer is a trusted proxy: then
   `X-Forwarded-For` is read from the right, trusted addresses are skipped, and the
   first untrusted one is the client (an entry that is not an address is untrusted).
   If every hop is trusted, the leftmost is the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Protocol

from proxy.config.model import KeyKind, KeySource, Network

__all__ = [
    "NEED_BODY",
    "Body",
    "FoundKey",
    "NeedBody",
    "RequestParts",
    "client_ip",
    "find_key",
    "is_trusted",
    "read_source",
]


class NeedBody(Enum):
    """The answer depends on the JSON body, which has not been read yet."""

    NEED_BODY = "need_body"


NEED_BODY: Final = NeedBody.NEED_BODY

# A parsed JSON body, or None when it has not been read. A body that was read but is
# not a JSON object is passed as an empty mapping.
Body = Mapping[str, Any] | None


class RequestParts(Protocol):
    """What key extraction reads of a request; aiohttp's `BaseRequest` satisfies it."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def query(self) -> Mapping[str, str]: ...

    @property
    def cookies(self) -> Mapping[str, str]: ...

    @property
    def remote(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class FoundKey:
    source: KeySource
    value: str


def read_source(
    source: KeySource,
    parts: RequestParts,
    body: Body,
    trusted_proxies: Sequence[Network] = (),
) -> str | NeedBody | None:
    """The value of one key source in this request, None when absent."""
    kind = source.kind
    value: str | None
    if kind is KeyKind.HEADER:
        value = parts.headers.get(source.name)
    elif kind is KeyKind.BODY:
        if body is None:
            return NEED_BODY
        value = _body_field(body, source.name)
    elif kind is KeyKind.AUTH:
        headers = parts.headers
        value = _bearer_token(headers.get("authorization")) or headers.get("x-api-key")
    elif kind is KeyKind.COOKIE:
        value = parts.cookies.get(source.name)
    elif kind is KeyKind.QUERY:
        value = parts.query.get(source.name)
    else:
        value = client_ip(parts.remote, parts.headers.get("x-forwarded-for"), trusted_proxies)
    return value or None


def find_key(
    sources: Sequence[KeySource],
    parts: RequestParts,
    body: Body,
    trusted_proxies: Sequence[Network] = (),
) -> FoundKey | NeedBody | None:
    """The first present key among `sources`, None when there is none."""
    for source in sources:
        value = read_source(source, parts, body, trusted_proxies)
        if value is NEED_BODY:
            return NEED_BODY
        if value is not None:
            return FoundKey(source, value)
    return None


def client_ip(
    remote: str | None, forwarded_for: str | None, trusted: Sequence[Network]
) -> str | None:
    """The client's address: the peer, or the first untrusted hop of X-Forwarded-For."""
    if not trusted or not forwarded_for or not is_trusted(remote, trusted):
        return remote
    hops = [hop.strip() for hop in forwarded_for.split(",")]
    for hop in reversed(hops):
        if hop and not is_trusted(hop, trusted):
            return hop
    return next((hop for hop in hops if hop), remote)


def is_trusted(address: str | None, trusted: Sequence[Network]) -> bool:
    """Is `address` inside one of the `trusted` networks?"""
    if not address or not trusted:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _body_field(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None and "." in name:  # a field inside objects: metadata.user_id
        value = body
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None
