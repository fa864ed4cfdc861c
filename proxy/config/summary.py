"""The one-screen summary `canary-proxy check` prints for a valid config.

Plain aligned text, no colours. Secrets never appear: a backend's key and the
admin token show only as the name of the variable they come from.
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.config.model import (
    QUANTILE_CHECKS,
    AbTest,
    AdminConfig,
    AutoRollout,
    Backend,
    BackendApi,
    Checks,
    Cohort,
    CohortRule,
    Config,
    ErrorRateCheck,
    LatencyCheck,
    Limits,
    LogFormat,
    Match,
    OtlpProtocol,
    Route,
    Schedule,
    StateConfig,
    StateStoreKind,
    TelemetryConfig,
    Variant,
)

__all__ = ["format_duration", "format_span", "summarize"]

VALUE_COLUMN = 15  # every value starts here, whatever its label's indent
INDENT = "  "
_CLIENT_KEY = {BackendApi.ANTHROPIC: "x-api-key"}  # the header a client sends its key in


def summarize(config: Config) -> str:
    """Every setting of `config` that matters to an operator, one screen, no secrets."""
    lines = [
        _row("config", f"{config.source or '<config>'} (version {config.version or '-'})"),
        _row("listen", str(config.listen)),
        _row("admin", _admin(config.admin)),
        *_limits(config.limits),
        _row("trusted", _networks(str(n) for n in config.trusted_proxies)),
        _row("shutdown", f"grace {format_duration(config.shutdown_grace_s)}"),
        "",
        f"backends ({len(config.backends)})",
        *_backends(config.backends.values()),
        "",
        f"routes ({len(config.routes)}, first match wins)",
    ]
    for route in config.routes:
        lines.extend(_route(route))
    lines += ["", _row("telemetry", _telemetry(config.telemetry))]
    lines.append(_row("state", _state(config.state)))
    return "\n".join(lines) + "\n"


def format_duration(seconds: float) -> str:
    """`0.25` -> "250ms", `60` -> "60s", `300` -> "5m", `3600` -> "1h"."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 300 and seconds % 60 == 0:  # "60s" reads better than "1m" for a timeout
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def format_span(seconds: float) -> str:
    """A span of time as people read it, to the second: "45s", "29m 12s", "1h 5m"."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m {secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


def _row(label: str, text: str, indent: str = "") -> str:
    return f"{indent + label:<{VALUE_COLUMN - 1}} {text}".rstrip()


def _admin(admin: AdminConfig) -> str:
    if admin.token_env:
        auth = f"token from ${admin.token_env}{_unset(admin.token)}"
    else:
        auth = "no token (POST /api/* open)"
    return f"{admin.listen}, {auth}"


def _unset(secret: str | None) -> str:
    """Said of a secret's variable that `check` found unset (never the secret itself)."""
    return "" if secret else ", not set here"


def _limits(limits: Limits) -> list[str]:
    return [
        _row(
            "limits",
            f"body up to {limits.max_body_bytes} bytes, {limits.max_concurrency} in flight, "
            f"request head within {format_duration(limits.header_timeout_s)}",
        ),
        _row(
            "",
            f"idle client connections closed after {format_duration(limits.keepalive_timeout_s)}",
        ),
        _row(
            "",
            f"feedback on the last {limits.feedback_ids} request ids"
            if limits.feedback_ids
            else "feedback off (POST /v1/feedback is forwarded)",
        ),
    ]


def _networks(networks: Iterable[str]) -> str:
    return ", ".join(networks) or "none (X-Forwarded-For is not believed)"


def _backends(backends: Iterable[Backend]) -> list[str]:
    lines: list[str] = []
    for backend in backends:
        timeouts = backend.timeouts
        key = (
            f"api key from ${backend.api_key_env}{_unset(backend.api_key)}"
            if backend.api_key_env
            else f"the client's {_CLIENT_KEY.get(backend.api, 'Authorization')} passes through"
        )
        api = "" if backend.api is BackendApi.OPENAI else f"{backend.api} API, "
        lines.append(_row(backend.name, f"{backend.url} ({api}{key})", INDENT))
        lines.append(
            _row(
                "",
                f"connect {format_duration(timeouts.connect_s)}, "
                f"first byte {format_duration(timeouts.first_byte_s)}, "
                f"idle {format_duration(timeouts.idle_s)}; "
                f"{backend.max_connections} connections, "
                f"queue {format_duration(timeouts.pool_s)}; "
                f"upgraded idle {format_duration(timeouts.upgrade_idle_s)}",
                INDENT,
            )
        )
    return lines


def _route(route: Route) -> list[str]:
    rows = [
        ("match", _match(route.match)),
        ("variants", _variants(route)),
        ("weight", _weight(route)),
        ("sticky", ", ".join(source.spec for source in route.sticky.keys)),
        ("salt", f"{route.sticky.salt}; no key: {route.sticky.anonymous}"),
        ("override", f"header {route.override_header}" if route.override_header else "off"),
        ("cohort", _cohort(route.cohort) if route.cohort else "everyone"),
        ("schedule", _schedule(route.schedule) if route.schedule else "any time"),
        ("fallback", "to stable before the first byte" if route.fallback_to_stable else "off"),
    ]
    auto, ab = route.rollout.auto, route.rollout.ab
    if ab is not None:
        rows.append(("ab", _ab(ab)))
        guard = _checks(ab.guard) if ab.guard.check_count() else ["none"]
        rows += [("guard" if i == 0 else "", check) for i, check in enumerate(guard)]
    elif auto is not None:
        rows.append(("auto", _steps(auto)))
        rows.append(("verdicts", _verdicts(auto)))
        if auto.cooldown_s:
            cooldown = format_duration(auto.cooldown_s)
            rows.append(("cooldown", f"no resume within {cooldown} of a rollback, unless forced"))
        checks = _checks(auto.checks)
        rows += [("checks" if i == 0 else "", check) for i, check in enumerate(checks)]
    rows += [
        (
            "notify" if i == 0 else "",
            f"{hook.format} webhook {hook.shown}; {hook.retries} retries from "
            f"{format_duration(hook.backoff_s)}, {format_duration(hook.timeout_s)} each",
        )
        for i, hook in enumerate(route.notify)
    ]
    return [f"{INDENT}{route.name}"] + [_row(label, text, INDENT * 2) for label, text in rows]


def _match(match: Match) -> str:
    models = ", ".join(sorted(match.models)) if match.models else "any"
    return f"path prefix {match.path_prefix}, model {models}"


def _variants(route: Route) -> str:
    def side(variant: Variant) -> str:
        model = route.model_rewrite.get(variant)
        suffix = f" (model {model})" if model else ""
        return f"{variant} {route.backend_of(variant)}{suffix}"

    return f"{side(Variant.STABLE)} -> {side(Variant.CANARY)}"


def _weight(route: Route) -> str:
    ab = route.rollout.ab
    if ab is not None:
        return f"{route.rollout.weight:g}% canary (A/B test for {format_duration(ab.duration_s)})"
    mode = "auto" if route.rollout.auto is not None else "manual"
    return f"{route.rollout.weight:g}% canary ({mode})"


def _cohort(cohort: Cohort) -> str:
    parts = [f"include {_rules(cohort.include)}"] if cohort.include else []
    parts += [f"exclude {_rules(cohort.exclude)}"] if cohort.exclude else []
    return "; ".join(parts)


def _rules(rules: Iterable[CohortRule]) -> str:
    return " or ".join(
        f"{rule.source.spec} in [{', '.join(sorted(rule.values))}]" for rule in rules
    )


def _schedule(schedule: Schedule) -> str:
    windows = ", ".join(window.text for window in schedule.windows)
    return f"{windows} {schedule.timezone} ({schedule.mode})"


def _ab(ab: AbTest) -> str:
    return (
        f"a fixed split for {format_duration(ab.duration_s)}, then complete; guard judged every "
        f"{format_duration(ab.interval_s)}, {ab.failure_limit} failures stop it (weight 0); "
        f"confidence {ab.confidence:g}"
    )


def _steps(auto: AutoRollout) -> str:
    steps = " > ".join(
        f"{step:g} (pause {format_duration(auto.pause_s(i))})" if auto.pause_s(i) else f"{step:g}"
        for i, step in enumerate(auto.steps)
    )
    return f"steps {steps} %, judged every {format_duration(auto.interval_s)}"


def _verdicts(auto: AutoRollout) -> str:
    return (
        f"{auto.pass_intervals} passes on {auto.min_requests}+ canary requests step up, "
        f"{auto.failure_limit} failures {auto.on_failure}; confidence {auto.confidence:g}"
    )


def _checks(checks: Checks) -> list[str]:
    parts = [f"{name.replace('_', ' ')} {_error_rate(check)}" for name, check in checks.rates()]
    for name, check in checks.quantiles():
        metric, quantile = QUANTILE_CHECKS[name]
        parts.append(f"p{round(quantile * 100)} {metric} {_latency(check)}")
    for name, ratio in checks.ratios():
        parts.append(f"{name.replace('_', ' ')} <= {ratio.max:g}x stable")
    return parts or ["none (steps up on request count alone)"]


def _error_rate(check: ErrorRateCheck) -> str:
    limits = [f"<= {check.max:g}"] if check.max is not None else []
    limits += [f"<= stable + {check.max_increase:g}"] if check.max_increase is not None else []
    return ", ".join(limits)


def _latency(check: LatencyCheck) -> str:
    limits = [f"<= {format_duration(check.max_s)}"] if check.max_s is not None else []
    limits += [f"<= {check.max_ratio:g}x stable"] if check.max_ratio is not None else []
    return ", ".join(limits)


def _telemetry(telemetry: TelemetryConfig) -> str:
    # Unset keys show their defaults; OTEL_* variables may set them when the proxy runs.
    otlp = "OTLP/gRPC" if telemetry.otlp_protocol is OtlpProtocol.GRPC else "OTLP"
    export = f"{otlp} to {telemetry.otlp_endpoint}" if telemetry.otlp_endpoint else "no OTLP export"
    metrics = "/metrics on" if telemetry.prometheus else "/metrics off"
    ratio = 1.0 if telemetry.trace_sample_ratio is None else telemetry.trace_sample_ratio
    text = (
        f"service {telemetry.service_name or 'canary-proxy'}, {export}, sample {ratio:g}, {metrics}"
    )
    if telemetry.log_format is not LogFormat.TEXT:
        text += f", {telemetry.log_format} logs"
    if telemetry.access_log:
        text += f", access log {telemetry.access_log:g}"
    return text


def _state(state: StateConfig) -> str:
    if state.store is StateStoreKind.REDIS:
        if state.cluster:
            return f"redis cluster, nodes found from {_redacted_url(state.url or '')}"
        return f"redis {_redacted_url(state.url or '')}"
    return f"sqlite {state.path}"


def _redacted_url(url: str) -> str:
    # The parser rejects credentials in the URL; this is a second guard for the screen.
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url
