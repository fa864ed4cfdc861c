"""What requests and decisions did, recorded once and shown as stats, metrics and spans.

- **recorder** (`proxy.telemetry.recorder`): the one owner of the telemetry state, fed
  by the request path and the controller; everything else reads snapshots of it.
- **settings** (`proxy.telemetry.settings`): what to export where, from the config's
  `telemetry:` keys and the standard OTEL_* variables; pure.
- **tracing**, **metrics** (`proxy.telemetry.*`): the sampling decision, spans as the
  SDK's `ReadableSpan`, and pre-aggregated instruments read as snapshots and as the
  SDK's `MetricsData` (SPEC §8); pure.
- **export** (`proxy.telemetry.export`): the OpenTelemetry SDK pipeline (TracerProvider,
  BatchSpanProcessor, OTLP exporters over HTTP or gRPC) in the background.
- **prometheus**, **exposition** (`proxy.telemetry.*`): `/metrics` through
  prometheus_client, and several workers' as one.
"""
