"""What telemetry does, from the config's `telemetry:` keys and the standard OTEL_* variables. Pure.

OpenTelemetry users configure every program the same way, through the environment
(the SDK's "general" and "OTLP exporter" variables); the proxy honours those, and the
config's `telemetry:` keys win where they are set.

Rules:
1. `OTEL_SDK_DISABLED=true` turns the SDK off: no spans, no OTLP export. `/metrics`
   (Prometheus, not the SDK) stays as the config says.
2. A signal (traces, metrics) is exported when an endpoint is known for it: the
   config's `otlp_endpoint`, else `OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT`, else
   `OTEL_EXPORTER_OTLP_ENDPOINT`; and `OTEL_{TRACES,METRICS}_EXPORTER` is not `none`.
3. The protocol is the config's `otlp_protocol`, else the signal's
   `OTEL_EXPORTER_OTLP_*_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`, else
   `http/protobuf`. Headers, compression, certificates and timeouts are read by the
   SDK's exporters themselves from their variables.
4. Sampling: the config's `trace_sample_ratio`, when set, means a parent-based ratio
   sampler at that ratio; else `OTEL_TRACES_SAMPLER` (`always_on`, `always_off`,
   `traceidratio`, `parentbased_always_on`, `parentbased_always_off`,
   `parentbased_traceidratio`) with `OTEL_TRACES_SAMPLER_ARG`; else parent-based at 1.0.
5. A value that cannot be used is named in `problems` and its default applies; the
   proxy logs them when it starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final
from urllib.parse import unquote

from proxy.config.model import OtlpProtocol, TelemetryConfig

__all__ = [
    "DEFAULT_SERVICE_NAME",
    "METRIC_INTERVAL_S",
    "Sampling",
    "Signal",
    "SignalKind",
    "TelemetrySettings",
    "resolve",
]

DEFAULT_SERVICE_NAME: Final = "canary-proxy"
METRIC_INTERVAL_S: Final = 10.0  # without OTEL_METRIC_EXPORT_INTERVAL (the SDK's is 60 s)
_HTTP_PATHS: Final = {"traces": "v1/traces", "metrics": "v1/metrics"}
_SAMPLERS: Final = {
    # name: (parent based, root ratio; None: OTEL_TRACES_SAMPLER_ARG's)
    "always_on": (False, 1.0),
    "always_off": (False, 0.0),
    "traceidratio": (False, None),
    "parentbased_always_on": (True, 1.0),
    "parentbased_always_off": (True, 0.0),
    "parentbased_traceidratio": (True, None),
}


class SignalKind(StrEnum):
    TRACES = "traces"
    METRICS = "metrics"


@dataclass(frozen=True, slots=True)
class Sampling:
    """Which new requests are traced: OpenTelemetry's `ParentBased(TraceIdRatioBased(ratio))`,
    or without `parent_based`, `TraceIdRatioBased(ratio)` alone."""

    ratio: float = 1.0
    parent_based: bool = True


@dataclass(frozen=True, slots=True)
class Signal:
    """Where one signal goes. `endpoint` is what the SDK exporter is given: None lets it
    read its own variables; `shown` is the resolved address, for the status page."""

    kind: SignalKind
    protocol: OtlpProtocol
    endpoint: str | None
    shown: str


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    service_name: str = DEFAULT_SERVICE_NAME
    traces: Signal | None = None
    metrics: Signal | None = None
    sampling: Sampling = Sampling()
    metric_interval_s: float = METRIC_INTERVAL_S
    disabled: bool = False
    problems: tuple[str, ...] = ()

    @property
    def tracing(self) -> bool:
        return self.traces is not None


def resolve(config: TelemetryConfig, environ: Mapping[str, str]) -> TelemetrySettings:
    """The telemetry a process runs with (rules 1-5)."""
    problems: list[str] = []
    disabled = _flag(environ, "OTEL_SDK_DISABLED", problems)
    service_name = config.service_name or _env_service_name(environ) or DEFAULT_SERVICE_NAME
    if disabled:
        return TelemetrySettings(service_name, disabled=True, problems=tuple(problems))
    return TelemetrySettings(
        service_name=service_name,
        traces=_signal(SignalKind.TRACES, config, environ, problems),
        metrics=_signal(SignalKind.METRICS, config, environ, problems),
        sampling=_sampling(config, environ, problems),
        metric_interval_s=_interval(environ, problems),
        problems=tuple(problems),
    )


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def _flag(environ: Mapping[str, str], name: str, problems: list[str]) -> bool:
    value = _env(environ, name)
    if value is None:
        return False
    if value.lower() not in ("true", "false"):
        problems.append(f"{name}={value!r} is neither true nor false; taken as false")
    return value.lower() == "true"


def _env_service_name(environ: Mapping[str, str]) -> str | None:
    """OTEL_SERVICE_NAME, else `service.name` of OTEL_RESOURCE_ATTRIBUTES."""
    name = _env(environ, "OTEL_SERVICE_NAME")
    if name is not None:
        return name
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "service.name" and value.strip():
            return unquote(value.strip())
    return None


def _signal(
    kind: SignalKind, config: TelemetryConfig, environ: Mapping[str, str], problems: list[str]
) -> Signal | None:
    upper = kind.value.upper()
    exporter = _env(environ, f"OTEL_{upper}_EXPORTER")
    if exporter is not None and exporter.lower() == "none":
        return None
    if exporter is not None and exporter.lower() != "otlp":
        problems.append(f"OTEL_{upper}_EXPORTER={exporter!r}: only otlp and none are supported")
    protocol = config.otlp_protocol or _protocol(environ, upper, problems)
    if config.otlp_endpoint is not None:
        base = config.otlp_endpoint.rstrip("/")
        if protocol is OtlpProtocol.GRPC:
            return Signal(kind, protocol, base, base)
        url = f"{base}/{_HTTP_PATHS[kind.value]}"
        return Signal(kind, protocol, url, url)
    own = _env(environ, f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT")
    general = _env(environ, "OTEL_EXPORTER_OTLP_ENDPOINT")
    if own is None and general is None:
        return None
    if own is not None:
        shown = own
    elif protocol is OtlpProtocol.GRPC:
        shown = general or ""
    else:
        shown = f"{(general or '').rstrip('/')}/{_HTTP_PATHS[kind.value]}"
    return Signal(kind, protocol, None, shown)


def _protocol(environ: Mapping[str, str], upper: str, problems: list[str]) -> OtlpProtocol:
    for name in (f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = _env(environ, name)
        if value is None:
            continue
        try:
            return OtlpProtocol(value.lower())
        except ValueError:
            problems.append(f"{name}={value!r}: only grpc and http/protobuf are supported")
            return OtlpProtocol.HTTP_PROTOBUF
    return OtlpProtocol.HTTP_PROTOBUF


def _sampling(config: TelemetryConfig, environ: Mapping[str, str], problems: list[str]) -> Sampling:
    if config.trace_sample_ratio is not None:
        return Sampling(config.trace_sample_ratio, parent_based=True)
    name = _env(environ, "OTEL_TRACES_SAMPLER")
    if name is None:
        return Sampling()
    known = _SAMPLERS.get(name.lower())
    if known is None:
        problems.append(
            f"OTEL_TRACES_SAMPLER={name!r} is not one of {', '.join(_SAMPLERS)}; "
            "using parentbased_always_on"
        )
        return Sampling()
    parent_based, ratio = known
    if ratio is None:
        ratio = _sampler_arg(environ, problems)
    return Sampling(ratio, parent_based)


def _sampler_arg(environ: Mapping[str, str], problems: list[str]) -> float:
    value = _env(environ, "OTEL_TRACES_SAMPLER_ARG")
    if value is None:
        return 1.0
    try:
        ratio = float(value)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        problems.append(f"OTEL_TRACES_SAMPLER_ARG={value!r} is not a ratio in [0, 1]; using 1.0")
        return 1.0
    return ratio


def _interval(environ: Mapping[str, str], problems: list[str]) -> float:
    value = _env(environ, "OTEL_METRIC_EXPORT_INTERVAL")
    if value is None:
        return METRIC_INTERVAL_S
    try:
        millis = float(value)
    except ValueError:
        millis = 0.0
    if millis <= 0:
        problems.append(
            f"OTEL_METRIC_EXPORT_INTERVAL={value!r} is not a positive number of milliseconds; "
            f"using {METRIC_INTERVAL_S:g} s"
        )
        return METRIC_INTERVAL_S
    return millis / 1000.0
