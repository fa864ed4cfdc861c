"""Which headers cross the proxy (SPEC §5), and the request head it writes. Pure."""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDict

from proxy.config.model import Variant
from proxy.http.headers import request_head, response_headers, switching_head, upgrade_head


def head(*headers: tuple[bytes, bytes], **options: Any) -> bytes:
    settings: dict[str, Any] = {
        "host": b"backend:8000",
        "peer": "192.0.2.1",
        "peer_trusted": False,
        "scheme": "http",
        "api_key": None,
        "request_id": "rid-1",
        "content_length": None,
    }
    settings.update(options)
    return request_head("POST", b"/v1/chat?x=1", headers, **settings)


def lines(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\r\n\r\n")
    return raw[:-4].split(b"\r\n")


def test_the_head_has_the_request_line_host_and_forwarding_headers() -> None:
    assert lines(head((b"Content-Type", b"application/json"), content_length=12)) == [
        b"POST /v1/chat?x=1 HTTP/1.1",
        b"Host: backend:8000",
        b"Content-Type: application/json",
        b"X-Forwarded-For: 192.0.2.1",
        b"X-Forwarded-Proto: http",
        b"x-request-id: rid-1",
        b"Content-Length: 12",
    ]


def test_hop_by_hop_and_framing_headers_are_not_forwarded() -> None:
    raw = head(
        (b"Host", b"proxy.example"),
        (b"Connection", b"keep-alive, X-Secret-Hop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"x"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authorization", b"Basic abc"),
        (b"proxy-connection", b"keep-alive"),
        (b"X-Secret-Hop", b"named by Connection"),
        (b"Content-Length", b"12"),
        (b"Expect", b"100-continue"),
        (b"X-User-Id", b"alice"),
    )
    assert lines(raw)[2:] == [
        b"X-User-Id: alice",
        b"X-Forwarded-For: 192.0.2.1",
        b"X-Forwarded-Proto: http",
        b"X-Forwarded-Host: proxy.example",
        b"x-request-id: rid-1",
    ]


def test_names_keep_their_case_and_duplicates_their_order() -> None:
    raw = head((b"accept", b"a"), (b"X-Multi", b"1"), (b"ACCEPT", b"b"))
    assert lines(raw)[2:5] == [b"accept: a", b"X-Multi: 1", b"ACCEPT: b"]


def test_forwarded_for_appends_the_peer() -> None:
    raw = head((b"X-Forwarded-For", b"203.0.113.5"), (b"x-forwarded-for", b"198.51.100.7"))
    assert b"X-Forwarded-For: 203.0.113.5, 198.51.100.7, 192.0.2.1" in lines(raw)


def test_forwarded_proto_and_host_are_kept_only_from_a_trusted_peer() -> None:
    headers = (
        (b"Host", b"proxy.internal:8080"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"api.example.com"),
    )
    untrusted = lines(head(*headers))
    assert b"X-Forwarded-Proto: http" in untrusted
    assert b"X-Forwarded-Host: proxy.internal:8080" in untrusted
    trusted = lines(head(*headers, peer_trusted=True))
    assert b"X-Forwarded-Proto: https" in trusted
    assert b"X-Forwarded-Host: api.example.com" in trusted


def test_api_key_replaces_the_clients_authorization() -> None:
    client = (b"Authorization", b"Bearer client-key")
    assert b"Authorization: Bearer client-key" in lines(head(client))
    with_key = lines(head(client, api_key="backend-key"))
    assert [line for line in with_key if line.lower().startswith(b"authorization")] == [
        b"Authorization: Bearer backend-key"
    ]


def test_the_clients_request_id_is_replaced_by_the_one_given() -> None:
    raw = lines(head((b"X-Request-Id", b"client-chosen"), request_id="client-chosen"))
    assert [line for line in raw if line.lower().startswith(b"x-request-id")] == [
        b"x-request-id: client-chosen"
    ]


def test_response_headers_strip_hop_by_hop_and_add_variant() -> None:
    upstream = [
        (b"Content-Type", b"text/event-stream"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"10"),
        (b"Connection", b"close, X-Internal"),
        (b"X-Internal", b"1"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"x-request-id", b"backend-id"),
        (b"X-Name", "caf\u00e9".encode()),
    ]
    out = CIMultiDict(response_headers(upstream, variant=Variant.CANARY, request_id="rid-9"))
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert out["Content-Type"] == "text/event-stream"
    assert out["x-canary-variant"] == "canary"
    assert out.getall("x-request-id") == ["rid-9"]
    assert out["X-Name"].encode() == "caf\u00e9".encode()
    for name in (
        "Transfer-Encoding",
        "Content-Length",
        "Connection",
        "X-Internal",
        "Proxy-Authenticate",
    ):
        assert name not in out


def test_without_a_peer_or_a_forwarded_for_there_is_no_forwarded_for() -> None:
    assert lines(head(peer=None)) == [
        b"POST /v1/chat?x=1 HTTP/1.1",
        b"Host: backend:8000",
        b"X-Forwarded-Proto: http",
        b"x-request-id: rid-1",
    ]


def test_a_backends_connection_keep_alive_alone_drops_only_itself() -> None:
    upstream = [(b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"), (b"X-A", b"1")]
    out = response_headers(upstream, variant=Variant.STABLE, request_id="r")
    assert out == [("X-A", "1"), ("x-canary-variant", "stable"), ("x-request-id", "r")]


def test_a_response_header_that_is_not_utf8_passes_byte_for_byte_as_latin1() -> None:
    out = dict(
        response_headers([(b"X-Name", b"caf\xe9 \xff")], variant=Variant.STABLE, request_id="r")
    )
    assert out["X-Name"].encode("latin-1") == b"caf\xe9 \xff"


def test_the_proxys_extra_response_headers_replace_a_backends() -> None:
    upstream = [(b"X-Canary-Fallback", b"backend-said"), (b"X-Other", b"1")]
    out = response_headers(
        upstream, variant=Variant.STABLE, request_id="r", extra={"x-canary-fallback": "timeout"}
    )
    assert out == [
        ("X-Other", "1"),
        ("x-canary-fallback", "timeout"),
        ("x-canary-variant", "stable"),
        ("x-request-id", "r"),
    ]


def test_a_response_connection_of_options_alone_drops_no_other_header() -> None:
    upstream = [(b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"), (b"X-A", b"1")]
    out = response_headers(upstream, variant=Variant.STABLE, request_id="rid-1")
    assert [name for name, _ in out] == ["X-A", "x-canary-variant", "x-request-id"]


def test_a_header_named_by_connection_is_dropped_wherever_it_stands() -> None:
    raw = lines(
        head(
            (b"X-Before", b"1"),
            (b"Keep", b"2"),
            (b"Connection", b"x-before, keep-alive"),
            (b"Connection", b"X-After"),
            (b"X-After", b"3"),
        )
    )
    assert [line for line in raw if line.startswith((b"X-Before", b"X-After", b"Keep"))] == [
        b"Keep: 2"
    ]


def test_a_websocket_upgrade_keeps_its_upgrade_and_websocket_headers() -> None:
    client = (
        (b"Connection", b"Upgrade"),
        (b"Upgrade", b"websocket"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"Sec-WebSocket-Version", b"13"),
        (b"Sec-WebSocket-Protocol", b"realtime"),
    )
    assert lines(upgrade_head(head(*client))) == [
        b"POST /v1/chat?x=1 HTTP/1.1",
        b"Host: backend:8000",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Protocol: realtime",
        b"X-Forwarded-For: 192.0.2.1",
        b"X-Forwarded-Proto: http",
        b"x-request-id: rid-1",
        b"Connection: Upgrade",
        b"Upgrade: websocket",
    ]


def test_a_101_keeps_the_backends_upgrade_and_end_to_end_headers_as_received() -> None:
    backend = (
        (b"Upgrade", b"WebSocket"),
        (b"Connection", b"Upgrade, X-Hop"),
        (b"X-Hop", b"dropped"),
        (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Content-Length", b"0"),
        (b"X-Raw", b"caf\xe9"),
        (b"x-request-id", b"the-backends"),
    )
    assert lines(switching_head(backend, variant=Variant.CANARY, request_id="rid-1")) == [
        b"HTTP/1.1 101 Switching Protocols",
        b"Connection: Upgrade",
        b"Upgrade: WebSocket",
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
        b"X-Raw: caf\xe9",
        b"x-canary-variant: canary",
        b"x-request-id: rid-1",
    ]
    fallback = switching_head(
        [(b"X-Canary-Fallback", b"backend-said")],
        variant=Variant.STABLE,
        request_id="r",
        extra={"x-canary-fallback": "connect_error"},
    )
    assert lines(fallback) == [
        b"HTTP/1.1 101 Switching Protocols",
        b"Connection: Upgrade",
        b"Upgrade: websocket",
        b"x-canary-fallback: connect_error",
        b"x-canary-variant: stable",
        b"x-request-id: r",
    ]
