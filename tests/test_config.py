"""Tests for `proxy.config`: the example, the defaults, every rule's failure, and its messages."""

from __future__ import annotations

import hashlib
import ipaddress
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import (
    Anonymous,
    Config,
    ConfigError,
    KeyKind,
    KeySource,
    ListenAddress,
    OnFailure,
    ScheduleMode,
    StateStoreKind,
    Variant,
    WebhookFormat,
    load_config,
    parse_config,
    parse_key_source,
    summarize,
)
from proxy.config.grammar import parse_duration, parse_window
from proxy.config.model import ErrorRateCheck, LatencyCheck, RatioCheck

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "example.yaml"
V1_KEY = "sk-test-0123456789abcdefSECRET"
ADMIN_TOKEN = "admin-token-0123456789SECRET"
ENV = {"V1_API_KEY": V1_KEY, "CANARY_ADMIN_TOKEN": ADMIN_TOKEN, "EMPTY_VAR": ""}

BACKENDS = """\
backends:
  v1: {url: "http://10.0.0.1:8000"}
  v2: {url: "http://10.0.0.2:8000"}
"""


def config(
    top: str = "",
    *,
    route: str = "",
    backend: str = "",
    stable: str = "v1",
    canary: str = "v2",
) -> str:
    """A valid config, plus `top` level lines, lines under routes[0] and a backend `x`."""
    extra_backend = f"  x:\n{textwrap.indent(backend, '    ')}\n" if backend else ""
    head = f"routes:\n  - name: chat\n    stable: {stable}\n    canary: {canary}\n"
    return BACKENDS + extra_backend + head + textwrap.indent(route, "    ") + "\n" + top


def problems_of(text: str | bytes, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ=ENV if environ is None else environ)
    return caught.value.problems


# -- the example and the defaults ------------------------------------------------------


def test_example_parses_and_keeps_every_value() -> None:
    cfg = load_config(EXAMPLE, environ=ENV)
    assert cfg.source == str(EXAMPLE)
    assert cfg.listen == ListenAddress("0.0.0.0", 8080)
    assert cfg.admin.listen == ListenAddress("127.0.0.1", 9090)
    assert (cfg.admin.token_env, cfg.admin.token) == ("CANARY_ADMIN_TOKEN", ADMIN_TOKEN)
    assert (cfg.limits.max_body_bytes, cfg.limits.max_concurrency) == (10485760, 2048)
    assert cfg.limits.header_timeout_s == 10.0
    assert cfg.limits.keepalive_timeout_s == 75.0
    assert cfg.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)
    assert cfg.shutdown_grace_s == 30.0
    v1 = cfg.backends["llama-v1"]
    assert (v1.url, v1.origin, v1.base_path) == ("http://10.0.0.1:8000", "http://10.0.0.1:8000", "")
    assert (v1.api_key_env, v1.api_key) == ("V1_API_KEY", V1_KEY)
    assert (v1.timeouts.connect_s, v1.timeouts.first_byte_s, v1.timeouts.idle_s) == (2, 60, 30)
    assert cfg.backends["llama-v2"].api_key is None

    chat = cfg.routes[0]
    assert (chat.name, chat.stable, chat.canary) == ("chat", "llama-v1", "llama-v2")
    assert chat.match.path_prefix == "/v1/"
    assert chat.match.models == frozenset({"llama-3-8b"})
    assert chat.model_rewrite == {Variant.STABLE: "llama-3-8b", Variant.CANARY: "llama-3.1-8b"}
    assert [s.spec for s in chat.sticky.keys] == [
        "header:x-user-id",
        "body:user",
        "cookie:uid",
        "query:user",
        "auth",
        "ip",
    ]
    assert (chat.sticky.salt, chat.sticky.anonymous) == ("chat-2026-11", Anonymous.RANDOM)
    assert chat.override_header == "x-canary"
    assert chat.cohort is not None
    assert chat.cohort.include[0].source == KeySource(KeyKind.HEADER, "x-tier")
    assert chat.cohort.include[0].values == frozenset({"internal", "beta"})
    assert chat.cohort.exclude[0].values == frozenset({"acme"})
    assert chat.schedule is not None
    assert (chat.schedule.timezone, chat.schedule.mode) == ("UTC", ScheduleMode.ADVANCE)
    assert chat.schedule.windows[0].days == frozenset(range(5))
    assert chat.fallback_to_stable is True
    (hook,) = chat.notify
    assert (hook.url, hook.url_env, hook.format) == (
        "http://alerts.internal:9000/canary",
        None,
        WebhookFormat.GENERIC,
    )
    assert (hook.timeout_s, hook.retries, hook.backoff_s) == (5, 3, 1)
    auto = chat.rollout.auto
    assert chat.rollout.weight == 5
    assert auto is not None
    assert auto.steps == (1.0, 5.0, 10.0, 25.0, 50.0, 100.0)
    assert auto.step_pauses_s == (0.0, 1800.0, 0.0, 0.0, 0.0, 0.0)
    assert auto.cooldown_s == 3600
    assert (auto.interval_s, auto.min_requests, auto.pass_intervals) == (30, 100, 2)
    assert (auto.failure_limit, auto.on_failure, auto.confidence) == (2, OnFailure.ROLLBACK, 0.95)
    assert auto.checks.error_rate is not None
    assert (auto.checks.error_rate.max, auto.checks.error_rate.max_increase) == (0.05, 0.01)
    assert auto.checks.latency_p95 is not None
    assert (auto.checks.latency_p95.max_s, auto.checks.latency_p95.max_ratio) == (20, 1.25)
    assert auto.checks.cancel_rate == ErrorRateCheck(max=None, max_increase=0.02)
    assert auto.checks.latency_p99 == LatencyCheck(max_s=None, max_ratio=1.5)
    assert auto.checks.tpot_p95 == LatencyCheck(max_s=None, max_ratio=1.3)
    assert auto.checks.feedback_negative_rate == ErrorRateCheck(max=None, max_increase=0.05)
    assert auto.checks.output_tokens_ratio == RatioCheck(max=1.5)
    assert [name for name, _ in auto.checks.quantiles()] == [
        "latency_p95",
        "latency_p99",
        "ttft_p95",
        "tpot_p95",
    ]
    assert cfg.routes[1].stable == cfg.routes[1].canary == "llama-v1"
    assert cfg.telemetry.otlp_endpoint == "http://127.0.0.1:4318"
    assert (cfg.state.store, cfg.state.path, cfg.state.url, cfg.state.cluster) == (
        StateStoreKind.SQLITE,
        "canary-state.db",
        None,
        False,
    )


def test_example_shows_how_to_validate_it() -> None:
    assert "canary-proxy check -c config/example.yaml" in EXAMPLE.read_text().split("\n\n")[0]


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("2m", 120.0), ("90", 90.0)])
def test_keepalive_timeout_is_a_duration(text: str, seconds: float) -> None:
    cfg = parse_config(config(f"limits: {{keepalive_timeout: {text}}}"), environ={})
    assert cfg.limits.keepalive_timeout_s == seconds
    assert cfg.limits.header_timeout_s == 10.0  # the other limits keep their defaults


def test_minimal_config_gets_the_documented_defaults() -> None:
    cfg = parse_config(config(), environ={})
    defaults = Config(backends=MappingProxyType({}), routes=())
    assert cfg.listen == defaults.listen == ListenAddress("0.0.0.0", 8080)
    assert cfg.admin == defaults.admin
    assert cfg.admin.token is None
    assert (cfg.limits, cfg.telemetry, cfg.state) == (
        defaults.limits,
        defaults.telemetry,
        defaults.state,
    )
    assert (cfg.trusted_proxies, cfg.shutdown_grace_s) == ((), 30.0)
    assert cfg.limits.keepalive_timeout_s == 75.0
    route = cfg.routes[0]
    assert (route.match.path_prefix, route.match.models) == ("/", None)
    assert route.sticky.keys == (
        KeySource(KeyKind.HEADER, "x-user-id"),
        KeySource(KeyKind.BODY, "user"),
        KeySource(KeyKind.AUTH),
    )
    assert (route.sticky.salt, route.sticky.anonymous) == ("chat", Anonymous.RANDOM)
    assert (route.rollout.weight, route.rollout.auto) == (0.0, None)
    assert (route.override_header, route.cohort, route.schedule) == (None, None, None)
    assert route.fallback_to_stable is False
    assert dict(route.model_rewrite) == {}


@pytest.mark.parametrize("name", ["latency", "ttft", "tpot"])
@pytest.mark.parametrize("percent", [50, 95, 99])
def test_every_quantile_check_reads_both_limits(name: str, percent: int) -> None:
    key = f"{name}_p{percent}"
    route = (
        f"rollout: {{auto: {{steps: [50], checks: {{{key}: {{max: 1500ms, max_ratio: 1.1}}}}}}}}"
    )
    auto = parse_config(config(route=route), environ={}).routes[0].rollout.auto
    assert auto is not None
    assert getattr(auto.checks, key) == LatencyCheck(max_s=1.5, max_ratio=1.1)
    assert auto.checks.quantiles() == [(key, LatencyCheck(max_s=1.5, max_ratio=1.1))]
    assert auto.checks.rates() == []


def test_feedback_and_output_token_checks_are_read() -> None:
    route = (
        "rollout: {auto: {steps: [50], checks: {feedback_negative_rate: {max_increase: 0.05}, "
        "output_tokens_ratio: {max: 1.5}}}}"
    )
    auto = parse_config(config(route=route), environ={}).routes[0].rollout.auto
    assert auto is not None
    assert auto.checks.rates() == [
        ("feedback_negative_rate", ErrorRateCheck(max=None, max_increase=0.05))
    ]
    assert auto.checks.ratios() == [("output_tokens_ratio", RatioCheck(max=1.5))]


def test_auto_rollout_defaults() -> None:
    auto = parse_config(config(route="rollout: {auto: {steps: [50, 100]}}"), environ={})
    rollout = auto.routes[0].rollout.auto
    assert rollout is not None
    assert (rollout.interval_s, rollout.min_requests, rollout.on_failure) == (
        30.0,
        100,
        OnFailure.ROLLBACK,
    )
    assert (rollout.checks.error_rate, rollout.checks.latency_p95) == (None, None)
    assert (rollout.step_pauses_s, rollout.cooldown_s) == ((), 0.0)


def test_a_step_may_carry_a_timed_pause() -> None:
    text = "rollout: {auto: {steps: [1, {weight: 5, pause: 30m}, {weight: 25}, 100]}}"
    auto = parse_config(config(route=text), environ={}).routes[0].rollout.auto
    assert auto is not None
    assert auto.steps == (1.0, 5.0, 25.0, 100.0)
    assert auto.step_pauses_s == (0.0, 1800.0, 0.0, 0.0)
    assert [auto.pause_s(step) for step in (-1, 0, 1, 2, 3, 4)] == [0, 0, 1800, 0, 0, 0]


def test_mappings_in_the_result_are_read_only() -> None:
    cfg = parse_config(config(route="model_rewrite: {canary: m2}"), environ={})
    assert isinstance(cfg.backends, MappingProxyType)
    assert isinstance(cfg.routes[0].model_rewrite, MappingProxyType)
    with pytest.raises(TypeError):
        cfg.backends["evil"] = cfg.backends["v1"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("url", "stored", "origin", "base_path"),
    [
        ("http://10.0.0.1:8000/", "http://10.0.0.1:8000", "http://10.0.0.1:8000", ""),
        ("https://api.openai.com/v1/", "https://api.openai.com/v1",
         "https://api.openai.com:443", "/v1"),
        ("http://model.local/base/path", "http://model.local/base/path",
         "http://model.local:80", "/base/path"),
        ("http://[::1]:9000", "http://[::1]:9000", "http://[::1]:9000", ""),
    ],
)  # fmt: skip
def test_backend_url_is_split_into_origin_and_base_path(
    url: str, stored: str, origin: str, base_path: str
) -> None:
    cfg = parse_config(config(backend=f"url: '{url}'"), environ={})
    backend = cfg.backends["x"]
    assert (backend.url, backend.origin, backend.base_path) == (stored, origin, base_path)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("5m", 300.0), ("1h", 3600.0), (30, 30.0), (1.5, 1.5),
     ("1.5s", 1.5), ("45", 45.0), (0, 0.0)],
)  # fmt: skip
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["fast", "2 sec", "-1s", "1d", "", "s", True, None, -1, [1]])
def test_non_durations(text: object) -> None:
    assert parse_duration(text) is None


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("localhost:8080", ListenAddress("localhost", 8080)), ("[::1]:0", ListenAddress("::1", 0)),
     ("0.0.0.0:65535", ListenAddress("0.0.0.0", 65535))],
)  # fmt: skip
def test_listen_addresses(listen: str, expected: ListenAddress) -> None:
    cfg = parse_config(config(f"listen: '{listen}'\nadmin: {{listen: '127.0.0.1:1'}}"), environ={})
    assert cfg.listen == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("header:X-User-Id", KeySource(KeyKind.HEADER, "x-user-id")),
     ("body:user", KeySource(KeyKind.BODY, "user")),
     ("cookie:UID", KeySource(KeyKind.COOKIE, "UID")),
     ("query:u", KeySource(KeyKind.QUERY, "u")),
     ("auth", KeySource(KeyKind.AUTH)),
     ("ip", KeySource(KeyKind.IP))],
)  # fmt: skip
def test_key_sources(text: str, expected: KeySource) -> None:
    assert parse_key_source(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("heder:x", "unknown key source 'heder:x'"), ("header:", "header needs a name"),
     ("ip:1.2.3.4", "ip takes no name"), ("header:x y", "must be an HTTP token"), ("", "unknown")],
)  # fmt: skip
def test_bad_key_sources_raise_value_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_key_source(text)


@pytest.mark.parametrize(
    ("text", "days", "start", "end"),
    [("Mon-Fri 09:00-18:00", {0, 1, 2, 3, 4}, 540, 1080),
     ("Sat,Sun 10:00-14:00", {5, 6}, 600, 840),
     ("Mon 22:00-06:00", {0}, 1320, 360),
     ("daily 00:00-24:00", set(range(7)), 0, 1440),
     ("Fri-Mon 08:00-09:00", {4, 5, 6, 0}, 480, 540),
     ("mon, WED 9:30-10:00", {0, 2}, 570, 600),
     ("Tuesday 00:00-01:00", {1}, 0, 60)],
)  # fmt: skip
def test_schedule_windows(text: str, days: set[int], start: int, end: int) -> None:
    window = parse_window(text)
    assert (window.days, window.start_minute, window.end_minute) == (frozenset(days), start, end)
    assert window.text == text


def test_stable_and_canary_may_be_the_same_backend() -> None:
    cfg = parse_config(config(canary="v1", route="model_rewrite: {canary: m2}"), environ={})
    assert cfg.routes[0].backend_of(Variant.CANARY) == "v1"


def test_weight_with_two_decimals_is_kept() -> None:
    cfg = parse_config(config(route="rollout: {weight: 12.34}"), environ={})
    assert cfg.routes[0].rollout.weight == 12.34


def test_environ_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_KEY", "value-from-process")
    cfg = parse_config(config(backend="url: http://h:1\napi_key_env: X_KEY"))
    assert cfg.backends["x"].api_key == "value-from-process"


# -- every rule fails with its path ------------------------------------------------------

TWO_ROUTES = (
    BACKENDS
    + """\
routes:
  - {name: chat, stable: v1, canary: v2}
  - {name: chat, stable: v1, canary: v2}
"""
)

BAD_CASES = [
    # top level
    (config("listn: 0.0.0.0:8080"),
     "listn: unknown key 'listn' (did you mean 'listen'?)"),
    (config("colour: blue"),
     "colour: unknown key 'colour' (expected one of: listen, admin"),
    (config("listen: nowhere"),
     "listen: must be host:port like 0.0.0.0:8080"),
    (config("listen: 0.0.0.0:70000"),
     "listen: must end in a port from 0 to 65535"),
    (config("listen: '::1:8080'"),
     "listen: must put an IPv6 address in brackets"),
    (config("listen: 8080"),
     "listen: must be host:port like 0.0.0.0:8080 or [::1]:8080, got 8080"),
    ("",
     "top level: is empty (a config needs at least backends and routes)"),
    ("# only a comment\n",
     "top level: is empty"),
    ("[1, 2]",
     "top level: must be a mapping, got a list"),
    (config("1: one"),
     "top level: keys must be strings, got 1"),
    (config("limits:"),
     "limits: must be a mapping, got null"),
    ("routes: [{name: r, stable: a, canary: b}]",
     "backends: is required"),
    (BACKENDS,
     "routes: is required"),
    (BACKENDS + "routes: []",
     "routes: must not be empty"),
    ("backends: {}\nroutes: [{name: r, stable: a, canary: b}]",
     "backends: must not be empty"),
    # admin
    (config("admin: {token_env: MISSING_TOKEN}"),
     "admin.token_env: environment variable MISSING_TOKEN is not set"),
    (config("admin: {token_env: EMPTY_VAR}"),
     "admin.token_env: environment variable EMPTY_VAR is empty"),
    (config("admin: {token: hunter2}"),
     "admin.token: secrets are not allowed in the config file; set token_env"),
    (config("admin: {listen: 0.0.0.0:8080}"),
     "admin.listen: must differ from listen (0.0.0.0:8080)"),
    (config("admin: {listen: 127.0.0.1}"),
     "admin.listen: must be host:port"),
    # limits, trusted proxies, shutdown
    (config("limits: {max_body_bytes: true}"),
     "limits.max_body_bytes: must be a whole number, got true"),
    (config("limits: {max_concurrency: 0}"),
     "limits.max_concurrency: must be at least 1, got 0"),
    (config("limits: {header_timeout: fast}"),
     'limits.header_timeout: must be a duration like "2s", "250ms" or a number of seconds, '
     "got 'fast'"),
    (config("limits: {header_timeout: 0}"),
     "limits.header_timeout: must be longer than zero"),
    (config("limits: {keepalive_timeout: 0}"),
     "limits.keepalive_timeout: must be longer than zero"),
    (config("limits: {keepalive_timeout: forever}"),
     'limits.keepalive_timeout: must be a duration like "2s"'),
    (config("trusted_proxies: [10.0.0.0/33]"),
     "trusted_proxies[0]: must be an IP address or a CIDR"),
    (config("trusted_proxies: 10.0.0.0/8"),
     "trusted_proxies: must be a list, got '10.0.0.0/8'"),
    (config("shutdown_grace: -5"),
     "shutdown_grace: must be a duration"),
    # backends
    (config(backend="max_connections: 4"),
     "backends.x.url: is required"),
    (config(backend="url: ftp://h"),
     "backends.x.url: must start with http:// or https://, got 'ftp://h'"),
    (config(backend="url: 'http://h:8000/v1?x=1'"),
     "backends.x.url: must not have a query or a fragment"),
    (config(backend="url: 'http://me:pw@h:8000'"),
     "backends.x.url: must not carry credentials"),
    (config(backend="url: 'http://:8000'"),
     "backends.x.url: must name a host"),
    (config(backend="url: 'http://h:99999'"),
     "backends.x.url: must be a URL"),
    (config(backend="url: http://h\napi_key_env: V3_API_KEY"),
     "backends.x.api_key_env: environment variable V3_API_KEY is not set"),
    (config(backend="url: http://h\napi_key: sk-abc"),
     "backends.x.api_key: secrets are not allowed in the config file; set api_key_env to the "
     "name of an environment variable"),
    (config(backend="url: http://h\npassword: pw"),
     "backends.x.password: secrets are not allowed"),
    (config(backend="url: http://h\napi_key_env: sk-proj-abc123"),
     "backends.x.api_key_env: looks like a secret, not an environment variable name; put the "
     "key in the environment and name the variable here"),
    (config(backend="url: http://h\napi_key_env: a8f3kd93jf84jd83hf73ha"),
     "backends.x.api_key_env: looks like a secret"),
    (config(backend="url: http://h\napi_key_env: 9LIVES"),
     "backends.x.api_key_env: must be an environment variable name"),
    (config(backend="url: http://h\ntimeouts: {connect: 2 sec}"),
     "backends.x.timeouts.connect: must be a duration"),
    (config(backend="url: http://h\ntimeouts: {conect: 2s}"),
     "backends.x.timeouts.conect: unknown key 'conect' (did you mean 'connect'?)"),
    (config(backend="url: http://h\nmax_connections: 0"),
     "backends.x.max_connections: must be at least 1"),
    (BACKENDS + "  'bad name': {url: 'http://h'}\nroutes: [{name: r, stable: v1, canary: v2}]",
     "backends['bad name']: backend names use only letters"),
    # routes: identity and match
    (BACKENDS + "routes: [{stable: v1, canary: v2}]",
     "routes[0].name: is required"),
    (config(canary="v3"),
     "routes[0].canary: unknown backend 'v3' (backends: v1, v2)"),
    (BACKENDS + "routes: [{name: 'my route', stable: v1, canary: v2}]",
     "routes[0].name: must use only letters, digits"),
    (TWO_ROUTES,
     "routes[1].name: duplicate route name 'chat' (also routes[0])"),
    (config(route="match: {path_prefix: v1/}"),
     "routes[0].match.path_prefix: must start with \"/\", got 'v1/'"),
    (config(route="match: {models: []}"),
     "routes[0].match.models: must not be empty"),
    (config(route="match: {models: ['']}"),
     "routes[0].match.models[0]: must not be empty"),
    (config(route="model_rewrite: {canari: m2}"),
     "routes[0].model_rewrite.canari: unknown key 'canari' (did you mean 'canary'?)"),
    (config(route="model_rewrite: {canary: ''}"),
     "routes[0].model_rewrite.canary: must not be empty"),
    (config(route="override_header: 'x canary'"),
     "routes[0].override_header: must be an HTTP header name"),
    (config(route="fallback_to_stable: 'yes'"),
     "routes[0].fallback_to_stable: must be true or false, got 'yes'"),
    # sticky
    (config(route="sticky: {salts: x}"),
     "routes[0].sticky.salts: unknown key 'salts' (did you mean 'salt'?)"),
    (config(route="sticky: {keys: [auth, ip, 'heder:x-user-id']}"),
     "routes[0].sticky.keys[2]: unknown key source 'heder:x-user-id' (expected header:NAME, "
     "body:FIELD, cookie:NAME, query:NAME, auth or ip)"),
    (config(route="sticky: {keys: ['header:']}"),
     "routes[0].sticky.keys[0]: header needs a name"),
    (config(route="sticky: {keys: ['auth:x']}"),
     "routes[0].sticky.keys[0]: auth takes no name"),
    (config(route="sticky: {keys: [auth, auth]}"),
     "routes[0].sticky.keys[1]: duplicate key source 'auth'"),
    (config(route="sticky: {keys: []}"),
     "routes[0].sticky.keys: must not be empty"),
    (config(route="sticky: {salt: ''}"),
     "routes[0].sticky.salt: must not be empty"),
    (config(route="sticky: {salt: 2026}"),
     "routes[0].sticky.salt: must be a string, got the number 2026 (quote it"),
    (config(route="sticky: {anonymous: maybe}"),
     "routes[0].sticky.anonymous: must be one of random, stable, got 'maybe'"),
    # cohort
    (config(route="cohort: {}"),
     "routes[0].cohort: needs include, exclude or both"),
    (config(route="cohort: {include: {'header:x-tier': []}}"),
     "routes[0].cohort.include['header:x-tier']: must not be empty"),
    (config(route="cohort: {exclude: {'hdr:x-org': [acme]}}"),
     "routes[0].cohort.exclude['hdr:x-org']: unknown key source 'hdr:x-org'"),
    (config(route="cohort: {include: {auth: [k]}}"),
     "routes[0].cohort.include.auth: auth cannot select a cohort"),
    (config(route="cohort: {include: {}}"),
     "routes[0].cohort.include: must not be empty"),
    # schedule
    (config(route="schedule: {windows: ['daily 00:00-24:00']}"),
     "routes[0].schedule.timezone: is required"),
    (config(route="schedule: {timezone: UTC}"),
     "routes[0].schedule.windows: is required"),
    (config(route="schedule: {timezone: Mars/Olympus, windows: ['Mon 09:00-10:00']}"),
     "routes[0].schedule.timezone: unknown time zone 'Mars/Olympus'"),
    (config(route="schedule: {timezone: UTC, windows: ['Mon 9-17']}"),
     "routes[0].schedule.windows[0]: must be a time window like \"Mon-Fri 09:00-18:00\""),
    (config(route="schedule: {timezone: UTC, windows: ['Mon 25:00-26:00']}"),
     "routes[0].schedule.windows[0]: time '25:00' must be between 00:00 and 24:00"),
    (config(route="schedule: {timezone: UTC, windows: ['Funday 09:00-10:00']}"),
     "routes[0].schedule.windows[0]: unknown day 'Funday'"),
    (config(route="schedule: {timezone: UTC, windows: ['Mon 10:00-10:00']}"),
     "routes[0].schedule.windows[0]: starts and ends at 10:00"),
    (config(route="schedule: {timezone: UTC, windows: ['Mon 24:00-02:00']}"),
     "routes[0].schedule.windows[0]: cannot start at 24:00"),
    (config(route="schedule: {timezone: UTC, windows: []}"),
     "routes[0].schedule.windows: must not be empty"),
    (config(route="schedule: {timezone: UTC, windows: ['Mon 09:00-10:00'], mode: sometimes}"),
     "routes[0].schedule.mode: must be one of advance, serve, got 'sometimes'"),
    # rollout
    (config(route="rollout: {weight: 101}"),
     "routes[0].rollout.weight: must be at most 100, got 101"),
    (config(route="rollout: {weight: 5.555}"),
     "routes[0].rollout.weight: must have at most two decimals, got 5.555"),
    (config(route="rollout: {weight: -1}"),
     "routes[0].rollout.weight: must be at least 0, got -1"),
    (config(route="rollout: {weight: '5%'}"),
     "routes[0].rollout.weight: must be a number, got '5%'"),
    (config(route="rollout: {auto: {interval: 10s}}"),
     "routes[0].rollout.auto.steps: is required"),
    (config(route="rollout: {auto: {steps: [1, 10, 5]}}"),
     "routes[0].rollout.auto.steps: must increase, got 5 after 10"),
    (config(route="rollout: {auto: {steps: [5, 5]}}"),
     "routes[0].rollout.auto.steps: must increase"),
    (config(route="rollout: {auto: {steps: [0, 50]}}"),
     "routes[0].rollout.auto.steps[0]: must be greater than 0"),
    (config(route="rollout: {auto: {steps: [50, 150]}}"),
     "routes[0].rollout.auto.steps[1]: must be at most 100, got 150"),
    (config(route="rollout: {auto: {steps: [0.125]}}"),
     "routes[0].rollout.auto.steps[0]: must have at most two decimals"),
    (config(route="rollout: {auto: {steps: [50], interval: 0}}"),
     "routes[0].rollout.auto.interval: must be longer than zero"),
    (config(route="rollout: {auto: {steps: [50], min_requests: 1.5}}"),
     "routes[0].rollout.auto.min_requests: must be a whole number, got 1.5"),
    (config(route="rollout: {auto: {steps: [50], pass_intervals: 0}}"),
     "routes[0].rollout.auto.pass_intervals: must be at least 1"),
    (config(route="rollout: {auto: {steps: [50], failure_limit: true}}"),
     "routes[0].rollout.auto.failure_limit: must be a whole number, got true"),
    (config(route="rollout: {auto: {steps: [50], on_failure: pause}}"),
     "routes[0].rollout.auto.on_failure: must be one of rollback, hold, got 'pause'"),
    (config(route="rollout: {auto: {steps: [1, {weight: 5, pause: 0}]}}"),
     "routes[0].rollout.auto.steps[1].pause: must be longer than zero, got 0"),
    (config(route="rollout: {auto: {steps: [1, {pause: 5m}]}}"),
     "routes[0].rollout.auto.steps[1].weight: is required"),
    (config(route="rollout: {auto: {steps: [1, {weight: 100, pause: 5m}]}}"),
     "routes[0].rollout.auto.steps[1].pause: cannot pause at 100: the canary is promoted there"),
    (config(route="rollout: {auto: {steps: [1, {weight: 5, wait: 5m}]}}"),
     "routes[0].rollout.auto.steps[1].wait: unknown key 'wait'"),
    (config(route="rollout: {auto: {steps: [{weight: 5, pause: 1m}, 2]}}"),
     "routes[0].rollout.auto.steps: must increase, got 2 after 5"),
    (config(route="notify: [{format: slack}]"),
     "routes[0].notify[0]: needs url or url_env (a variable holding the URL), one of them"),
    (config(route="notify: [{url: 'http://h:1', url_env: HOOK}]"),
     "routes[0].notify[0]: needs url or url_env (a variable holding the URL), one of them"),
    (config(route="notify: [{url: 'ftp://h/x'}]"),
     "routes[0].notify[0].url: must start with http:// or https://, got 'ftp://h/x'"),
    (config(route="notify: [{url: 'http://h:1', format: teams}]"),
     "routes[0].notify[0].format: must be one of generic, slack, got 'teams'"),
    (config(route="notify: [{url: 'http://h:1', retries: -1}]"),
     "routes[0].notify[0].retries: must be at least 0, got -1"),
    (config(route="notify: [{url_env: EMPTY_VAR}]"),
     "routes[0].notify[0].url_env: environment variable EMPTY_VAR is empty"),
    (config(route="notify: [{url_env: V1_API_KEY}]"),
     "routes[0].notify[0].url_env: environment variable V1_API_KEY must hold an http:// or "
     "https:// URL"),
    (config(route="rollout: {auto: {steps: [50], cooldown: soon}}"),
     "routes[0].rollout.auto.cooldown: must be a duration"),
    (config(route="rollout: {auto: {steps: [50], confidence: 0.5}}"),
     "routes[0].rollout.auto.confidence: must be greater than 0.5, got 0.5"),
    (config(route="rollout: {auto: {steps: [50], confidence: 1}}"),
     "routes[0].rollout.auto.confidence: must be less than 1, got 1"),
    (config(route="rollout: {auto: {steps: [50], checks: {error_rate: {}}}}"),
     "routes[0].rollout.auto.checks.error_rate: needs max, max_increase or both"),
    (config(route="rollout: {auto: {steps: [50], checks: {error_rate: {max: 1.5}}}}"),
     "routes[0].rollout.auto.checks.error_rate.max: must be at most 1, got 1.5"),
    (config(route="rollout: {auto: {steps: [50], checks: {latency_p95: {max_ratio: 0.9}}}}"),
     "routes[0].rollout.auto.checks.latency_p95.max_ratio: must be at least 1, got 0.9"),
    (config(route="rollout: {auto: {steps: [50], checks: {ttft_p95: {max: soon}}}}"),
     "routes[0].rollout.auto.checks.ttft_p95.max: must be a duration"),
    (config(route="rollout: {auto: {steps: [50], checks: {ttft_p95: {}}}}"),
     "routes[0].rollout.auto.checks.ttft_p95: needs max, max_ratio or both"),
    (config(route="rollout: {auto: {steps: [50], checks: {latency_p90: {max: 1s}}}}"),
     "routes[0].rollout.auto.checks.latency_p90: unknown key 'latency_p90' (did you mean "
     "'latency_p99'?)"),
    (config(route="rollout: {auto: {steps: [50], checks: {tpot_p95: {max_ratio: 0.5}}}}"),
     "routes[0].rollout.auto.checks.tpot_p95.max_ratio: must be at least 1, got 0.5"),
    (config(route="rollout: {auto: {steps: [50], checks: {cancel_rate: {max: 2}}}}"),
     "routes[0].rollout.auto.checks.cancel_rate.max: must be at most 1, got 2"),
    (config(route="rollout: {auto: {steps: [50], checks: {cancel_rate: {}}}}"),
     "routes[0].rollout.auto.checks.cancel_rate: needs max, max_increase or both"),
    (config(route="rollout: {auto: {steps: [50], checks: {feedback_negative_rate: {}}}}"),
     "routes[0].rollout.auto.checks.feedback_negative_rate: needs max, max_increase or both"),
    (config(route="rollout: {auto: {steps: [50], checks: {output_tokens_ratio: {}}}}"),
     "routes[0].rollout.auto.checks.output_tokens_ratio.max: is required"),
    (config(route="rollout: {auto: {steps: [50], checks: {output_tokens_ratio: {max: 0}}}}"),
     "routes[0].rollout.auto.checks.output_tokens_ratio.max: must be greater than 0, got 0"),
    (config(route="rollout: {auto: {steps: [50], checks: {output_tokens_ratio: 1.5}}}"),
     "routes[0].rollout.auto.checks.output_tokens_ratio: must be a mapping"),
    (config(route="rollout: {auto: {steps: [50], checks: {output_tokens_ratio: "
            "{max_ratio: 2}}}}"),
     "routes[0].rollout.auto.checks.output_tokens_ratio.max_ratio: unknown key 'max_ratio' "
     "(expected one of: max)"),
    (config(route="rollout: {auto: {steps: [50], checks: {ttft_p50: {max: 1s, min: 0}}}}"),
     "routes[0].rollout.auto.checks.ttft_p50.min: unknown key 'min' (expected one of: max, "
     "max_ratio)"),
    # telemetry and state
    (config("telemetry: {service_name: ''}"),
     "telemetry.service_name: must not be empty"),
    (config("telemetry: {otlp_endpoint: 'grpc://collector:4317'}"),
     "telemetry.otlp_endpoint: must start with http:// or https://"),
    (config("telemetry: {trace_sample_ratio: 1.5}"),
     "telemetry.trace_sample_ratio: must be at most 1, got 1.5"),
    (config("telemetry: {prometheus: 'on'}"),
     "telemetry.prometheus: must be true or false, got 'on'"),
    (config("state: {store: postgres}"),
     "state.store: must be one of sqlite, redis, got 'postgres'"),
    (config("state: {store: redis}"),
     "state.url: required when state.store is redis"),
    (config("state: {url: 'redis://h:6379/0'}"),
     "state.url: only used when state.store is redis (store is sqlite)"),
    (config("state: {store: redis, url: 'http://h:6379'}"),
     "state.url: must start with redis://, rediss:// or unix://"),
    (config("state: {store: redis, url: 'redis://:pw@h:6379'}"),
     "state.url: must not carry credentials"),
    (config("state: {path: ''}"),
     "state.path: must not be empty"),
    (config("state: {cluster: true}"),
     "state.cluster: only used when state.store is redis (store is sqlite)"),
    (config("state: {store: redis, url: 'redis://h:6379', cluster: 'yes'}"),
     "state.cluster: must be true or false, got 'yes'"),
    (config("state: {store: redis, url: 'unix:///run/redis.sock', cluster: true}"),
     "state.url: must be redis:// or rediss:// when state.cluster is true"),
    (config("state: {store: redis, url: 'redis://h:6379/2', cluster: true}"),
     "state.url: must name database 0 when state.cluster is true (a cluster has no other), "
     "got '/2'"),
    (config("state: {store: redis, url: 'redis://h:6379', clustered: true}"),
     "state.clustered: unknown key 'clustered' (did you mean 'cluster'?)"),
    # YAML itself
    (config(route="sticky:\n  salt: a\n  salt: b"),
     "routes[0].sticky.salt: duplicate key (line 10; first on line 9)"),
    (config("listen: 0.0.0.0:1\nlisten: 0.0.0.0:2"),
     "listen: duplicate key (line 10; first on line 9)"),
    (BACKENDS + "routes: [\n  {name: a\n",
     "line 6, column 1: invalid YAML:"),
    ("backends:\n  v1: {url: http://h}\n\troutes: []\n",
     "line 3, column 1: invalid YAML: found character '\\t'"),
    ("a: 1\n---\nb: 2\n",
     "line 2, column 1: invalid YAML: expected a single document"),
    ("a: 1\x00",
     "line 1, column 5: invalid YAML: unacceptable character #x0000"),
    (b"backends: \xff\n",
     "byte 10: the file is not UTF-8 text"),
    ("when: 2020-13-45",
     "invalid YAML: month must be in 1..12"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), BAD_CASES)
def test_bad_config_names_path_and_problem(text: str | bytes, expected: str) -> None:
    problems = problems_of(text)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(("text", "expected"), BAD_CASES)
def test_every_problem_is_one_plain_line(text: str | bytes, expected: str) -> None:
    for problem in problems_of(text):
        _path, sep, message = problem.partition(": ")
        assert sep, problem
        assert "\n" not in problem
        assert not problem.endswith(".")
        assert message[0].islower() or not message[0].isalpha(), problem


def test_several_problems_in_one_file_are_all_reported() -> None:
    text = config(
        "listen: nowhere\nstate: {store: redis}\ntelemetry: {prometheus: 1}",
        backend="url: http://h\napi_key_env: V3_API_KEY",
        canary="v3",
        route="rollout: {weight: 101, auto: {steps: [10, 5]}}\nsticky: {salts: x}",
    )
    problems = problems_of(text)
    assert [p.partition(":")[0] for p in problems] == [
        "listen",
        "backends.x.api_key_env",
        "routes[0].canary",
        "routes[0].sticky.salts",
        "routes[0].rollout.weight",
        "routes[0].rollout.auto.steps",
        "telemetry.prometheus",
        "state.url",
    ]


def test_config_error_message_joins_every_problem() -> None:
    error = ConfigError(["a: x", "b: y"])
    assert (error.problems, str(error)) == (("a: x", "b: y"), "a: x; b: y")


# -- version, files, secrets ---------------------------------------------------------------


def test_version_is_the_content_hash_of_the_bytes() -> None:
    text = config()
    first = parse_config(text, environ={})
    assert first.version == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert parse_config(text.encode(), environ={}).version == first.version
    assert parse_config(text + "# a comment\n", environ={}).version != first.version


def test_load_config_reads_the_file_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "canary.yaml"
    path.write_bytes(config().encode())
    cfg = load_config(path, environ={})
    assert (cfg.source, cfg.version) == (str(path), parse_config(config(), environ={}).version)
    path.write_bytes(config("shutdown_grace: 5s").encode())
    assert load_config(str(path), environ={}).version != cfg.version


def test_unreadable_file_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert caught.value.problems == (
        f"{missing}: cannot read the config file: No such file or directory",
    )


@pytest.mark.parametrize(
    ("state", "cluster", "shown"),
    [
        ("{store: redis, url: 'redis://r:6379/0'}", False, "redis redis://r:6379/0"),
        (
            "{store: redis, url: 'redis://r:6379/0', cluster: false}",
            False,
            "redis redis://r:6379/0",
        ),
        (
            "{store: redis, url: 'rediss://node-1:6380', cluster: true}",
            True,
            "redis cluster, nodes found from rediss://node-1:6380",
        ),
    ],
)
def test_a_redis_state_store_is_one_server_unless_it_says_cluster(
    state: str, cluster: bool, shown: str
) -> None:
    cfg = parse_config(config(f"state: {state}"), environ={})
    assert (cfg.state.store, cfg.state.cluster) == (StateStoreKind.REDIS, cluster)
    assert summarize(cfg).splitlines()[-1].split(None, 1) == ["state", shown]


def test_secrets_never_appear_in_repr_summary_or_errors() -> None:
    cfg = load_config(EXAMPLE, environ=ENV)
    for text in (repr(cfg), str(cfg), summarize(cfg)):
        assert V1_KEY not in text
        assert ADMIN_TOKEN not in text
    broken = config("admin: {token_env: CANARY_ADMIN_TOKEN}\nlisten: x", backend="url: h")
    assert ADMIN_TOKEN not in " ".join(problems_of(broken))


def test_summary_shows_what_an_operator_checks() -> None:
    summary = summarize(load_config(EXAMPLE, environ=ENV))
    for expected in (
        "0.0.0.0:8080",
        "token from $CANARY_ADMIN_TOKEN",
        "api key from $V1_API_KEY",
        "stable llama-v1 (model llama-3-8b) -> canary llama-v2 (model llama-3.1-8b)",
        "5% canary (auto)",
        "chat-2026-11; no key: random",
        "steps 1 > 5 (pause 30m) > 10 > 25 > 50 > 100 %",
        "cooldown   no resume within 1h of a rollback, unless forced",
        "p95 latency <= 20s, <= 1.25x stable",
        "Mon-Fri 09:00-18:00",
        "include header:x-tier in [beta, internal]",
        "service canary-proxy, OTLP to http://127.0.0.1:4318",
        "sqlite canary-state.db",
    ):
        assert expected in summary, expected
    assert "\x1b" not in summary
    assert len(summary.splitlines()) <= 60
    assert max(len(line) for line in summary.splitlines()) <= 100


# -- properties ----------------------------------------------------------------------------

UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@settings(max_examples=200, deadline=None)
@given(
    number=st.decimals(min_value="0.001", max_value="100000", places=3, allow_nan=False),
    unit=st.sampled_from(sorted(UNIT_SECONDS)),
)
def test_any_positive_duration_string_parses_to_its_seconds(number: object, unit: str) -> None:
    text = f"{number}{unit}"
    cfg = parse_config(config(f"shutdown_grace: '{text}'"), environ={})
    assert cfg.shutdown_grace_s == pytest.approx(float(str(number)) * UNIT_SECONDS[unit])


CONFIG_WORDS = st.sampled_from(
    ["listen", "admin", "backends", "routes", "name", "stable", "canary", "url", "sticky",
     "keys", "rollout", "auto", "steps", "weight", "schedule", "windows", "cohort", "include",
     "state", "store", "api_key_env", "token_env", "v1", "v2", "timeouts", "checks"]
)  # fmt: skip
JUNK_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), CONFIG_WORDS
)
JUNK_TREES = st.recursive(
    JUNK_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(CONFIG_WORDS | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200) | JUNK_TREES.map(yaml.safe_dump))
def test_junk_yaml_never_raises_anything_but_config_error(text: str) -> None:
    try:
        parse_config(text, environ={})
    except ConfigError as error:
        problems = error.problems
    else:
        problems = ("valid",)
    assert problems


# -- ${VAR} interpolation --------------------------------------------------------------

INTERPOLATED = """\
listen: ${LISTEN:-127.0.0.1:8181}
limits:
  max_concurrency: ${MAX_CONCURRENCY}
  header_timeout: ${HEADER_TIMEOUT:-3s}
backends:
  v1: {url: "${V1_URL}"}
  v2: {url: "http://${V2_HOST}:8000/v1"}
routes:
  - name: chat
    stable: v1
    canary: v2
    sticky: {salt: "${SALT:-}$${SALT}$x-${SALT_SUFFIX:-1}"}
    fallback_to_stable: ${FALLBACK}
    rollout:
      weight: ${WEIGHT}
"""
INTERPOLATION_ENV = {
    "MAX_CONCURRENCY": "512",
    "V1_URL": "http://10.0.0.1:8000",
    "V2_HOST": "10.0.0.2",
    "FALLBACK": "true",
    "WEIGHT": "2.5",
    "SALT_SUFFIX": "",
}


def test_values_come_from_the_environment_typed_as_if_written_in_the_file() -> None:
    cfg = parse_config(INTERPOLATED, environ=INTERPOLATION_ENV)
    assert cfg.listen == ListenAddress("127.0.0.1", 8181)  # the default
    assert cfg.limits.max_concurrency == 512  # unquoted: a number
    assert cfg.limits.header_timeout_s == 3.0
    assert cfg.backends["v1"].url == "http://10.0.0.1:8000"
    assert cfg.backends["v2"].origin == "http://10.0.0.2:8000"
    route = cfg.routes[0]
    # An empty default, a literal `${` written `$${`, a lone `$`, and an empty variable
    # given its default.
    assert route.sticky.salt == "${SALT}$x-1"
    assert route.fallback_to_stable is True
    assert route.rollout.weight == 2.5
    # The version is the file's: the same bytes, whatever the environment says.
    other = parse_config(INTERPOLATED, environ={**INTERPOLATION_ENV, "WEIGHT": "50"})
    assert (other.routes[0].rollout.weight, other.version) == (50, cfg.version)


def test_a_variable_holds_a_value_never_yaml_structure() -> None:
    env = {**INTERPOLATION_ENV, "SALT": "a: [1, 2]\nb: {c: d} # no comment"}
    cfg = parse_config(INTERPOLATED, environ=env)
    assert cfg.routes[0].sticky.salt == "a: [1, 2]\nb: {c: d} # no comment${SALT}$x-1"
    quoted = parse_config(config(route='sticky: {salt: "${N}"}'), environ={"N": "1234"}).routes[0]
    assert quoted.sticky.salt == "1234"  # quoted: a string, though it looks like a number


def test_every_unset_variable_is_one_problem_at_its_path() -> None:
    env = {"V1_URL": "http://10.0.0.1:8000", "V2_HOST": "h", "FALLBACK": "maybe"}
    assert problems_of(INTERPOLATED, environ=env) == (
        "limits.max_concurrency: the environment variable MAX_CONCURRENCY is not set "
        "(give a default with ${MAX_CONCURRENCY:-value})",
        "routes[0].rollout.weight: the environment variable WEIGHT is not set "
        "(give a default with ${WEIGHT:-value})",
        # Set, so interpolated, and then judged as the value it is.
        "routes[0].fallback_to_stable: must be true or false, got 'maybe'",
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("${}", "${} is no variable reference (expected ${NAME} or ${NAME:-default})"),
        ("${1X}", "${1X} is no variable reference (expected ${NAME} or ${NAME:-default})"),
        ("${X-y}", "${X-y} is no variable reference (expected ${NAME} or ${NAME:-default})"),
        ("x-${X", "an unclosed ${ (write $${ for a literal one)"),
    ],
)
def test_a_malformed_reference_is_a_problem(value: str, problem: str) -> None:
    text = config(route=f"sticky: {{salt: '{value}'}}")
    assert problems_of(text, environ={"X": "x"}) == (f"routes[0].sticky.salt: {problem}",)


def test_a_webhook_url_from_the_environment_is_never_shown_whole() -> None:
    secret = "https://hooks.slack.com/services/T000/B000/XXXXsecretXXXX"
    text = config(route="notify: [{url_env: SLACK_URL, format: slack, retries: 0}]")
    cfg = parse_config(text, environ={"SLACK_URL": secret})
    (hook,) = cfg.routes[0].notify
    assert (hook.url, hook.format, hook.retries) == (secret, WebhookFormat.SLACK, 0)
    assert hook.shown == "https://hooks.slack.com/... ($SLACK_URL)"
    shown = summarize(cfg)
    assert "slack webhook https://hooks.slack.com/... ($SLACK_URL); 0 retries" in shown
    assert "XXXXsecretXXXX" not in shown + repr(cfg)
