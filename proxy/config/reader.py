"""Walking a parsed YAML tree while tracking where we are and collecting every problem.

Rules:
1. A `Reader` is one position in the tree: the value there, its path
   (`routes[0].rollout.auto`) and the problem list it shares with every other
   reader of the same file.
2. A getter never raises: on a bad value it records `path: message` and returns
   None, so one pass reports every mistake in the file.
3. Only what YAML itself typed counts: `true` is a bool and never an int, `"5"`
   is a string and never a number, `.inf` and `.nan` are no numbers at all.

Example::

    root = Reader(data)
    fields = root.fields(("listen", "limits"))
    if fields is not None:
        listen = fields.get("listen", Reader.listen, default_listen)
    if root.problems:
        raise ConfigError(root.problems)
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection
from decimal import Decimal
from enum import StrEnum
from typing import TypeVar

from proxy.config.grammar import (
    DURATION_HINT,
    LISTEN_HINT,
    as_float,
    looks_like_secret,
    parse_duration,
    parse_listen,
)
from proxy.config.model import ListenAddress

__all__ = [
    "Fields",
    "Reader",
    "describe",
    "key_path",
]

SECRET_KEYS = ("api_key", "key", "token", "password", "secret")
MAX_SHOWN_CHARS = 60  # a found value longer than this is cut short in messages
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_MISSING = object()

T = TypeVar("T")
D = TypeVar("D")
E = TypeVar("E", bound=StrEnum)


def describe(value: object) -> str:
    """How a found value reads in a message: `'fast'`, `true`, `null`, `a list`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= MAX_SHOWN_CHARS else value[:MAX_SHOWN_CHARS] + "...")
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int | float):
        return str(value)
    return f"a {type(value).__name__} ({value})"


class Reader:
    """One position in the YAML tree: its value, its path, the file's shared problems."""

    __slots__ = ("path", "problems", "value")

    def __init__(self, value: object, path: str = "", problems: list[str] | None = None) -> None:
        self.value = value
        self.path = path
        self.problems: list[str] = [] if problems is None else problems

    def error(self, message: str) -> None:
        """Record one problem at this path."""
        self.problems.append(f"{self.path or 'top level'}: {message}")

    def key(self, name: str) -> Reader:
        """The reader for `name` inside this mapping (its value may be missing)."""
        value = self.value.get(name, _MISSING) if isinstance(self.value, dict) else _MISSING
        return Reader(value, key_path(self.path, name), self.problems)

    def index(self, position: int) -> Reader:
        """The reader for item `position` of this list."""
        value = self.value[position] if isinstance(self.value, list) else _MISSING
        return Reader(value, f"{self.path}[{position}]", self.problems)

    # -- containers ----------------------------------------------------------------

    def fields(
        self,
        allowed: Collection[str],
        *,
        required: Collection[str] = (),
        secret_env: str | None = None,
    ) -> Fields | None:
        """This value as a mapping with known keys; unknown and missing keys are problems.

        `secret_env` names the `*_env` key of this section: a literal secret key next
        to it (`api_key`, `token`, ...) gets a message pointing there.
        """
        entries = self.entries(non_empty=False)
        if entries is None:
            return None
        for name, child in entries:
            if name in allowed:
                continue
            if secret_env is not None and name in SECRET_KEYS:
                child.error(
                    "secrets are not allowed in the config file; "
                    f"set {secret_env} to the name of an environment variable"
                )
            else:
                child.error(_unknown_key(name, allowed))
        present = {name for name, _ in entries}
        for name in required:
            if name not in present:
                self.key(name).error("is required")
        return Fields(self)

    def entries(self, *, non_empty: bool = True) -> list[tuple[str, Reader]] | None:
        """This value as a mapping with free keys (backend names, key sources)."""
        if not isinstance(self.value, dict):
            self._expected("a mapping")
            return None
        if non_empty and not self.value:
            self.error("must not be empty")
            return None
        result: list[tuple[str, Reader]] = []
        for name in self.value:
            if isinstance(name, str):
                result.append((name, self.key(name)))
            else:
                self.error(f"keys must be strings, got {describe(name)}")
        return result

    def items(self, *, non_empty: bool = True) -> list[Reader] | None:
        """This value as a list of readers."""
        if not isinstance(self.value, list):
            self._expected("a list")
            return None
        if non_empty and not self.value:
            self.error("must not be empty")
            return None
        return [self.index(i) for i in range(len(self.value))]

    # -- scalars ---------------------------------------------------------------------

    def string(self, *, non_empty: bool = True) -> str | None:
        """A YAML string; a number where a string belongs gets a hint to quote it."""
        value = self.value
        if isinstance(value, str):
            if non_empty and not value.strip():
                self.error("must not be empty")
                return None
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            self.error(f'must be a string, got the number {value} (quote it: "{value}")')
            return None
        self._expected("a string")
        return None

    def boolean(self) -> bool | None:
        if isinstance(self.value, bool):
            return self.value
        self._expected("true or false")
        return None

    def integer(self, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
        value = self.value
        if not isinstance(value, int) or isinstance(value, bool):
            self._expected("a whole number")
            return None
        return value if self._in_range(value, minimum, maximum) else None

    def number(
        self,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        above: float | None = None,
        below: float | None = None,
    ) -> float | None:
        """A finite int or float; `minimum`/`maximum` are inclusive, `above`/`below` not."""
        value = as_float(self.value)
        if value is None:
            self._expected("a number")
            return None
        if not self._in_range(value, minimum, maximum):
            return None
        if above is not None and value <= above:
            self.error(f"must be greater than {above:g}, got {value:g}")
            return None
        if below is not None and value >= below:
            self.error(f"must be less than {below:g}, got {value:g}")
            return None
        return value

    def duration(self, *, allow_zero: bool = False) -> float | None:
        """Seconds from `"250ms"`, `"2s"`, `"5m"`, `"1h"` or a plain number of seconds."""
        seconds = parse_duration(self.value)
        if seconds is None:
            self._expected(DURATION_HINT)
            return None
        if seconds == 0 and not allow_zero:
            self.error(f"must be longer than zero, got {describe(self.value)}")
            return None
        return seconds

    def percent(self, *, allow_zero: bool = True) -> float | None:
        """A percentage 0-100 with at most two decimals (the bucket grid is 0.01 %)."""
        value = self.number(minimum=0.0, maximum=100.0)
        if value is None:
            return None
        if not allow_zero and value == 0:
            self.error("must be greater than 0, got 0")
            return None
        exponent = Decimal(repr(self.value)).as_tuple().exponent
        if isinstance(exponent, int) and exponent < -2:
            self.error(f"must have at most two decimals, got {describe(self.value)}")
            return None
        return value

    def choice(self, kind: type[E]) -> E | None:
        """One of the enum's values, as written in the config."""
        options = [str(member) for member in kind]
        if isinstance(self.value, str) and self.value in options:
            return kind(self.value)
        self.error(f"must be one of {', '.join(options)}, got {describe(self.value)}")
        return None

    def env_name(self) -> str | None:
        """The name of an environment variable; a pasted secret is called out as such."""
        value = self.string()
        if value is None:
            return None
        if looks_like_secret(value):
            self.error(
                "looks like a secret, not an environment variable name; "
                "put the key in the environment and name the variable here"
            )
            return None
        if not _ENV_NAME.fullmatch(value):
            # The value is not echoed: a mistyped name may well be a pasted secret.
            self.error(
                "must be an environment variable name like V1_API_KEY "
                "(letters, digits and '_', not starting with a digit)"
            )
            return None
        return value

    def listen(self) -> ListenAddress | None:
        """`host:port` or `[v6]:port`; port 0 means any free port."""
        if not isinstance(self.value, str):
            self._expected(LISTEN_HINT)
            return None
        try:
            return parse_listen(self.value)
        except ValueError as exc:
            self.error(f"{exc}, got {describe(self.value)}")
            return None

    # -- helpers ---------------------------------------------------------------------

    def _expected(self, what: str) -> None:
        self.error(f"must be {what}, got {describe(self.value)}")

    def _in_range(self, value: float, minimum: float | None, maximum: float | None) -> bool:
        if minimum is not None and value < minimum:
            self.error(f"must be at least {minimum:g}, got {value:g}")
            return False
        if maximum is not None and value > maximum:
            self.error(f"must be at most {maximum:g}, got {value:g}")
            return False
        return True


class Fields:
    """The known keys of one mapping, read with a getter and a default."""

    __slots__ = ("reader",)

    def __init__(self, reader: Reader) -> None:
        self.reader = reader

    def __contains__(self, name: str) -> bool:
        return isinstance(self.reader.value, dict) and name in self.reader.value

    def at(self, name: str) -> Reader:
        return self.reader.key(name)

    def get(self, name: str, read: Callable[[Reader], T | None], default: D) -> T | D:
        """The value at `name` read by `read`; `default` when absent or invalid."""
        if name not in self:
            return default
        value = read(self.at(name))
        return default if value is None else value

    def need(self, name: str, read: Callable[[Reader], T | None]) -> T | None:
        """The value at `name` read by `read`; a missing key is a problem."""
        if name not in self:
            self.at(name).error("is required")
            return None
        return read(self.at(name))


def key_path(path: str, name: str) -> str:
    """The path of key `name` under `path`: `backends.llama-v1`, `include["header:x-tier"]`."""
    if not _PLAIN_KEY.fullmatch(name):
        return f"{path}[{name!r}]" if path else repr(name)
    return f"{path}.{name}" if path else name


def _unknown_key(name: str, allowed: Collection[str]) -> str:
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    if close:
        return f"unknown key {name!r} (did you mean {close[0]!r}?)"
    return f"unknown key {name!r} (expected one of: {', '.join(allowed)})"
