"""Reading the `routes` section of the config (SPEC §3) into `Route` records.

Rules:
1. Route names are unique; `stable` and `canary` name backends of the same file
   (they may name the same one, told apart by `model_rewrite`).
2. Cohorts select on any key source but `auth`: its values would be API keys,
   and secrets never appear in the file.
3. The string grammars (key sources, schedule windows) live in
   `proxy.config.grammar`, the `rollout` section in `proxy.config.rollout`, and
   `notify` (which reads secrets from the environment) in `proxy.config.parse`.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable, Collection
from types import MappingProxyType

from proxy.config.grammar import is_http_token, is_name, parse_key_source, parse_window
from proxy.config.model import (
    Anonymous,
    Cohort,
    CohortRule,
    KeyKind,
    KeySource,
    Match,
    Rollout,
    Route,
    Schedule,
    ScheduleMode,
    Sticky,
    TimeWindow,
    Variant,
    Webhook,
)
from proxy.config.reader import Reader
from proxy.config.rollout import read_rollout

__all__ = ["DEFAULT_STICKY_KEYS", "read_routes"]

DEFAULT_STICKY_KEYS = (
    KeySource(KeyKind.HEADER, "x-user-id"),
    KeySource(KeyKind.BODY, "user"),
    KeySource(KeyKind.AUTH),
)
ROUTE_KEYS = (
    "name",
    "match",
    "stable",
    "canary",
    "model_rewrite",
    "sticky",
    "override_header",
    "cohort",
    "schedule",
    "fallback_to_stable",
    "rollout",
    "notify",
)


NotifyReader = Callable[[Reader], tuple[Webhook, ...] | None]  # a route's `notify`


def read_routes(
    reader: Reader,
    backend_names: Collection[str] | None,
    read_notify: NotifyReader,
) -> tuple[Route, ...]:
    """Every valid route in the list; problems (duplicate names too) go to `reader`.

    `backend_names` is None when the backends section is itself broken, so stable
    and canary are not checked against it (one mistake, one message).
    """
    items = reader.items()
    if items is None:
        return ()
    routes: list[Route] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(items):
        route = _read_route(item, backend_names, read_notify)
        name = item.value.get("name") if isinstance(item.value, dict) else None
        if isinstance(name, str) and name in first_index:
            item.key("name").error(
                f"duplicate route name {name!r} (also routes[{first_index[name]}])"
            )
        elif isinstance(name, str):
            first_index[name] = index
        if route is not None:
            routes.append(route)
    return tuple(routes)


# -- one route ---------------------------------------------------------------------------


def _read_route(
    reader: Reader, backend_names: Collection[str] | None, read_notify: NotifyReader
) -> Route | None:
    fields = reader.fields(ROUTE_KEYS)
    if fields is None:
        return None
    name = fields.need("name", _read_name)
    stable = fields.need("stable", lambda r: _read_backend_ref(r, backend_names))
    canary = fields.need("canary", lambda r: _read_backend_ref(r, backend_names))
    sticky = fields.get("sticky", lambda r: _read_sticky(r, name or ""), None)
    route = Route(
        name=name or "",
        match=fields.get("match", _read_match, Match()),
        stable=stable or "",
        canary=canary or "",
        sticky=sticky or Sticky(keys=DEFAULT_STICKY_KEYS, salt=name or ""),
        model_rewrite=fields.get("model_rewrite", _read_model_rewrite, MappingProxyType({})),
        override_header=fields.get("override_header", _read_header_name, None),
        cohort=fields.get("cohort", _read_cohort, None),
        schedule=fields.get("schedule", _read_schedule, None),
        fallback_to_stable=fields.get("fallback_to_stable", Reader.boolean, False),
        rollout=fields.get("rollout", read_rollout, Rollout()),
        notify=fields.get("notify", read_notify, ()),
    )
    return route if name and stable and canary else None


def _read_name(reader: Reader) -> str | None:
    name = reader.string()
    if name is not None and not is_name(name):
        reader.error(f"must use only letters, digits, '.', '_' and '-', got {name!r}")
        return None
    return name


def _read_backend_ref(reader: Reader, backend_names: Collection[str] | None) -> str | None:
    name = reader.string()
    if name is None or backend_names is None or name in backend_names:
        return name
    reader.error(f"unknown backend {name!r} (backends: {', '.join(backend_names)})")
    return None


def _read_match(reader: Reader) -> Match | None:
    fields = reader.fields(("path_prefix", "models"))
    if fields is None:
        return None
    return Match(
        path_prefix=fields.get("path_prefix", _read_path_prefix, "/"),
        models=fields.get("models", _read_string_set, None),
    )


def _read_path_prefix(reader: Reader) -> str | None:
    prefix = reader.string()
    if prefix is not None and not prefix.startswith("/"):
        reader.error(f'must start with "/", got {prefix!r}')
        return None
    return prefix


def _read_string_set(reader: Reader) -> frozenset[str] | None:
    items = reader.items()
    if items is None:
        return None
    values = [item.string() for item in items]
    return frozenset(v for v in values if v is not None) if None not in values else None


def _read_model_rewrite(reader: Reader) -> MappingProxyType[Variant, str] | None:
    fields = reader.fields([str(variant) for variant in Variant])
    if fields is None:
        return None
    rewrite = {
        variant: fields.get(str(variant), Reader.string, "")
        for variant in Variant
        if str(variant) in fields
    }
    return MappingProxyType({variant: model for variant, model in rewrite.items() if model})


def _read_header_name(reader: Reader) -> str | None:
    name = reader.string()
    if name is not None and not is_http_token(name):
        reader.error(f"must be an HTTP header name like x-canary, got {name!r}")
        return None
    return None if name is None else name.lower()


# -- sticky and cohort -------------------------------------------------------------------


def _read_sticky(reader: Reader, route_name: str) -> Sticky | None:
    fields = reader.fields(("keys", "salt", "anonymous"))
    if fields is None:
        return None
    return Sticky(
        keys=fields.get("keys", _read_key_sources, DEFAULT_STICKY_KEYS),
        salt=fields.get("salt", Reader.string, route_name),
        anonymous=fields.get("anonymous", lambda r: r.choice(Anonymous), Anonymous.RANDOM),
    )


def _read_key_sources(reader: Reader) -> tuple[KeySource, ...] | None:
    items = reader.items()
    if items is None:
        return None
    sources: list[KeySource] = []
    for item in items:
        source = _read_key_source(item)
        if source is not None and source in sources:
            item.error(f"duplicate key source {source.spec!r}")
        elif source is not None:
            sources.append(source)
    return tuple(sources) if len(sources) == len(items) else None


def _read_key_source(reader: Reader) -> KeySource | None:
    text = reader.string()
    if text is None:
        return None
    try:
        return parse_key_source(text)
    except ValueError as exc:
        reader.error(str(exc))
        return None


def _read_cohort(reader: Reader) -> Cohort | None:
    fields = reader.fields(("include", "exclude"))
    if fields is None:
        return None
    if "include" not in fields and "exclude" not in fields:
        reader.error("needs include, exclude or both")
        return None
    return Cohort(
        include=fields.get("include", _read_cohort_rules, ()),
        exclude=fields.get("exclude", _read_cohort_rules, ()),
    )


def _read_cohort_rules(reader: Reader) -> tuple[CohortRule, ...] | None:
    entries = reader.entries()
    if entries is None:
        return None
    rules: list[CohortRule] = []
    for spec, child in entries:
        source = _cohort_source(child, spec)
        values = _read_string_set(child)
        if source is not None and values is not None:
            rules.append(CohortRule(source, values))
    return tuple(rules)


def _cohort_source(reader: Reader, spec: str) -> KeySource | None:
    try:
        source = parse_key_source(spec)
    except ValueError as exc:
        reader.error(str(exc))
        return None
    if source.kind is KeyKind.AUTH:
        # Its values would be API keys, and secrets never appear in the file (SPEC §3).
        reader.error("auth cannot select a cohort: its values would be API keys in the file")
        return None
    return source


# -- schedule ----------------------------------------------------------------------------


def _read_schedule(reader: Reader) -> Schedule | None:
    fields = reader.fields(("timezone", "windows", "mode"))
    if fields is None:
        return None
    timezone = fields.need("timezone", _read_timezone)
    windows = fields.need("windows", _read_windows)
    mode = fields.get("mode", lambda r: r.choice(ScheduleMode), ScheduleMode.ADVANCE)
    if timezone is None or windows is None:
        return None
    return Schedule(timezone, windows, mode)


def _read_timezone(reader: Reader) -> str | None:
    name = reader.string()
    if name is None:
        return None
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        reader.error(f"unknown time zone {name!r} (expected an IANA name like UTC or Europe/Paris)")
        return None
    return name


def _read_windows(reader: Reader) -> tuple[TimeWindow, ...] | None:
    items = reader.items()
    if items is None:
        return None
    windows = [_read_window(item) for item in items]
    return tuple(w for w in windows if w is not None) if None not in windows else None


def _read_window(reader: Reader) -> TimeWindow | None:
    text = reader.string()
    if text is None:
        return None
    try:
        return parse_window(text)
    except ValueError as exc:
        reader.error(str(exc))
        return None
