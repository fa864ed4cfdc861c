"""Routing decisions: which route a request takes and which variant serves it. Pure.

The assignment formula is SPEC §4, exactly, so anyone can reproduce it offline::

    bucket  = mmh3.hash(f"{salt}:{key}", 0, signed=False) % 10000
    variant = "canary" if bucket < round(weight * 100) else "stable"

Rules:
1. Raising the weight only moves users from stable to canary; lowering it only
   the reverse (the threshold is monotone in the weight and the bucket is fixed).
2. Precedence: the override header, then the cohort (an ineligible request goes to
   stable), then `anonymous` for a request with no key, then the formula.
3. Routes are tried in order; the first whose path prefix matches and, when it
   lists models, whose body's "model" is one of them, wins. No match: no route.
4. Nothing here reads a socket or a clock. When a decision depends on the JSON body
   and the body has not been read, the answer is `NEED_BODY`; the caller reads the
   body and asks again.

A `RouteTable` is the snapshot a request reads once: the config's routes with the
weights currently in force, and everything per route precomputed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final, overload

import mmh3

from proxy.config.model import (
    Anonymous,
    CohortRule,
    Config,
    KeyKind,
    Network,
    Route,
    Variant,
)
from proxy.routing.keys import NEED_BODY, Body, NeedBody, RequestParts, find_key, read_source

__all__ = [
    "BUCKETS",
    "NEED_BODY",
    "AssignReason",
    "Assignment",
    "RoutePlan",
    "RouteTable",
    "assign",
    "bucket_of",
    "canary_from_weight",
    "canary_threshold",
    "choose_variant",
    "match_route",
]

BUCKETS: Final = 10_000


def bucket_of(salt: str, key: str) -> int:
    """The user's fixed bucket in [0, 10000).

    The text is hashed as its UTF-8 bytes (what mmh3 does with a str). A key that is
    not valid UTF-8 (raw header bytes, which aiohttp decodes with surrogateescape, or
    a lone surrogate from a JSON escape) is hashed as the bytes it stands for: mmh3
    given such a str crashes the process (a segfault in mmh3 5.x).
    """
    text = f"{salt}:{key}"
    if text.isascii():
        return int(mmh3.hash(text, 0, signed=False)) % BUCKETS
    return int(mmh3.hash(_utf8(text), 0, signed=False)) % BUCKETS


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")  # valid UTF-8, or raw bytes restored
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")  # a lone surrogate from a JSON escape


def canary_threshold(weight: float) -> int:
    """Buckets below this number are in the canary at `weight` percent."""
    return round(weight * 100)


def choose_variant(bucket: int, threshold: int) -> Variant:
    return Variant.CANARY if bucket < threshold else Variant.STABLE


def canary_from_weight(bucket: int) -> float:
    """The lowest weight (percent, two decimals) at which this bucket is in the canary."""
    return (bucket + 1) / 100


class AssignReason(StrEnum):
    """Why a request got its variant; reported with the assignment."""

    OVERRIDE = "override"  # the override header forced it
    COHORT = "cohort"  # not eligible for the canary
    ANONYMOUS = "anonymous"  # no key: random or stable, as the route says
    HASH = "hash"  # the formula


@dataclass(frozen=True, slots=True)
class Assignment:
    variant: Variant
    reason: AssignReason
    bucket: int | None = None  # the user's bucket when a key was found
    key_source: str | None = None  # e.g. "header:x-user-id"


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """One route with the weight in force and what a request needs precomputed."""

    route: Route
    weight: float
    threshold: int
    # Does choosing a variant, or rewriting the model, need the JSON body?
    reads_body_for_key: bool
    rewrites_model: bool
    # In the canary's shadow phase: stable's buckets below this are also sent to the
    # canary (`proxy.routing.shadow`); 0: no shadow traffic.
    shadow: int = 0

    @classmethod
    def build(cls, route: Route, weight: float, shadowing: bool = False) -> RoutePlan:
        cohort_sources = (
            [rule.source for rule in (*route.cohort.include, *route.cohort.exclude)]
            if route.cohort
            else []
        )
        return cls(
            route=route,
            weight=weight,
            threshold=canary_threshold(weight),
            reads_body_for_key=any(
                s.kind is KeyKind.BODY for s in (*route.sticky.keys, *cohort_sources)
            ),
            rewrites_model=bool(route.model_rewrite),
            shadow=_shadow_threshold(route) if shadowing else 0,
        )

    @property
    def name(self) -> str:
        return self.route.name


@dataclass(frozen=True, slots=True)
class RouteTable:
    """The routes a request is matched against, with the weights currently in force."""

    config: Config
    plans: tuple[RoutePlan, ...]
    by_name: Mapping[str, RoutePlan]

    @classmethod
    def build(
        cls,
        config: Config,
        weights: Mapping[str, float] | None = None,
        shadowing: Collection[str] = (),
    ) -> RouteTable:
        """Plans for every route; a route's weight is `weights[name]`, else its config
        weight; the routes named in `shadowing` send their shadow share to the canary."""
        weights = weights or {}
        plans = tuple(
            RoutePlan.build(
                route, weights.get(route.name, route.rollout.weight), route.name in shadowing
            )
            for route in config.routes
        )
        return cls(config, plans, MappingProxyType({p.name: p for p in plans}))

    def with_weights(
        self, weights: Mapping[str, float], shadowing: Collection[str] | None = None
    ) -> RouteTable:
        """A new table with some routes' weights replaced, and the routes in shadow when
        given (else as they were); this one is left as it was."""
        current = {p.name: p.weight for p in self.plans}
        if shadowing is None:
            shadowing = self.shadowing
        return RouteTable.build(self.config, {**current, **weights}, shadowing)

    @property
    def weights(self) -> dict[str, float]:
        return {p.name: p.weight for p in self.plans}

    @property
    def shadowing(self) -> frozenset[str]:
        """The routes whose canary gets shadow traffic."""
        return frozenset(p.name for p in self.plans if p.shadow)


def _shadow_threshold(route: Route) -> int:
    """Buckets below this are shadowed (`proxy.routing.shadow` rule 2); 0 without shadow."""
    auto = route.rollout.auto
    if auto is None or auto.shadow is None:
        return 0
    return max(1, round(auto.shadow.share * BUCKETS))


@overload
def match_route(table: RouteTable, path: str, body: Mapping[str, Any]) -> RoutePlan | None: ...
@overload
def match_route(table: RouteTable, path: str, body: None) -> RoutePlan | NeedBody | None: ...
def match_route(table: RouteTable, path: str, body: Body) -> RoutePlan | NeedBody | None:
    """The first route that takes this request, None when no route does."""
    for plan in table.plans:
        match = plan.route.match
        if not path.startswith(match.path_prefix):
            continue
        if match.models is None:
            return plan
        if body is None:
            return NEED_BODY
        if body.get("model") in match.models:
            return plan
    return None


@overload
def assign(
    plan: RoutePlan,
    parts: RequestParts,
    body: Mapping[str, Any],
    trusted_proxies: Sequence[Network] = (),
    rand: Callable[[], float] = random.random,
) -> Assignment: ...
@overload
def assign(
    plan: RoutePlan,
    parts: RequestParts,
    body: None,
    trusted_proxies: Sequence[Network] = (),
    rand: Callable[[], float] = random.random,
) -> Assignment | NeedBody: ...
def assign(
    plan: RoutePlan,
    parts: RequestParts,
    body: Body,
    trusted_proxies: Sequence[Network] = (),
    rand: Callable[[], float] = random.random,
) -> Assignment | NeedBody:
    """The variant for this request under `plan` (SPEC §4 precedence)."""
    route = plan.route
    if route.override_header is not None:
        forced = _override(parts.headers.get(route.override_header))
        if forced is not None:
            return forced
    if route.cohort is not None:
        eligible = _eligible(
            route.cohort.include, route.cohort.exclude, parts, body, trusted_proxies
        )
        if eligible is NEED_BODY:
            return NEED_BODY
        if not eligible:
            return _COHORT_STABLE
    found = find_key(route.sticky.keys, parts, body, trusted_proxies)
    if found is NEED_BODY:
        return NEED_BODY
    if found is None:
        if route.sticky.anonymous is Anonymous.STABLE:
            return _ANONYMOUS_STABLE
        return _ANONYMOUS_CANARY if rand() * BUCKETS < plan.threshold else _ANONYMOUS_STABLE
    bucket = bucket_of(route.sticky.salt, found.value)
    return Assignment(
        choose_variant(bucket, plan.threshold), AssignReason.HASH, bucket, found.source.spec
    )


_OVERRIDES: Final = {
    "always": Assignment(Variant.CANARY, AssignReason.OVERRIDE),
    "never": Assignment(Variant.STABLE, AssignReason.OVERRIDE),
}
_COHORT_STABLE: Final = Assignment(Variant.STABLE, AssignReason.COHORT)
_ANONYMOUS_STABLE: Final = Assignment(Variant.STABLE, AssignReason.ANONYMOUS)
_ANONYMOUS_CANARY: Final = Assignment(Variant.CANARY, AssignReason.ANONYMOUS)


def _override(value: str | None) -> Assignment | None:
    if not value:
        return None
    return _OVERRIDES.get(value.strip().lower())


def _eligible(
    include: Sequence[CohortRule],
    exclude: Sequence[CohortRule],
    parts: RequestParts,
    body: Body,
    trusted_proxies: Sequence[Network],
) -> bool | NeedBody:
    excluded = _any_rule_matches(exclude, parts, body, trusted_proxies)
    if excluded is not False:
        return NEED_BODY if excluded is NEED_BODY else False
    if not include:
        return True
    return _any_rule_matches(include, parts, body, trusted_proxies)


def _any_rule_matches(
    rules: Sequence[CohortRule],
    parts: RequestParts,
    body: Body,
    trusted_proxies: Sequence[Network],
) -> bool | NeedBody:
    for rule in rules:
        value = read_source(rule.source, parts, body, trusted_proxies)
        if value is NEED_BODY:
            return NEED_BODY
        if value is not None and value in rule.values:
            return True
    return False
