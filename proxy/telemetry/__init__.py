"""What requests and decisions did, recorded once and shown as stats, metrics and spans.

- **recorder** (`proxy.telemetry.recorder`): the one owner of the telemetry state, fed
  by the request path and the controller.
- **metrics**, **tracing**, **otlp_wire** (`proxy.telemetry.*`): the OpenTelemetry
  instruments and spans of SPEC §8, and their OTLP encoding; pure.
- **exporter** (`proxy.telemetry.exporter`): OTLP/HTTP export in the background.
- **exposition** (`proxy.telemetry.exposition`): several workers' Prometheus text as one.
"""
