"""The small string grammars inside the config, each a pure function with a one-line error.

Each parser returns the value or raises ValueError whose message completes
`path: ...`. Working and failing examples:

    durations     "250ms"  "2s"  "1.5m"  "1h"  30  (not: "fast", "2 sec", -1, true)
    listen        0.0.0.0:8080  localhost:0  [::1]:9090  (not: ::1:9090, host, host:70000)
    key sources   header:x-user-id  body:user  cookie:uid  query:user  auth  ip
                  (not: heder:x-user-id, header:, auth:x)
    time windows  "Mon-Fri 09:00-18:00"  "Sat,Sun 10:00-14:00"  "Mon 22:00-06:00" (wraps
                  midnight)  "Fri-Mon 00:00-24:00"  "daily 00:00-24:00"
                  (not: "Mon 9-17", "Mon 25:00-26:00", "Mon 10:00-10:00")
"""

from __future__ import annotations

import ipaddress
import math
import re

from proxy.config.model import KeyKind, KeySource, ListenAddress, TimeWindow

__all__ = [
    "DURATION_HINT",
    "LISTEN_HINT",
    "as_float",
    "is_http_token",
    "is_name",
    "looks_like_secret",
    "parse_duration",
    "parse_key_source",
    "parse_listen",
    "parse_window",
]

DURATION_HINT = 'a duration like "2s", "250ms" or a number of seconds'
DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
LISTEN_HINT = "host:port like 0.0.0.0:8080 or [::1]:8080"
MAX_PORT = 65535
MAX_EXACT_FLOAT = 2**53  # beyond this an int is no longer a count anyone means
KEY_SOURCE_HINT = "expected header:NAME, body:FIELD, cookie:NAME, query:NAME, auth or ip"
WINDOW_HINT = 'like "Mon-Fri 09:00-18:00" (days, then HH:MM-HH:MM)'
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
FULL_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MINUTES_PER_DAY = 24 * 60
# Prefixes of the keys operators of model servers paste: OpenAI and Anthropic (sk-),
# Stripe, JWTs (eyJ), GitHub, Slack, Hugging Face (hf_), Groq (gsk_), Replicate (r8_),
# NVIDIA (nvapi-), xAI, Perplexity, Google (AIza). (AWS key ids, 20 letters and digits
# without "_", need no prefix: `ASIA_KEY` may well name a variable.)
SECRET_PREFIXES = (
    "sk-",
    "sk_live_",
    "sk_test_",
    "Bearer ",
    "bearer ",
    "eyJ",
    "ghp_",
    "github_pat_",
    "glpat-",
    "xox",
    "hf_",
    "gsk_",
    "r8_",
    "nvapi-",
    "xai-",
    "pplx-",
    "AIza",
)
SECRET_MIN_LENGTH = 20  # shorter names are plausible variable names, whatever their letters

_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*", re.ASCII)
_HOST_NAME = re.compile(r"[A-Za-z0-9.-]+|\*")
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_WINDOW = re.compile(
    r"\s*(?P<days>\S.*?)\s+(?P<start>\d{1,2}:\d\d)\s*-\s*(?P<end>\d{1,2}:\d\d)\s*", re.ASCII
)
_NAMED_KINDS = {  # the kinds that take a name, with an example name for messages
    KeyKind.HEADER: "x-user-id",
    KeyKind.BODY: "user",
    KeyKind.COOKIE: "uid",
    KeyKind.QUERY: "user",
}


def parse_duration(value: object) -> float | None:
    """Seconds from `"250ms"`, `"2s"`, `"5m"`, `"1h"` or a number; None for anything else.

    Negative numbers, bools, `.inf` and unknown units are no durations.
    """
    number = as_float(value)
    if number is not None:
        return number if number >= 0 else None
    if not isinstance(value, str):
        return None
    match = _DURATION.fullmatch(value)
    if match is None:
        return None
    seconds = float(match.group(1)) * DURATION_UNITS_S[match.group(2) or "s"]
    return seconds if math.isfinite(seconds) else None


def parse_listen(text: str) -> ListenAddress:
    """`0.0.0.0:8080` or `[::1]:8080` -> ListenAddress; port 0 means any free port.

    Raises:
        ValueError: with a message that completes `path: ...`, without the text itself.
    """
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"must be {LISTEN_HINT}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("must have an IPv6 address inside the brackets") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"must be {LISTEN_HINT}")
        if ":" in host:
            raise ValueError("must put an IPv6 address in brackets, like [::1]:8080")
        if not _HOST_NAME.fullmatch(host):
            raise ValueError("must have a host name or IP address before the colon")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > MAX_PORT:
        raise ValueError(f"must end in a port from 0 to {MAX_PORT}")
    return ListenAddress(host, int(port_text))


def parse_key_source(text: str) -> KeySource:
    """`header:x-user-id` -> KeySource(HEADER, "x-user-id").

    Raises:
        ValueError: with a one-line message saying what was expected.
    """
    kind_text, has_name, name = text.partition(":")
    try:
        kind = KeyKind(kind_text.strip().lower())
    except ValueError:
        raise ValueError(f"unknown key source {text!r} ({KEY_SOURCE_HINT})") from None
    if kind not in _NAMED_KINDS:
        if has_name:
            raise ValueError(f"{kind} takes no name, got {text!r}")
        return KeySource(kind)
    if not name:
        raise ValueError(f"{kind} needs a name, like {kind}:{_NAMED_KINDS[kind]}, got {text!r}")
    if kind in (KeyKind.HEADER, KeyKind.COOKIE):
        if not _HTTP_TOKEN.fullmatch(name):
            raise ValueError(f"{kind} name must be an HTTP token, got {name!r}")
        return KeySource(kind, name.lower() if kind is KeyKind.HEADER else name)
    return KeySource(kind, name)


def parse_window(text: str) -> TimeWindow:
    """`"Mon-Fri 09:00-18:00"` -> TimeWindow(days={0..4}, start_minute=540, end_minute=1080).

    Raises:
        ValueError: with a one-line message saying what was expected.
    """
    match = _WINDOW.fullmatch(text)
    if match is None:
        raise ValueError(f"must be a time window {WINDOW_HINT}, got {text!r}")
    days = _parse_days(match["days"])
    start, end = _parse_minute(match["start"]), _parse_minute(match["end"])
    if start == MINUTES_PER_DAY:
        raise ValueError(f"cannot start at 24:00, got {text!r}")
    if start == end:
        raise ValueError(f"starts and ends at {match['start']}; use 00:00-24:00 for a whole day")
    return TimeWindow(frozenset(days), start, end, text)


def _parse_days(text: str) -> set[int]:
    if text.strip().lower() == "daily":
        return set(range(7))
    days: set[int] = set()
    for part in text.split(","):
        first, is_range, last = part.strip().partition("-")
        start = _parse_day(first)
        stop = _parse_day(last) if is_range else start
        days.update((start + offset) % 7 for offset in range((stop - start) % 7 + 1))
    return days


def _parse_day(text: str) -> int:
    name = text.strip().lower()
    for names in (DAY_NAMES, FULL_DAY_NAMES):
        if name in names:
            return names.index(name)
    raise ValueError(f"unknown day {text.strip()!r} (expected Mon, Tue, Wed, Thu, Fri, Sat, Sun)")


def _parse_minute(text: str) -> int:
    hours, minutes = (int(part) for part in text.split(":"))
    if minutes > 59 or hours > 24 or (hours == 24 and minutes):
        raise ValueError(f"time {text!r} must be between 00:00 and 24:00")
    return hours * 60 + minutes


def is_name(text: str) -> bool:
    """True for a route or backend name: letters, digits, '.', '_' and '-'."""
    return _NAME.fullmatch(text) is not None


def is_http_token(text: str) -> bool:
    """True for an HTTP header or cookie name (RFC 9110 `token`)."""
    return _HTTP_TOKEN.fullmatch(text) is not None


def looks_like_secret(text: str) -> bool:
    """True for an API key pasted where an environment variable's name belongs.

    Variables are named in words (`V1_API_KEY`, `llama_key`); keys are long runs of
    letters and digits, or mix both cases with digits, or start with a known prefix.
    """
    if text.startswith(SECRET_PREFIXES):
        return True
    if len(text) < SECRET_MIN_LENGTH:
        return False
    has_digit = any(c.isdigit() for c in text)
    if "_" not in text:
        return has_digit and any(c.isalpha() for c in text)
    return has_digit and any(c.islower() for c in text) and any(c.isupper() for c in text)


def as_float(value: object) -> float | None:
    """A finite YAML number (int or float, never bool) as a float, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and abs(value) > MAX_EXACT_FLOAT:
        return None
    number = float(value)
    return number if math.isfinite(number) else None
