"""The configuration: YAML (SPEC §3) parsed and validated whole into a frozen `Config`.

The pieces, from the outside in:

- **parse** (`proxy.config.parse`): `parse_config` / `load_config`, text or file to
  `Config`, or one `ConfigError` listing every problem as `path: message`; the
  top-level sections, backends, telemetry and state.
- **routes** / **rollout** (`proxy.config.routes`, `proxy.config.rollout`): the
  `routes` section, and each route's `rollout` policy.
- **grammar** (`proxy.config.grammar`): the small string grammars, pure functions
  (durations, listen addresses, key sources such as `header:x-user-id`, schedule
  windows such as `Mon-Fri 09:00-18:00`).
- **reader** (`proxy.config.reader`): walks the YAML tree, tracks the path, collects problems.
- **yaml_tree** (`proxy.config.yaml_tree`): safe YAML loading that also reports duplicate keys,
  with `${VAR}` references substituted (`proxy.config.interpolate`).
- **model** (`proxy.config.model`): the frozen records, one per section.
- **summary** (`proxy.config.summary`): the one-screen text `canary-proxy check` prints.
- **schema** (`proxy.config.schema`): the JSON Schema of the file, from the model.

Secrets never live in the file: it names environment variables (`api_key_env`,
`token_env`, a webhook's `url_env`), whose values are read at parse time and never
printed; what an unset one means is the caller's choice (`EnvSecrets`).
"""

from proxy.config.model import (
    AdminConfig,
    Anonymous,
    AutoRollout,
    Backend,
    BackendApi,
    Checks,
    Cohort,
    CohortRule,
    Config,
    ErrorRateCheck,
    KeyKind,
    KeySource,
    LatencyCheck,
    Limits,
    ListenAddress,
    LogFormat,
    Match,
    Network,
    OnFailure,
    OtlpProtocol,
    Rollout,
    Route,
    Schedule,
    ScheduleMode,
    StateConfig,
    StateStoreKind,
    Sticky,
    TelemetryConfig,
    Timeouts,
    TimeWindow,
    Variant,
    Webhook,
    WebhookFormat,
)
from proxy.config.parse import (
    EnvSecrets,
    content_version,
    load_config,
    parse_config,
    parse_key_source,
)
from proxy.config.summary import summarize
from proxy.errors import ConfigError

__all__ = [
    "AdminConfig",
    "Anonymous",
    "AutoRollout",
    "Backend",
    "BackendApi",
    "Checks",
    "Cohort",
    "CohortRule",
    "Config",
    "ConfigError",
    "EnvSecrets",
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
    "content_version",
    "load_config",
    "parse_config",
    "parse_key_source",
    "summarize",
]
