"""Reading user keys out of a request (SPEC §3 key sources)."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.config.model import KeyKind, KeySource
from proxy.routing.keys import NEED_BODY, FoundKey, client_ip, find_key, is_trusted, read_source
from tests.parts import Parts

HEADER = KeySource(KeyKind.HEADER, "x-user-id")
BODY = KeySource(KeyKind.BODY, "user")
COOKIE = KeySource(KeyKind.COOKIE, "uid")
QUERY = KeySource(KeyKind.QUERY, "u")
AUTH = KeySource(KeyKind.AUTH)
NESTED = KeySource(KeyKind.BODY, "metadata.user_id")
IP = KeySource(KeyKind.IP)
TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize(
    ("source", "parts", "body", "expected"),
    [
        (HEADER, Parts({"X-User-Id": "alice"}), None, "alice"),
        (HEADER, Parts({"x-user-id": ""}), None, None),
        (HEADER, Parts(), None, None),
        (BODY, Parts(), {"user": "bob"}, "bob"),
        (BODY, Parts(), {"user": 42}, "42"),
        (BODY, Parts(), {"user": True}, None),
        (BODY, Parts(), {"user": ["x"]}, None),
        (BODY, Parts(), {"user": ""}, None),
        (BODY, Parts(), {}, None),
        (COOKIE, Parts(cookie_items={"uid": "c-1"}), None, "c-1"),
        (QUERY, Parts(query_items={"u": "q-1"}), None, "q-1"),
        (AUTH, Parts({"Authorization": "Bearer sk-tenant-1"}), None, "sk-tenant-1"),
        (AUTH, Parts({"Authorization": "bearer   sk-tenant-2 "}), None, "sk-tenant-2"),
        (AUTH, Parts({"Authorization": "Basic dXNlcjpwdw=="}), None, None),
        (AUTH, Parts({"Authorization": "Bearer "}), None, None),
        (AUTH, Parts({"x-api-key": "sk-ant-1"}), None, "sk-ant-1"),  # Anthropic's clients
        (AUTH, Parts({"Authorization": "Bearer sk-1", "x-api-key": "sk-2"}), None, "sk-1"),
        (NESTED, Parts(), {"metadata": {"user_id": "u-7"}}, "u-7"),
        (NESTED, Parts(), {"metadata": {"user_id": 7}}, "7"),
        (NESTED, Parts(), {"metadata": "u-7"}, None),
        (NESTED, Parts(), {"metadata": {}}, None),
        (NESTED, Parts(), {"metadata.user_id": "flat"}, "flat"),  # a field so named first
        (IP, Parts(peer="192.0.2.7"), None, "192.0.2.7"),
        (IP, Parts(peer=None), None, None),
    ],
)
def test_read_source_reads_each_kind(
    source: KeySource, parts: Parts, body: dict[str, object] | None, expected: str | None
) -> None:
    assert read_source(source, parts, body) == expected


def test_body_source_asks_for_the_body_when_it_is_not_read() -> None:
    assert read_source(BODY, Parts(), None) is NEED_BODY


def test_find_key_takes_the_first_present_source() -> None:
    parts = Parts({"Authorization": "Bearer tok"}, cookie_items={"uid": "cookie-user"})
    found = find_key((HEADER, COOKIE, AUTH), parts, None)
    assert found == FoundKey(COOKIE, "cookie-user")


def test_find_key_does_not_need_the_body_when_an_earlier_source_is_present() -> None:
    found = find_key((HEADER, BODY), Parts({"x-user-id": "h"}), None)
    assert found == FoundKey(HEADER, "h")


def test_find_key_needs_the_body_only_when_it_reaches_a_body_source() -> None:
    assert find_key((HEADER, BODY), Parts(), None) is NEED_BODY
    assert find_key((HEADER, BODY), Parts(), {"user": "u"}) == FoundKey(BODY, "u")


def test_find_key_is_none_when_no_source_is_present() -> None:
    assert find_key((HEADER, COOKIE, QUERY), Parts(), None) is None


@pytest.mark.parametrize(
    ("remote", "forwarded_for", "expected"),
    [
        # An untrusted peer is the client, whatever it claims.
        ("192.0.2.1", "203.0.113.9", "192.0.2.1"),
        # A trusted peer: read from the right, skip trusted hops.
        ("10.0.0.1", "203.0.113.9", "203.0.113.9"),
        ("10.0.0.1", "198.51.100.3, 203.0.113.9, 10.1.2.3", "203.0.113.9"),
        # A spoofed left part does not matter: the first untrusted from the right wins.
        ("10.0.0.1", "1.1.1.1, 203.0.113.9", "203.0.113.9"),
        # Every hop trusted: the leftmost.
        ("10.0.0.1", "10.9.9.9, 10.1.1.1", "10.9.9.9"),
        # A trusted peer without the header.
        ("10.0.0.1", None, "10.0.0.1"),
        # Junk is not trusted, so it is taken as the client.
        ("10.0.0.1", "not-an-ip", "not-an-ip"),
        ("fd00::1", "2001:db8::5", "2001:db8::5"),
    ],
)
def test_client_ip_reads_forwarded_for_only_from_trusted_peers(
    remote: str, forwarded_for: str | None, expected: str
) -> None:
    assert client_ip(remote, forwarded_for, TRUSTED) == expected


def test_client_ip_ignores_forwarded_for_without_trusted_proxies() -> None:
    assert client_ip("10.0.0.1", "203.0.113.9", ()) == "10.0.0.1"


def test_ip_source_uses_trusted_proxies() -> None:
    parts = Parts({"X-Forwarded-For": "203.0.113.9"}, peer="10.0.0.5")
    assert read_source(IP, parts, None, TRUSTED) == "203.0.113.9"
    assert read_source(IP, parts, None) == "10.0.0.5"


def test_is_trusted() -> None:
    assert is_trusted("10.2.3.4", TRUSTED)
    assert not is_trusted("11.2.3.4", TRUSTED)
    assert not is_trusted(None, TRUSTED)
    assert not is_trusted("garbage", TRUSTED)
    assert not is_trusted("10.2.3.4", ())
