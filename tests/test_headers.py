"""Which headers cross the proxy (SPEC §5)."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.headers import request_headers, response_headers


def incoming(*items: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(items))


def forward(headers: CIMultiDictProxy[str], **kwargs: object) -> CIMultiDict[str]:
    options: dict[str, object] = {
        "peer": "192.0.2.1",
        "peer_trusted": False,
        "scheme": "http",
        "api_key": None,
        "request_id": "rid-1",
    }
    options.update(kwargs)
    return request_headers(headers, **options)  # type: ignore[arg-type]


def test_hop_by_hop_and_framing_headers_are_not_forwarded() -> None:
    out = forward(
        incoming(
            ("Host", "proxy.example"),
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "x"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic abc"),
            ("Proxy-Connection", "keep-alive"),
            ("X-Secret-Hop", "named by Connection"),
            ("Content-Length", "12"),
            ("Expect", "100-continue"),
            ("Content-Type", "application/json"),
            ("X-User-Id", "alice"),
        )
    )
    assert sorted(out.keys()) == sorted(
        [
            "Content-Type",
            "X-User-Id",
            "X-Forwarded-For",
            "X-Forwarded-Proto",
            "X-Forwarded-Host",
            "x-request-id",
        ]
    )
    assert out["X-User-Id"] == "alice"


def test_end_to_end_duplicates_keep_their_order() -> None:
    out = forward(incoming(("Accept", "a"), ("Accept", "b")))
    assert out.getall("Accept") == ["a", "b"]


def test_forwarded_for_appends_the_peer() -> None:
    assert forward(incoming())["X-Forwarded-For"] == "192.0.2.1"
    out = forward(incoming(("X-Forwarded-For", "203.0.113.5"), ("X-Forwarded-For", "198.51.100.7")))
    assert out["X-Forwarded-For"] == "203.0.113.5, 198.51.100.7, 192.0.2.1"


def test_forwarded_proto_and_host_are_kept_only_from_a_trusted_peer() -> None:
    headers = incoming(
        ("Host", "proxy.internal:8080"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "api.example.com"),
    )
    untrusted = forward(headers)
    assert untrusted["X-Forwarded-Proto"] == "http"
    assert untrusted["X-Forwarded-Host"] == "proxy.internal:8080"
    trusted = forward(headers, peer_trusted=True)
    assert trusted["X-Forwarded-Proto"] == "https"
    assert trusted["X-Forwarded-Host"] == "api.example.com"


def test_api_key_replaces_the_clients_authorization() -> None:
    headers = incoming(("Authorization", "Bearer client-key"))
    assert forward(headers)["Authorization"] == "Bearer client-key"
    out = forward(headers, api_key="backend-key")
    assert out.getall("Authorization") == ["Bearer backend-key"]


def test_request_id_is_set_once() -> None:
    out = forward(incoming(("X-Request-Id", "client-chosen")), request_id="client-chosen")
    assert out.getall("x-request-id") == ["client-chosen"]


def test_response_headers_strip_hop_by_hop_and_add_variant() -> None:
    upstream = incoming(
        ("Content-Type", "text/event-stream"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "10"),
        ("Connection", "close, X-Internal"),
        ("X-Internal", "1"),
        ("Proxy-Authenticate", "Basic"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("x-request-id", "backend-id"),
    )
    out = response_headers(upstream, variant="canary", request_id="rid-9")
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert out["Content-Type"] == "text/event-stream"
    assert out["x-canary-variant"] == "canary"
    assert out.getall("x-request-id") == ["rid-9"]
    for name in (
        "Transfer-Encoding",
        "Content-Length",
        "Connection",
        "X-Internal",
        "Proxy-Authenticate",
    ):
        assert name not in out
