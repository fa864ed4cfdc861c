"""User feedback on answers: which variant served a recent request id, and what a score says.

A client rates an answer with `POST /v1/feedback` on the public port, giving the
answer's `x-request-id` and a score; the proxy counts it for the route and variant that
served that request, in the window stats the status page and the rollout judge read.

Rules:
1. Each process remembers the route and variant of its last `limits.feedback_ids`
   answered requests, by request id; past that the oldest is forgotten first. The
   memory is bounded by that count (an id is at most 200 characters); 0 remembers
   nothing and turns feedback off (the path is then forwarded like any other).
2. A score is a number (JSON, not a boolean): below 0 is negative, 0 neutral, above 0
   positive. Thumbs down is -1, thumbs up 1; a 1-5 scale maps as `stars - 3`.
3. A request id takes one rating: it is forgotten once rated.
4. Feedback for an id this process does not remember (older than the last
   `feedback_ids` requests, served by another process or worker, never answered, or
   rated already) is refused with 404 and counted nowhere.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from enum import StrEnum

from proxy.config.model import Variant

__all__ = ["RecentRequests", "Score", "score_of"]


class Score(StrEnum):
    NEGATIVE = "negative"
    NEUTRAL = "neutral"
    POSITIVE = "positive"


def score_of(value: object) -> Score | None:
    """What a feedback score says; None when it is not a finite number (rule 2)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return None
    return Score.NEGATIVE if value < 0 else Score.POSITIVE if value > 0 else Score.NEUTRAL


class RecentRequests:
    """The route and variant of the last `capacity` answered requests, by request id."""

    __slots__ = ("_capacity", "_pairs", "_served")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        # An OrderedDict forgets its oldest entry in O(1); a dict's front, emptied one
        # entry at a time, is scanned again on every pop.
        self._served: OrderedDict[str, tuple[str, Variant]] = OrderedDict()
        # One (route, variant) tuple each, shared by every entry that names it.
        self._pairs: dict[str, dict[Variant, tuple[str, Variant]]] = {}

    @property
    def capacity(self) -> int:
        return self._capacity

    def resize(self, capacity: int) -> None:
        """Remember this many from now on, forgetting the oldest beyond it."""
        self._capacity = capacity
        served = self._served
        while len(served) > capacity:
            served.popitem(last=False)

    def remember(self, request_id: str, route: str, variant: Variant) -> None:
        served = self._served
        by_variant = self._pairs.get(route)
        if by_variant is None:
            by_variant = self._pairs[route] = {}
        pair = by_variant.get(variant)
        if pair is None:
            pair = by_variant[variant] = (route, variant)
        served[request_id] = pair
        if len(served) > self._capacity:
            served.popitem(last=False)

    def take(self, request_id: str) -> tuple[str, Variant] | None:
        """The route and variant that served `request_id`, forgotten now (rule 3)."""
        return self._served.pop(request_id, None)
