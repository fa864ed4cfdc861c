"""Turning YAML text into a validated, frozen `Config` (SPEC §3), or every reason it is not one.

Rules:
1. A file is accepted whole or rejected whole: `ConfigError.problems` holds every
   problem found, one line each, `path: message`
   (`routes[0].rollout.auto.steps: must increase, got 5 after 10`).
2. Unknown keys are errors, and so are duplicate keys, which YAML itself would
   silently resolve to the last one.
3. Secrets are read from the environment only: the file names the variable
   (`api_key_env`, `token_env`). What an unset variable means is the caller's
   `EnvSecrets` policy: to serve (`REQUIRE`) it is an error, so a backend never goes
   out without its key and an admin port never half-secured; to check a file where
   production secrets do not exist (`WARN`) it is a warning in `Config.warnings`; to
   compute assignments or simulate (`IGNORE`) it is nothing at all.
4. `Config.version` is the first 12 hex digits of the SHA-256 of the file's bytes;
   `Config.fleet_version` the hash of the settings a fleet shares (`proxy.config.fleet`).
5. Mappings in the result are read-only (`types.MappingProxyType`).
6. `${VAR}` and `${VAR:-default}` in values come from the same environment
   (`proxy.config.interpolate`); `Config.version` stays the hash of the file's bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from urllib.parse import SplitResult, urlsplit

from proxy.config.fleet import fleet_version, shared_settings
from proxy.config.grammar import is_name, parse_key_source
from proxy.config.model import (
    AdminConfig,
    Backend,
    BackendApi,
    Config,
    Limits,
    LogFormat,
    Network,
    OtlpProtocol,
    StateConfig,
    StateStoreKind,
    TelemetryConfig,
    Timeouts,
    Webhook,
    WebhookFormat,
)
from proxy.config.reader import Reader
from proxy.config.routes import read_routes
from proxy.config.yaml_tree import load_yaml
from proxy.errors import ConfigError

__all__ = ["EnvSecrets", "content_version", "load_config", "parse_config", "parse_key_source"]

TOP_KEYS = (
    "listen",
    "admin",
    "limits",
    "trusted_proxies",
    "shutdown_grace",
    "backends",
    "routes",
    "telemetry",
    "state",
)
BACKEND_KEYS = ("url", "api", "api_key_env", "timeouts", "max_connections")
WEBHOOK_KEYS = ("url", "url_env", "format", "timeout", "retries", "backoff")
DEFAULT_PORTS = {"http": 80, "https": 443}
REDIS_SCHEMES = ("redis", "rediss", "unix")
VERSION_HEX_DIGITS = 12

_DEFAULT_CONFIG = Config(backends=MappingProxyType({}), routes=())
_DEFAULT_BACKEND = Backend(name="", url="", origin="", base_path="")
_ANY_HOST = ("0.0.0.0", "::", "*")


class EnvSecrets(Enum):
    """What a secret's environment variable that is unset or empty means (rule 3)."""

    REQUIRE = "require"  # an error: `run`, `check --env`
    WARN = "warn"  # a warning in Config.warnings: `check`
    IGNORE = "ignore"  # nothing: `assign`, `simulate`, which never use a secret


@dataclass(slots=True)
class _Environment:
    """Where secrets come from, what an unset one means, and the warnings it gave."""

    environ: Mapping[str, str]
    policy: EnvSecrets
    warnings: list[str] = field(default_factory=list)


def content_version(data: bytes) -> str:
    """The version of a config: the first 12 hex digits of the SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()[:VERSION_HEX_DIGITS]


def load_config(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    secrets: EnvSecrets = EnvSecrets.REQUIRE,
) -> Config:
    """Read and validate the config file at `path`.

    Raises:
        ConfigError: the file cannot be read, or is not a valid config; every
            problem is listed.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise ConfigError(f"{os.fspath(path)}: cannot read the config file: {reason}") from exc
    return parse_config(data, source=os.fspath(path), environ=environ, secrets=secrets)


def parse_config(
    text: str | bytes,
    *,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    secrets: EnvSecrets = EnvSecrets.REQUIRE,
) -> Config:
    """Validate a whole config given as YAML text; secrets come from `environ`.

    Args:
        text: the file's content; `Config.version` is the hash of its bytes
            (a str is hashed as UTF-8).
        source: where it came from, kept in `Config.source` for messages.
        environ: the environment to read `*_env` variables from (default `os.environ`).
        secrets: what a named variable that is unset or empty means (rule 3).

    Raises:
        ConfigError: with every problem found, each `path: message`.
    """
    data = text.encode() if isinstance(text, str) else text
    version = content_version(data)
    env = _Environment(os.environ if environ is None else environ, secrets)
    tree, problems = load_yaml(data, env.environ)
    root = Reader(tree, problems=list(problems))
    config = _read_config(root, env)
    if root.problems or config is None:
        raise ConfigError(_one_per_path(problems, root.problems[len(problems) :]))
    return dataclasses.replace(
        config,
        version=version,
        fleet_version=fleet_version(shared_settings(config)),
        source=source,
        warnings=tuple(env.warnings),
    )


def _one_per_path(first: list[str], then: list[str]) -> list[str]:
    """`first` (the file's own: duplicate keys, unset variables), then each of `then` at
    a path none of them names: an unset `${PORT}` is one problem, not also a bad port."""
    named = {problem.partition(": ")[0] for problem in first}
    return first + [problem for problem in then if problem.partition(": ")[0] not in named]


# -- top level ---------------------------------------------------------------------------


def _read_config(root: Reader, env: _Environment) -> Config | None:
    if root.value is None:
        root.error("is empty (a config needs at least backends and routes)")
        return None
    fields = root.fields(TOP_KEYS, required=("backends", "routes"))
    if fields is None:
        return None
    listen = fields.get("listen", Reader.listen, _DEFAULT_CONFIG.listen)
    admin = fields.get("admin", lambda r: _read_admin(r, env), AdminConfig())
    limits = fields.get("limits", _read_limits, Limits())
    trusted_proxies = fields.get("trusted_proxies", _read_networks, ())
    shutdown_grace_s = fields.get(
        "shutdown_grace", lambda r: r.duration(allow_zero=True), _DEFAULT_CONFIG.shutdown_grace_s
    )
    backends = fields.get("backends", lambda r: _read_backends(r, env), {})
    backend_names = _backend_names(fields.at("backends"))
    config = Config(
        backends=MappingProxyType(backends),
        routes=fields.get(
            "routes", lambda r: read_routes(r, backend_names, lambda n: _read_notify(n, env)), ()
        ),
        listen=listen,
        admin=admin,
        limits=limits,
        trusted_proxies=trusted_proxies,
        shutdown_grace_s=shutdown_grace_s,
        telemetry=fields.get("telemetry", _read_telemetry, TelemetryConfig()),
        state=fields.get("state", _read_state, StateConfig()),
    )
    _check_admin_port(fields.at("admin").key("listen"), config)
    return config


def _backend_names(reader: Reader) -> list[str] | None:
    """The names routes may refer to; None when there are none to check against."""
    if not isinstance(reader.value, dict) or not reader.value:
        return None
    return [name for name in reader.value if isinstance(name, str)]


def _check_admin_port(reader: Reader, config: Config) -> None:
    public, admin = config.listen, config.admin.listen
    if public.port == 0 or public.port != admin.port:
        return
    if public.host == admin.host or public.host in _ANY_HOST or admin.host in _ANY_HOST:
        reader.error(f"must differ from listen ({public}): the admin port is never the public port")


def _read_admin(reader: Reader, env: _Environment) -> AdminConfig | None:
    fields = reader.fields(("listen", "token_env"), secret_env="token_env")
    if fields is None:
        return None
    secret = fields.get("token_env", lambda r: _read_secret_env(r, env), None)
    return AdminConfig(
        listen=fields.get("listen", Reader.listen, AdminConfig().listen),
        token_env=None if secret is None else secret[0],
        token=None if secret is None else secret[1],
    )


def _read_secret_env(reader: Reader, env: _Environment) -> tuple[str, str | None] | None:
    """The variable's name and its value; an unset or empty one is as `env.policy` says."""
    name = reader.env_name()
    if name is None:
        return None
    value = env.environ.get(name)
    if value:
        return name, value
    problem = f"environment variable {name} is {'not set' if value is None else 'empty'}"
    if env.policy is EnvSecrets.REQUIRE:
        reader.error(problem)
        return None
    if env.policy is EnvSecrets.WARN:
        env.warnings.append(f"{reader.path}: {problem} (`run` needs it)")
    return name, None


def _read_limits(reader: Reader) -> Limits | None:
    fields = reader.fields(
        ("max_body_bytes", "max_concurrency", "header_timeout", "keepalive_timeout", "feedback_ids")
    )
    if fields is None:
        return None
    defaults = Limits()
    return Limits(
        max_body_bytes=fields.get("max_body_bytes", _read_count, defaults.max_body_bytes),
        max_concurrency=fields.get("max_concurrency", _read_count, defaults.max_concurrency),
        header_timeout_s=fields.get("header_timeout", Reader.duration, defaults.header_timeout_s),
        keepalive_timeout_s=fields.get(
            "keepalive_timeout", Reader.duration, defaults.keepalive_timeout_s
        ),
        feedback_ids=fields.get(
            "feedback_ids", lambda r: r.integer(minimum=0), defaults.feedback_ids
        ),
    )


def _read_count(reader: Reader) -> int | None:
    return reader.integer(minimum=1)


def _read_networks(reader: Reader) -> tuple[Network, ...] | None:
    items = reader.items(non_empty=False)
    if items is None:
        return None
    networks = [_read_network(item) for item in items]
    return tuple(n for n in networks if n is not None) if None not in networks else None


def _read_network(reader: Reader) -> Network | None:
    text = reader.string()
    if text is None:
        return None
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        reader.error(f"must be an IP address or a CIDR like 10.0.0.0/8, got {text!r}")
        return None


# -- backends ----------------------------------------------------------------------------


def _read_backends(reader: Reader, env: _Environment) -> dict[str, Backend]:
    entries = reader.entries()
    if entries is None:
        return {}
    backends: dict[str, Backend] = {}
    for name, child in entries:
        backend = _read_backend(child, name, env)
        if backend is not None:
            backends[name] = backend
    return backends


def _read_backend(reader: Reader, name: str, env: _Environment) -> Backend | None:
    if not is_name(name):
        reader.error(f"backend names use only letters, digits, '.', '_' and '-', got {name!r}")
    fields = reader.fields(BACKEND_KEYS, secret_env="api_key_env")
    if fields is None:
        return None
    url = fields.need("url", _read_backend_url)
    secret = fields.get("api_key_env", lambda r: _read_secret_env(r, env), None)
    timeouts = fields.get("timeouts", _read_timeouts, Timeouts())
    max_connections = fields.get("max_connections", _read_count, _DEFAULT_BACKEND.max_connections)
    api = fields.get("api", lambda r: r.choice(BackendApi), BackendApi.OPENAI)
    if url is None:
        return None
    return Backend(
        name=name,
        url=url[0],
        origin=url[1],
        base_path=url[2],
        api_key_env=None if secret is None else secret[0],
        api_key=None if secret is None else secret[1],
        timeouts=timeouts,
        max_connections=max_connections,
        api=api,
    )


def _read_backend_url(reader: Reader) -> tuple[str, str, str] | None:
    """The url without a trailing slash, its origin (`scheme://host:port`) and base path."""
    parts = _read_http_url(reader)
    if parts is None:
        return None
    if parts.query or parts.fragment:
        reader.error(f"must not have a query or a fragment, got {parts.geturl()!r}")
        return None
    if parts.port == 0:
        reader.error(f"must have a port from 1 to 65535, got {parts.geturl()!r}")
        return None
    host = parts.hostname or ""
    shown_host = f"[{host}]" if ":" in host else host
    port = parts.port or DEFAULT_PORTS[parts.scheme.lower()]
    origin = f"{parts.scheme.lower()}://{shown_host}:{port}"
    return parts.geturl().rstrip("/"), origin, parts.path.rstrip("/")


def _read_http_url(reader: Reader) -> SplitResult | None:
    text = reader.string()
    if text is None:
        return None
    parts = _split_url(reader, text)
    if parts is None:
        return None
    if parts.scheme.lower() not in DEFAULT_PORTS:
        reader.error(f"must start with http:// or https://, got {text!r}")
        return None
    if not parts.hostname:
        reader.error(f"must name a host, like http://10.0.0.1:8000, got {text!r}")
        return None
    return parts


def _split_url(reader: Reader, text: str) -> SplitResult | None:
    """The URL split up, with no credentials in it, and a port that is a port."""
    try:
        if any(c.isspace() for c in text):
            raise ValueError("spaces")
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError when it is out of range or not a number
    except ValueError:
        reader.error(f"must be a URL, got {text!r}")
        return None
    if parts.username is not None or parts.password is not None:
        reader.error("must not carry credentials: secrets are not allowed in the config file")
        return None
    return parts


def _read_notify(reader: Reader, env: _Environment) -> tuple[Webhook, ...] | None:
    items = reader.items()
    if items is None:
        return None
    hooks = [_read_webhook(item, env) for item in items]
    return tuple(hook for hook in hooks if hook is not None) if None not in hooks else None


def _read_webhook(reader: Reader, env: _Environment) -> Webhook | None:
    fields = reader.fields(WEBHOOK_KEYS, secret_env="url_env")
    if fields is None:
        return None
    if ("url" in fields) == ("url_env" in fields):
        reader.error("needs url or url_env (a variable holding the URL), one of them")
        return None
    defaults = Webhook()
    url = fields.get("url", _read_http_url, None)
    secret = fields.get("url_env", lambda r: _read_secret_env(r, env), None)
    if secret is not None and secret[1] is not None and not _is_http_url(secret[1]):
        # Its value is a secret: the message names the variable only.
        fields.at("url_env").error(
            f"environment variable {secret[0]} must hold an http:// or https:// URL"
        )
        return None
    hook = Webhook(
        url=url.geturl() if url is not None else (secret[1] or "") if secret else "",
        url_env=secret[0] if secret is not None else None,
        format=fields.get("format", lambda r: r.choice(WebhookFormat), defaults.format),
        timeout_s=fields.get("timeout", Reader.duration, defaults.timeout_s),
        retries=fields.get("retries", lambda r: r.integer(minimum=0), defaults.retries),
        backoff_s=fields.get("backoff", lambda r: r.duration(allow_zero=True), defaults.backoff_s),
    )
    return hook if url is not None or secret is not None else None


def _is_http_url(text: str) -> bool:
    try:
        parts = urlsplit(text)
    except ValueError:
        return False
    return parts.scheme.lower() in DEFAULT_PORTS and bool(parts.hostname)


def _read_timeouts(reader: Reader) -> Timeouts | None:
    fields = reader.fields(("connect", "first_byte", "idle", "pool", "upgrade_idle"))
    if fields is None:
        return None
    defaults = Timeouts()
    return Timeouts(
        connect_s=fields.get("connect", Reader.duration, defaults.connect_s),
        first_byte_s=fields.get("first_byte", Reader.duration, defaults.first_byte_s),
        idle_s=fields.get("idle", Reader.duration, defaults.idle_s),
        pool_s=fields.get("pool", Reader.duration, defaults.pool_s),
        upgrade_idle_s=fields.get("upgrade_idle", Reader.duration, defaults.upgrade_idle_s),
    )


# -- telemetry and state -----------------------------------------------------------------


def _read_telemetry(reader: Reader) -> TelemetryConfig | None:
    keys = (
        "service_name",
        "otlp_endpoint",
        "otlp_protocol",
        "trace_sample_ratio",
        "prometheus",
        "log_format",
        "access_log",
    )
    fields = reader.fields(keys)
    if fields is None:
        return None
    defaults = TelemetryConfig()
    endpoint = fields.get("otlp_endpoint", _read_http_url, None)
    return TelemetryConfig(
        service_name=fields.get("service_name", Reader.string, None),
        otlp_endpoint=None if endpoint is None else endpoint.geturl(),
        otlp_protocol=fields.get("otlp_protocol", lambda r: r.choice(OtlpProtocol), None),
        trace_sample_ratio=fields.get(
            "trace_sample_ratio", lambda r: r.number(minimum=0.0, maximum=1.0), None
        ),
        prometheus=fields.get("prometheus", Reader.boolean, defaults.prometheus),
        log_format=fields.get("log_format", lambda r: r.choice(LogFormat), defaults.log_format),
        access_log=fields.get(
            "access_log", lambda r: r.number(minimum=0.0, maximum=1.0), defaults.access_log
        ),
    )


def _read_state(reader: Reader) -> StateConfig | None:
    fields = reader.fields(("store", "path", "url", "cluster"))
    if fields is None:
        return None
    defaults = StateConfig()
    store = fields.get("store", lambda r: r.choice(StateStoreKind), defaults.store)
    url = fields.get("url", _read_redis_url, None)
    cluster = fields.get("cluster", Reader.boolean, defaults.cluster)
    if store is StateStoreKind.REDIS and "url" not in fields:
        reader.key("url").error("required when state.store is redis")
    for name in ("url", "cluster"):
        if store is not StateStoreKind.REDIS and name in fields:
            reader.key(name).error(f"only used when state.store is redis (store is {store})")
    if cluster and url is not None:
        # What a cluster client cannot do: a cluster is reached over TCP, and has
        # database 0 only.
        parts = urlsplit(url)
        if parts.scheme.lower() == "unix":
            reader.key("url").error("must be redis:// or rediss:// when state.cluster is true")
        elif parts.path.strip("/") not in ("", "0"):
            reader.key("url").error(
                f"must name database 0 when state.cluster is true (a cluster has no "
                f"other), got {parts.path!r}"
            )
    return StateConfig(
        store=store,
        path=fields.get("path", Reader.string, defaults.path),
        url=url,
        cluster=cluster,
    )


def _read_redis_url(reader: Reader) -> str | None:
    text = reader.string()
    if text is None:
        return None
    parts = _split_url(reader, text)
    if parts is None:
        return None
    if parts.scheme.lower() not in REDIS_SCHEMES:
        reader.error(f"must start with redis://, rediss:// or unix://, got {text!r}")
        return None
    return text
