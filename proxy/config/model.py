"""The validated configuration: frozen records, one per section of SPEC §3.

Rules:
1. Every record is immutable (`frozen=True, slots=True`, tuples and frozensets,
   never lists or dicts that could be changed in place).
2. A record that exists is valid: `proxy.config.parse` builds them only after
   checking every field, so nothing downstream re-validates.
3. Durations are floats in seconds and say so in their name (`interval_s`).
4. Secrets are held only as values read from the environment, never printed
   (`repr=False`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

__all__ = [
    "QUANTILE_CHECKS",
    "RATE_CHECKS",
    "RATIO_CHECKS",
    "AbTest",
    "AdminConfig",
    "Anonymous",
    "AutoRollout",
    "Backend",
    "BackendApi",
    "Checks",
    "Cohort",
    "CohortRule",
    "Config",
    "ErrorRateCheck",
    "KeyKind",
    "KeySource",
    "LatencyCheck",
    "Limits",
    "ListenAddress",
    "LogFormat",
    "Match",
    "Network",
    "OnFailure",
    "OtlpProtocol",
    "RatioCheck",
    "Rollout",
    "Route",
    "Schedule",
    "ScheduleMode",
    "StateConfig",
    "StateStoreKind",
    "Sticky",
    "TelemetryConfig",
    "TimeWindow",
    "Timeouts",
    "Variant",
    "Webhook",
    "WebhookFormat",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Variant(StrEnum):
    STABLE = "stable"
    CANARY = "canary"


class KeyKind(StrEnum):
    """Where a user key is read from (SPEC §3, key sources)."""

    HEADER = "header"
    BODY = "body"
    COOKIE = "cookie"
    QUERY = "query"
    AUTH = "auth"
    IP = "ip"


class BackendApi(StrEnum):
    """The API a backend speaks: how it takes its key, and its GenAI provider name."""

    OPENAI = "openai"  # also the Responses API, vLLM, SGLang and other OpenAI servers
    ANTHROPIC = "anthropic"
    LLAMACPP = "llamacpp"
    TGI = "tgi"
    OLLAMA = "ollama"

    @property
    def provider(self) -> str:
        """`gen_ai.provider.name`: the conventions' name where they have one."""
        return _PROVIDERS[self]


_PROVIDERS: Mapping[BackendApi, str] = {
    BackendApi.OPENAI: "openai",
    BackendApi.ANTHROPIC: "anthropic",
    BackendApi.LLAMACPP: "llama.cpp",
    BackendApi.TGI: "tgi",
    BackendApi.OLLAMA: "ollama",
}


class Anonymous(StrEnum):
    """What happens to a request that carries none of the route's keys."""

    RANDOM = "random"
    STABLE = "stable"


class ScheduleMode(StrEnum):
    ADVANCE = "advance"  # steps go up only inside a window; rollback any time
    SERVE = "serve"  # outside the windows the canary gets no traffic


class OnFailure(StrEnum):
    ROLLBACK = "rollback"
    HOLD = "hold"


class StateStoreKind(StrEnum):
    SQLITE = "sqlite"
    REDIS = "redis"


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class KeySource:
    """One place a user key may come from: `header:x-user-id`, `body:user`, `auth`, `ip`..."""

    kind: KeyKind
    name: str = ""  # header, field, cookie or query name; empty for auth and ip

    @property
    def spec(self) -> str:
        """The source as written in the config; also the `canary.key_source` attribute."""
        return f"{self.kind}:{self.name}" if self.name else str(self.kind)

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: ListenAddress = ListenAddress("127.0.0.1", 9090)
    token_env: str | None = None
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 10 * 1024 * 1024
    max_concurrency: int = 2048
    header_timeout_s: float = 10.0
    # The longest a client connection may sit idle between requests. Above the 60 s after
    # which load balancers in front drop an idle connection (AWS ALB, nginx's upstream
    # keepalive_timeout), so the proxy is not the side that closes one they reuse; 75 s
    # is nginx's own default.
    keepalive_timeout_s: float = 75.0
    # Request ids remembered for POST /v1/feedback (proxy.telemetry.feedback); 0: off.
    feedback_ids: int = 100_000


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float = 2.0
    first_byte_s: float = 60.0  # from sending the request to the first byte of the response body
    idle_s: float = 30.0  # the longest silence allowed inside a response body
    # The longest a request waits for a connection while all `max_connections` are busy;
    # then 503 pool_timeout with Retry-After.
    pool_s: float = 5.0
    # The longest an upgraded connection (a WebSocket session) may stay silent both ways;
    # a Realtime session waits on a person, so minutes, not the seconds of a stream.
    upgrade_idle_s: float = 300.0


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    url: str  # as written, without a trailing slash
    origin: str  # scheme://host:port
    base_path: str  # "" or "/something", prepended to every request path
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeouts: Timeouts = Timeouts()
    # An LLM stream holds its connection for its whole answer: room for a thousand at once.
    max_connections: int = 1024
    api: BackendApi = BackendApi.OPENAI


@dataclass(frozen=True, slots=True)
class Match:
    path_prefix: str = "/"
    models: frozenset[str] | None = None  # matched on the JSON body's "model"


@dataclass(frozen=True, slots=True)
class Sticky:
    keys: tuple[KeySource, ...]
    salt: str
    anonymous: Anonymous = Anonymous.RANDOM


@dataclass(frozen=True, slots=True)
class CohortRule:
    """A request matches when the value at `source` is one of `values`."""

    source: KeySource
    values: frozenset[str]


@dataclass(frozen=True, slots=True)
class Cohort:
    include: tuple[CohortRule, ...] = ()  # any match makes a request eligible; empty: all are
    exclude: tuple[CohortRule, ...] = ()  # any match keeps a request on stable


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Days of the week (0 = Monday) and a span of minutes; end <= start wraps midnight."""

    days: frozenset[int]
    start_minute: int
    end_minute: int
    text: str  # as written, for messages


@dataclass(frozen=True, slots=True)
class Schedule:
    timezone: str
    windows: tuple[TimeWindow, ...]
    mode: ScheduleMode = ScheduleMode.ADVANCE


@dataclass(frozen=True, slots=True)
class ErrorRateCheck:
    """A rate's limits: the error rate's, or the cancel rate's."""

    max: float | None = None  # absolute ceiling on the canary's rate
    max_increase: float | None = None  # ceiling on canary minus stable


@dataclass(frozen=True, slots=True)
class LatencyCheck:
    """A quantile's limits: of latency, time to first token or time per output token."""

    max_s: float | None = None  # absolute ceiling on the canary's quantile
    max_ratio: float | None = None  # ceiling on canary / stable


# The quantile checks: config key -> (what is measured, the quantile).
QUANTILE_CHECKS: Final[dict[str, tuple[str, float]]] = {
    f"{metric}_p{percent}": (metric, percent / 100)
    for metric in ("latency", "ttft", "tpot")
    for percent in (50, 95, 99)
}
RATE_CHECKS: Final = ("error_rate", "cancel_rate", "feedback_negative_rate")


@dataclass(frozen=True, slots=True)
class RatioCheck:
    """A limit on the canary's mean over stable's: output tokens per answer."""

    max: float  # canary mean / stable mean, at most this


# The checks of a ratio of means: config key -> what is measured.
RATIO_CHECKS: Final[dict[str, str]] = {"output_tokens_ratio": "tokens"}


@dataclass(frozen=True, slots=True)
class Checks:
    error_rate: ErrorRateCheck | None = None
    cancel_rate: ErrorRateCheck | None = None
    feedback_negative_rate: ErrorRateCheck | None = None
    latency_p50: LatencyCheck | None = None
    latency_p95: LatencyCheck | None = None
    latency_p99: LatencyCheck | None = None
    ttft_p50: LatencyCheck | None = None
    ttft_p95: LatencyCheck | None = None
    ttft_p99: LatencyCheck | None = None
    tpot_p50: LatencyCheck | None = None
    tpot_p95: LatencyCheck | None = None
    tpot_p99: LatencyCheck | None = None
    output_tokens_ratio: RatioCheck | None = None

    def rates(self) -> list[tuple[str, ErrorRateCheck]]:
        """The rate checks configured, by name, in the order of `RATE_CHECKS`."""
        found = ((name, getattr(self, name)) for name in RATE_CHECKS)
        return [(name, check) for name, check in found if check is not None]

    def quantiles(self) -> list[tuple[str, LatencyCheck]]:
        """The quantile checks configured, by name, in the order of `QUANTILE_CHECKS`."""
        found = ((name, getattr(self, name)) for name in QUANTILE_CHECKS)
        return [(name, check) for name, check in found if check is not None]

    def check_count(self) -> int:
        """How many checks are configured."""
        return len(self.rates()) + len(self.quantiles()) + len(self.ratios())

    def ratios(self) -> list[tuple[str, RatioCheck]]:
        """The ratio-of-means checks configured, by name, in the order of `RATIO_CHECKS`."""
        found = ((name, getattr(self, name)) for name in RATIO_CHECKS)
        return [(name, check) for name, check in found if check is not None]


# The only paths (by their end) a shadow request is sent for: LLM calls that may be
# asked twice without doing anything twice (OpenAI, Anthropic, and the native generate
# paths of TGI, Ollama and llama.cpp).
SHADOW_PATHS: Final = (
    "/chat/completions",
    "/completions",
    "/responses",
    "/messages",
    "/embeddings",
    "/generate",
    "/generate_stream",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/completion",
)


@dataclass(frozen=True, slots=True)
class AgreementCheck:
    """Shadow pairs whose answers agree: the same text when the request is deterministic
    (temperature 0), else words in common (Jaccard) at least `similarity`."""

    min: float  # the least share of comparable pairs that agree, 0-1
    similarity: float = 0.5  # 0-1


@dataclass(frozen=True, slots=True)
class LengthCheck:
    """Shadow pairs whose output token counts are within `max_ratio` of each other,
    either way."""

    max_ratio: float  # > 1
    max_share: float = 0.1  # the most of the comparable pairs that may be further apart, 0-1


@dataclass(frozen=True, slots=True)
class PairChecks:
    """What only shadow pairs can tell, beside the route's `checks`."""

    agreement: AgreementCheck | None = None
    output_length: LengthCheck | None = None


@dataclass(frozen=True, slots=True)
class Shadow:
    """The shadow phase before the first step: a share of stable's requests is also sent
    to the canary, whose answers are judged against stable's and thrown away."""

    share: float = 0.05  # of stable's eligible requests, 0-1 (sticky by user)
    duration_s: float = 1800.0  # the least time in shadow before steps[0]
    max_concurrency: int = 8  # shadow requests in flight at once, per process
    queue: int = 64  # shadow requests waiting for a turn, per process; more are dropped
    never_tools: tuple[str, ...] = ()  # a request offering any of these tools is never sent
    checks: PairChecks = PairChecks()  # judged on the pairs, beside the route's checks


@dataclass(frozen=True, slots=True)
class AutoRollout:
    steps: tuple[float, ...]
    interval_s: float = 30.0
    min_requests: int = 100
    pass_intervals: int = 2
    failure_limit: int = 2
    on_failure: OnFailure = OnFailure.ROLLBACK
    confidence: float = 0.95
    checks: Checks = Checks()
    # Per step, how long the rollout waits there before a step may go up (0: not at
    # all); empty when no step pauses. Kept beside `steps`, which stay plain weights.
    step_pauses_s: tuple[float, ...] = ()
    cooldown_s: float = 0.0  # after a rollback, a resume is refused this long unless forced
    # > 0: not a ramp but an A/B test of this length at the one step (`rollout.ab`); the
    # controller never moves its weight, and its checks are a guard that stops it.
    ab_duration_s: float = 0.0

    @property
    def is_ab(self) -> bool:
        return self.ab_duration_s > 0

    shadow: Shadow | None = None  # a shadow phase before steps[0]; None: none

    def pause_s(self, step: int) -> float:
        """The pause of step `step` (an index into `steps`); 0 below the first."""
        if 0 <= step < len(self.step_pauses_s):
            return self.step_pauses_s[step]
        return 0.0


@dataclass(frozen=True, slots=True)
class AbTest:
    """`rollout.ab`: a fixed split at `rollout.weight` for `duration`, then a report."""

    duration_s: float
    interval_s: float = 30.0  # how often the guard judges, and the end is looked for
    confidence: float = 0.95  # of the guard, and of the report's intervals
    failure_limit: int = 2  # failing guard judgements in a row that stop the test
    guard: Checks = Checks()  # gross limits: a canary beyond one is stopped (weight 0)

    def policy(self, weight: float) -> AutoRollout:
        """The controller's policy for it: one step at the weight, judged by the guard."""
        return AutoRollout(
            steps=(weight,),
            interval_s=self.interval_s,
            failure_limit=self.failure_limit,
            confidence=self.confidence,
            checks=self.guard,
            ab_duration_s=self.duration_s,
        )


@dataclass(frozen=True, slots=True)
class Rollout:
    weight: float = 0.0  # canary percent, 0-100, at most two decimals
    auto: AutoRollout | None = None  # with `ab`: that test's policy (`AbTest.policy`)
    ab: AbTest | None = None


class WebhookFormat(StrEnum):
    GENERIC = "generic"  # the decision as JSON, every field
    SLACK = "slack"  # a Slack incoming webhook's message: text and blocks


@dataclass(frozen=True, slots=True)
class Webhook:
    """Where a route's decisions are sent (`notify:`), and how hard to try."""

    # As written, or read from `url_env` (a Slack webhook's URL is itself a secret).
    url: str = field(default="", repr=False)
    url_env: str | None = None
    format: WebhookFormat = WebhookFormat.GENERIC
    timeout_s: float = 5.0  # per attempt
    retries: int = 3  # attempts after the first
    backoff_s: float = 1.0  # before the first retry; doubled before each next one

    @property
    def shown(self) -> str:
        """Where it goes, as logs and summaries show it: never a secret URL's path."""
        scheme, _, rest = self.url.partition("://")
        host = rest.split("/", 1)[0]
        if self.url_env is not None:
            return f"{scheme}://{host}/... (${self.url_env})"
        return self.url


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: Match
    stable: str  # backend name
    canary: str  # backend name
    sticky: Sticky
    model_rewrite: Mapping[Variant, str] = field(default_factory=dict)
    override_header: str | None = None
    cohort: Cohort | None = None
    schedule: Schedule | None = None
    fallback_to_stable: bool = False
    rollout: Rollout = Rollout()
    notify: tuple[Webhook, ...] = ()

    def backend_of(self, variant: Variant) -> str:
        return self.canary if variant is Variant.CANARY else self.stable


class OtlpProtocol(StrEnum):
    GRPC = "grpc"
    HTTP_PROTOBUF = "http/protobuf"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """The `telemetry:` section. A key left unset (None) lets the standard OTEL_*
    variable decide (proxy.telemetry.settings)."""

    service_name: str | None = None
    otlp_endpoint: str | None = None
    otlp_protocol: OtlpProtocol | None = None
    trace_sample_ratio: float | None = None
    prometheus: bool = True
    log_format: LogFormat = LogFormat.TEXT
    access_log: float = 0.0  # the share of requests logged, one line each; 0: none


@dataclass(frozen=True, slots=True)
class StateConfig:
    store: StateStoreKind = StateStoreKind.SQLITE
    path: str = "canary-state.db"
    url: str | None = None
    cluster: bool = False  # url names a node of a Redis Cluster (or Valkey in cluster mode)


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, valid configuration. `version` is the content hash of the file it came from."""

    backends: Mapping[str, Backend]
    routes: tuple[Route, ...]
    listen: ListenAddress = ListenAddress("0.0.0.0", 8080)
    admin: AdminConfig = AdminConfig()
    limits: Limits = Limits()
    trusted_proxies: tuple[Network, ...] = ()
    shutdown_grace_s: float = 30.0
    telemetry: TelemetryConfig = TelemetryConfig()
    state: StateConfig = StateConfig()
    version: str = ""  # the file's content hash
    fleet_version: str = ""  # the hash of what a fleet shares (proxy.config.fleet)
    source: str = ""  # the file it was read from, for messages
    warnings: tuple[str, ...] = ()  # `path: message` of what is fine to check, not to run

    def route(self, name: str) -> Route | None:
        return next((r for r in self.routes if r.name == name), None)
