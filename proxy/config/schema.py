"""A JSON Schema of the config file, generated from the config model (`canary-proxy schema`).

Editors that speak JSON Schema (the YAML language server: VS Code, Neovim, JetBrains)
complete keys, show defaults and flag typos with it. The parser stays the judge: the
schema catches the shape (keys, types, enums, duration and address syntax), the parser
also what a schema cannot say (steps increase, a backend named by a route exists).

Rules:
1. Every record of `proxy.config.model` becomes an object with exactly its keys; a
   field's key is its name, without the `_s` of a duration (`interval_s` -> `interval`,
   a duration). The types, enums, defaults and required keys come from the records.
2. What the file writes differently from the record is declared once, in `_FIELDS`
   (a field that is no key, a shape of its own) and `_TYPES` (records written as one
   string: a listen address, a key source, a time window, a network).
3. Any scalar may be a `${VAR}` reference instead (`proxy.config.interpolate`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
import typing
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Final

from proxy.config import model
from proxy.config.model import (
    AdminConfig,
    AutoRollout,
    Backend,
    Cohort,
    Config,
    KeySource,
    ListenAddress,
    Rollout,
    Route,
    Sticky,
    TimeWindow,
    Webhook,
)

__all__ = ["SCHEMA_ID", "config_schema"]

SCHEMA_ID: Final = "urn:canary-proxy:config"
Schema = dict[str, Any]

_REFERENCE: Final[Schema] = {"type": "string", "pattern": r"\$\{"}
_DURATION: Final[Schema] = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*(\d+(\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$"},
        _REFERENCE,
    ],
    "description": 'a duration: "250ms", "2s", "5m", "1h" or a number of seconds',
}
_PERCENT: Final[Schema] = {
    "anyOf": [{"type": "number", "minimum": 0, "maximum": 100}, _REFERENCE],
    "description": "a percent, 0-100, at most two decimals",
}
_NAME_PATTERN: Final = r"^[A-Za-z0-9._-]+$"
_KEY_SOURCE: Final[Schema] = {
    "type": "string",
    "pattern": r"^((header|body|cookie|query):.+|auth|ip)$",
    "description": "header:NAME, body:FIELD, cookie:NAME, query:NAME, auth or ip",
}
_STRINGS: Final[Schema] = {"type": "array", "items": {"type": "string"}}

# Records the file writes as one string.
_TYPES: Final[Mapping[type, Schema]] = {
    ListenAddress: {
        "type": "string",
        "pattern": r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.*-]+):\d{1,5}$",
        "description": "host:port like 0.0.0.0:8080 or [::1]:8080; port 0: any free port",
    },
    KeySource: _KEY_SOURCE,
    TimeWindow: {"type": "string", "description": 'days and hours, like "Mon-Fri 09:00-18:00"'},
    ipaddress.IPv4Network: {"type": "string", "description": "an IP address or CIDR"},
    ipaddress.IPv6Network: {"type": "string", "description": "an IP address or CIDR"},
}


@dataclasses.dataclass(frozen=True, slots=True)
class _Key:
    """How a field of a record is written in the file, where rule 1 does not say it."""

    schema: Schema | None = None  # replaces the one from the field's type
    required: bool | None = None  # None: required when the field has no default


_NOT_A_KEY: Final = None  # derived, secret or bookkeeping: not in the file
_FIELDS: Final[Mapping[tuple[type, str], _Key | None]] = {
    (Config, "version"): _NOT_A_KEY,
    (Config, "fleet_version"): _NOT_A_KEY,
    (Config, "source"): _NOT_A_KEY,
    (Config, "warnings"): _NOT_A_KEY,
    (AdminConfig, "token"): _NOT_A_KEY,
    (Backend, "name"): _NOT_A_KEY,
    (Backend, "origin"): _NOT_A_KEY,
    (Backend, "base_path"): _NOT_A_KEY,
    (Backend, "api_key"): _NOT_A_KEY,
    (Route, "match"): _Key(required=False),
    (Route, "sticky"): _Key(required=False),
    (Sticky, "keys"): _Key(required=False),
    (Sticky, "salt"): _Key(required=False),
    (Cohort, "include"): _Key(
        {"type": "object", "propertyNames": _KEY_SOURCE, "additionalProperties": _STRINGS}
    ),
    (Cohort, "exclude"): _Key(
        {"type": "object", "propertyNames": _KEY_SOURCE, "additionalProperties": _STRINGS}
    ),
    (Rollout, "weight"): _Key(_PERCENT),
    (AutoRollout, "step_pauses_s"): _NOT_A_KEY,  # written inside `steps`
    (AutoRollout, "ab_duration_s"): _NOT_A_KEY,  # written as `rollout.ab`
    (Webhook, "url"): _Key(required=False),  # or url_env
}
# Fields whose shape is declared here, not derived: they are keys all the same.
_SHAPES: Final[Mapping[tuple[type, str], Schema]] = {
    (Config, "routes"): {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/Route"}},
    (AutoRollout, "steps"): {
        "type": "array",
        "minItems": 1,
        "items": {
            "anyOf": [
                _PERCENT,
                {
                    "type": "object",
                    "properties": {"weight": _PERCENT, "pause": _DURATION},
                    "required": ["weight"],
                    "additionalProperties": False,
                },
            ]
        },
        "description": "increasing percents in (0, 100]; {weight: W, pause: D} holds at W for D",
    },
}


def config_schema() -> Schema:
    """The JSON Schema (draft 2020-12) of a config file."""
    defs: dict[str, Schema] = {}
    root = _record(Config, defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "canary-proxy config",
        **root,
        "$defs": dict(sorted(defs.items())),
    }


def _record(cls: type, defs: dict[str, Schema]) -> Schema:
    hints = typing.get_type_hints(cls, vars(model))
    properties: dict[str, Schema] = {}
    required: list[str] = []
    for item in dataclasses.fields(cls):
        where = (cls, item.name)
        override = _FIELDS.get(where, _Key())
        if override is None:
            continue
        if where in _SHAPES:
            _of_type(hints[item.name], defs)  # the records it refers to, into `defs`
            key, schema = item.name, dict(_SHAPES[where])
        else:
            key, schema = _key_and_schema(item.name, hints[item.name], override, defs)
        default = _default(item, key != item.name)
        if default is not None:
            schema["default"] = default
        has_default = not (
            item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        )
        if override.required if override.required is not None else not has_default:
            required.append(key)
        properties[key] = schema
    record: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        record["required"] = required
    return record


def _key_and_schema(
    name: str, hint: object, override: _Key, defs: dict[str, Schema]
) -> tuple[str, Schema]:
    if name.endswith("_s"):
        return name.removesuffix("_s"), dict(override.schema or _DURATION)
    return name, dict(override.schema or _of_type(hint, defs))


def _of_type(hint: object, defs: dict[str, Schema]) -> Schema:
    """The schema of a value of type `hint`, with every scalar open to a `${VAR}`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        options = [_of_type(arg, defs) for arg in args if arg is not type(None)]
        unique = [o for i, o in enumerate(options) if o not in options[:i]]
        return unique[0] if len(unique) == 1 else {"anyOf": unique}
    if origin in (tuple, frozenset):
        return {"type": "array", "items": _of_type(args[0], defs)}
    if origin is Mapping:
        key_type, value_type = args
        if isinstance(key_type, type) and issubclass(key_type, StrEnum):
            value = _of_type(value_type, defs)
            return {
                "type": "object",
                "properties": {member.value: value for member in key_type},
                "additionalProperties": False,
            }
        return {
            "type": "object",
            "propertyNames": {"pattern": _NAME_PATTERN},
            "additionalProperties": _of_type(value_type, defs),
        }
    if not isinstance(hint, type):
        raise TypeError(f"no schema for the type {hint!r}")
    if hint in _TYPES:
        return {"anyOf": [_TYPES[hint], _REFERENCE]}
    if issubclass(hint, StrEnum):
        return {"anyOf": [{"enum": [member.value for member in hint]}, _REFERENCE]}
    if hint is bool:
        return {"anyOf": [{"type": "boolean"}, _REFERENCE]}
    if hint is int:
        return {"anyOf": [{"type": "integer"}, _REFERENCE]}
    if hint is float:
        return {"anyOf": [{"type": "number"}, _REFERENCE]}
    if hint is str:
        return {"type": "string"}
    if dataclasses.is_dataclass(hint):
        if hint.__name__ not in defs:
            defs[hint.__name__] = {}  # a placeholder against recursion
            defs[hint.__name__] = _record(hint, defs)
        return {"$ref": f"#/$defs/{hint.__name__}"}
    raise TypeError(f"no schema for the type {hint!r}")


def _default(item: dataclasses.Field[Any], duration: bool) -> object:
    """The field's default as the file would write it; None when it has none to show."""
    value = item.default
    if value is dataclasses.MISSING or value is None:
        return None
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, ListenAddress):
        return str(value)
    if isinstance(value, bool) or (isinstance(value, str) and value):
        return value
    if isinstance(value, int | float):
        return int(value) if duration and float(value).is_integer() else value
    return None
