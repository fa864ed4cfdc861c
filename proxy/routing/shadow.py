"""Which stable-served requests are also sent to the canary in its shadow phase. Pure.

Rules:
1. Only a request stable serves by the formula (a user's bucket, or a request without
   a key) is shadowed: an override or a cohort that keeps a request off the canary
   keeps it off the canary's shadow too.
2. A user is shadowed by bucket, as the canary's weight picks users: the buckets below
   `share` × 10,000 (the users the first steps will serve are the ones judged before
   them); a request without a key is shadowed at random with the same chance.
3. Only idempotent LLM calls are shadowed: `POST` to a path ending in one of
   `SHADOW_PATHS`, without the client's opt-out header (`x-canary-no-shadow`, any
   value), and offering none of the tools the route lists as `never_tools` (OpenAI
   chat and Responses, Anthropic and legacy `functions` shapes).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

from proxy.config.model import SHADOW_PATHS
from proxy.routing.assignment import BUCKETS, Assignment, AssignReason

__all__ = ["NO_SHADOW", "chosen", "eligible", "offered_tools"]

NO_SHADOW: Final = "x-canary-no-shadow"  # a client's opt-out, per request


def chosen(assignment: Assignment, threshold: int, rand: Callable[[], float]) -> bool:
    """Is this stable-served request one of the shadowed share (rules 1 and 2)?"""
    reason = assignment.reason
    if reason is AssignReason.HASH:
        bucket = assignment.bucket
        return bucket is not None and bucket < threshold
    return reason is AssignReason.ANONYMOUS and rand() * BUCKETS < threshold


def eligible(
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: Mapping[str, Any],
    never_tools: Collection[str],
) -> bool:
    """May this request be sent twice (rule 3)?"""
    if method != "POST" or not path.rstrip("/").endswith(SHADOW_PATHS):
        return False
    if NO_SHADOW in headers:
        return False
    return not never_tools or not any(name in never_tools for name in offered_tools(body))


def offered_tools(body: Mapping[str, Any]) -> list[str]:
    """The names of the tools a request offers the model, in any API's shape."""
    names: list[str] = []
    for key in ("tools", "functions"):
        tools = body.get(key)
        if not isinstance(tools, list):
            continue
        for tool in tools:
            if not isinstance(tool, Mapping):
                continue
            function = tool.get("function")
            name = function.get("name") if isinstance(function, Mapping) else tool.get("name")
            if isinstance(name, str):
                names.append(name)
    return names
