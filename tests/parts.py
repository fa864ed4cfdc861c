"""A request's parts without a socket, for the pure routing and key tests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy


@dataclass
class Parts:
    header_items: Mapping[str, str] = field(default_factory=dict)
    query_items: Mapping[str, str] = field(default_factory=dict)
    cookie_items: Mapping[str, str] = field(default_factory=dict)
    peer: str | None = "192.0.2.10"

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return CIMultiDictProxy(CIMultiDict(self.header_items))

    @property
    def query(self) -> MultiDictProxy[str]:
        return MultiDictProxy(MultiDict(self.query_items))

    @property
    def cookies(self) -> Mapping[str, str]:
        return self.cookie_items

    @property
    def remote(self) -> str | None:
        return self.peer
