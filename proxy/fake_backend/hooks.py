"""The per-request fault hooks: `x-fake-*` request headers, parsed into `Hooks`.

Each hook is optional; an invalid value is a `ValueError` naming the header, which the
server answers 400 (hooks never fail silently). What each hook does is the business of
`proxy.fake_backend.plan`; the list is in the `proxy.fake_backend` docstring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Hooks", "parse_hooks"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
_RESETS = {"before-headers": False, "after-headers": True}


@dataclass(frozen=True, slots=True)
class Hooks:
    """The `x-fake-*` request headers, parsed; None or False when absent."""

    status: int | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    tokens: int | None = None
    hang: bool = False
    reset_after_headers: bool | None = None
    cut_after: int | None = None
    overrun: bool = False
    no_done: bool = False
    stream_error: bool = False
    garbage: bool = False
    json_garbage: bool = False


_NO_HOOKS = Hooks()


def _flag(name: str, value: str | None) -> bool:
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{name} must be 1 or 0, got {value!r}")


def _seconds(name: str, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0.0):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return seconds


def _count(name: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return count


def _status(value: str | None) -> int | None:
    status = _count("x-fake-status", value)
    if status is not None and not 400 <= status <= 599:
        raise ValueError(f"x-fake-status must be a 4xx or 5xx status, got {value!r}")
    return status


def _reset(value: str | None) -> bool | None:
    if value is None:
        return None
    try:
        return _RESETS[value.strip().lower()]
    except KeyError:
        raise ValueError(
            f"x-fake-reset must be before-headers or after-headers, got {value!r}"
        ) from None


def parse_hooks(headers: Mapping[str, str], model: str | None = None) -> Hooks:
    """The hooks in `headers` (a case-insensitive mapping, or one with lower-case keys).

    With `x-fake-only: MODEL[,MODEL...]`, only a server whose model is listed applies
    the hooks; any other ignores them all. Behind a proxy that sends one request to
    two backends (a fallback), this puts a fault on one of them.

    Raises:
        ValueError: a hook's value is invalid (a one-line message naming the header).
    """
    get = headers.get
    only = get("x-fake-only")
    if only is not None and model not in {name.strip() for name in only.split(",")}:
        return _NO_HOOKS
    return Hooks(
        status=_status(get("x-fake-status")),
        latency_s=_seconds("x-fake-latency", get("x-fake-latency")),
        ttft_s=_seconds("x-fake-ttft", get("x-fake-ttft")),
        tokens_per_s=_seconds("x-fake-tokens-per-s", get("x-fake-tokens-per-s")),
        tokens=_count("x-fake-tokens", get("x-fake-tokens")),
        hang=_flag("x-fake-hang", get("x-fake-hang")),
        reset_after_headers=_reset(get("x-fake-reset")),
        cut_after=_count("x-fake-cut-after", get("x-fake-cut-after")),
        overrun=_flag("x-fake-overrun", get("x-fake-overrun")),
        no_done=_flag("x-fake-no-done", get("x-fake-no-done")),
        stream_error=_flag("x-fake-stream-error", get("x-fake-stream-error")),
        garbage=_flag("x-fake-garbage", get("x-fake-garbage")),
        json_garbage=_flag("x-fake-json-garbage", get("x-fake-json-garbage")),
    )
