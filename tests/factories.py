"""Config records built directly, for pure tests that need no YAML."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType
from typing import Any

from proxy.config.model import (
    Backend,
    Config,
    KeyKind,
    KeySource,
    Match,
    Rollout,
    Route,
    Sticky,
)

STABLE_BACKEND = Backend("v1", "http://127.0.0.1:1", "http://127.0.0.1:1", "")
CANARY_BACKEND = Backend("v2", "http://127.0.0.1:2", "http://127.0.0.1:2", "")


def make_route(name: str = "chat", weight: float = 0.0, **changes: Any) -> Route:
    route = Route(
        name=name,
        match=Match("/"),
        stable="v1",
        canary="v2",
        sticky=Sticky((KeySource(KeyKind.HEADER, "x-user-id"),), salt="s"),
        rollout=Rollout(weight=weight),
    )
    return replace(route, **changes)


def make_config(*routes: Route) -> Config:
    return Config(
        backends=MappingProxyType({"v1": STABLE_BACKEND, "v2": CANARY_BACKEND}),
        routes=routes or (make_route(),),
    )
