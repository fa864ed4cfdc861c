"""What a fleet of processes must agree on, and where two of them disagree.

Workers and replicas that share a state store act as one: one controller judges the
stats of them all and moves one weight. That is sound only while they serve the same
routes to the same backends under the same rollout. It does not need them to share a
file: two replicas on one host listen on different ports, and a file's comments and
key order mean nothing. So the fleet compares *shared settings*, not file hashes.

Rules:
1. Shared: every backend (url, the *name* of its key's variable, timeouts, connection
   cap), every route (match, variants, sticky, cohort, schedule, fallback, rollout)
   and the order of the routes (first match wins), and the state store itself.
2. Per process, never compared: `listen`, `admin`, `limits`, `trusted_proxies`,
   `shutdown_grace`, `telemetry`, a route's `notify` (webhooks hold back no step, and
   their URLs may be secret), secret values, comments, formatting.
3. The settings are flat: a path as `check` names it (`routes.chat.rollout.auto.steps`)
   to a JSON value. Lists are one value each, so a list that changed is named whole.
4. `fleet_version` is the first 12 hex digits of the SHA-256 of the settings as sorted
   JSON: equal settings, equal version, whatever the file looks like.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from proxy.config.model import Backend, Config, KeySource, Route, StateStoreKind, TimeWindow
from proxy.config.reader import key_path

__all__ = ["Disagreement", "disagreements", "explain", "fleet_version", "shared_settings"]

VERSION_HEX_DIGITS: Final = 12
SHOWN_PATHS: Final = 3  # a disagreement over more paths names this many, then a count

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]
Settings = Mapping[str, JsonValue]

_BACKEND_SECRETS: Final = frozenset({"api_key"})
_BACKEND_DERIVED: Final = frozenset({"name", "origin", "base_path"})  # all from url or the key
_ROUTE_PER_PROCESS: Final = frozenset({"name", "notify"})  # the name is the path


@dataclass(frozen=True, slots=True)
class Disagreement:
    """One setting that the live processes do not share: each value, and who has it."""

    path: str
    values: tuple[tuple[str, tuple[str, ...]], ...]  # (value as JSON, sources), most common first


def shared_settings(config: Config) -> dict[str, JsonValue]:
    """The settings the fleet shares (rule 1), flat (rule 3)."""
    settings: dict[str, JsonValue] = {}
    for name, backend in config.backends.items():
        _flatten(key_path("backends", name), _backend(backend), settings)
    settings["routes"] = [route.name for route in config.routes]
    for route in config.routes:
        _flatten(key_path("routes", route.name), _route(route), settings)
    state = config.state
    settings["state.store"] = state.store.value
    if state.store is StateStoreKind.REDIS:
        settings["state.url"] = state.url
        settings["state.cluster"] = state.cluster
    else:
        settings["state.path"] = state.path
    return settings


def fleet_version(settings: Settings) -> str:
    """The hash of the shared settings (rule 4)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:VERSION_HEX_DIGITS]


def disagreements(processes: Sequence[tuple[str, Settings]]) -> list[Disagreement]:
    """Every path whose value is not the same in all of `processes` ((source, settings)).

    A path one process has and another lacks (a route only one of them serves) is a
    disagreement too; its value there is shown as `absent`.
    """
    paths = sorted({path for _, settings in processes for path in settings})
    found: list[Disagreement] = []
    for path in paths:
        holders: dict[str, list[str]] = {}
        for source, settings in processes:
            shown = json.dumps(settings[path]) if path in settings else "absent"
            holders.setdefault(shown, []).append(source)
        if len(holders) > 1:
            ranked = sorted(holders.items(), key=lambda item: (-len(item[1]), item[0]))
            found.append(Disagreement(path, tuple((v, tuple(s)) for v, s in ranked)))
    return found


def explain(found: Sequence[Disagreement]) -> str:
    """One line naming what differs: `routes.x.rollout.auto.steps ([1, 5] on a; [1, 10] on b)`."""
    parts = []
    for disagreement in found[:SHOWN_PATHS]:
        values = "; ".join(
            f"{value} on {', '.join(sources)}" for value, sources in disagreement.values
        )
        parts.append(f"{disagreement.path} ({values})")
    more = len(found) - SHOWN_PATHS
    return ", ".join(parts) + (f" and {more} more setting{'s' * (more > 1)}" if more > 0 else "")


# -- the JSON form of the records ---------------------------------------------------------


def _backend(backend: Backend) -> dict[str, JsonValue]:
    skip = _BACKEND_SECRETS | _BACKEND_DERIVED
    return {
        _config_key(field.name): _plain(getattr(backend, field.name))
        for field in dataclasses.fields(backend)
        if field.name not in skip
    }


def _route(route: Route) -> dict[str, JsonValue]:
    return {
        _config_key(field.name): _plain(getattr(route, field.name))
        for field in dataclasses.fields(route)
        if field.name not in _ROUTE_PER_PROCESS
    }


def _config_key(field_name: str) -> str:
    """The key a record's field is written as in the file: durations lose their `_s`."""
    return field_name.removesuffix("_s")


def _plain(value: object) -> JsonValue:
    """A config value as JSON: records as mappings, sets sorted, grammar values as written."""
    if isinstance(value, KeySource):
        return value.spec
    if isinstance(value, TimeWindow):
        return value.text
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            _config_key(field.name): _plain(getattr(value, field.name))
            for field in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {str(_plain(key)): _plain(item) for key, item in value.items()}
    if isinstance(value, frozenset | set):
        return sorted((_plain(item) for item in value), key=json.dumps)
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"no JSON form for a config value of type {type(value).__name__}")


def _flatten(path: str, value: JsonValue, into: dict[str, JsonValue]) -> None:
    """Mappings open into their keys' paths; everything else is one value (rule 3)."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(key_path(path, key), item, into)
    else:
        into[path] = value
