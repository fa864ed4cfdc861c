"""`GET /metrics`: metric snapshots through prometheus_client, in the format asked for.

Rules:
1. A custom collector turns a `proxy.telemetry.metrics.Snapshot` into metric families;
   prometheus_client writes them: counters with `_total` (in the TYPE line of the
   classic text format, as parsers expect), histograms with `_bucket`/`_sum`/`_count`,
   label names with dots as underscores.
2. Content negotiation: `Accept: application/openmetrics-text` gets OpenMetrics,
   where histogram buckets carry exemplars (the trace and span id of a sampled
   request); anything else gets the classic text format 0.0.4.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar, Sample

from proxy.telemetry.metrics import Kind, Point, Series, Snapshot

__all__ = ["SnapshotCollector", "exposition", "render"]


class SnapshotCollector:
    """A prometheus_client collector over the snapshots `take` returns."""

    def __init__(self, take: Callable[[], Snapshot]) -> None:
        self._take = take

    def collect(self) -> Iterator[Metric]:
        yield from families(self._take().series)


def families(series_list: Iterable[Series]) -> Iterator[Metric]:
    """One prometheus_client family per series; a point's labels are its own (an
    optional label, such as `error_type`, is absent where it has no value)."""
    for series in series_list:
        family = series.family
        name = family.prometheus
        metric = Metric(name, family.description, family.kind.value)
        samples = metric.samples
        for labels, value in series.points:
            given = {key.replace(".", "_"): text for key, text in labels}
            if isinstance(value, Point):
                samples.extend(_histogram(name, family.bounds, given, value))
            elif family.kind == Kind.COUNTER:
                samples.append(Sample(f"{name}_total", given, value))
            else:
                samples.append(Sample(name, given, value))
        yield metric


def _histogram(
    name: str, bounds: tuple[float, ...], labels: dict[str, str], point: Point
) -> Iterator[Sample]:
    for position, le in enumerate((*(repr(float(b)) for b in bounds), "+Inf")):
        count = float(point.cumulative[position] if position < len(bounds) else point.count)
        exemplar = None
        found = point.exemplars.get(position)
        if found is not None:
            value, at_ns, trace_id, span_id = found
            exemplar = Exemplar(
                {"trace_id": f"{trace_id:032x}", "span_id": f"{span_id:016x}"},
                value,
                at_ns / 1e9,
            )
        yield Sample(f"{name}_bucket", {**labels, "le": le}, count, None, exemplar)
    yield Sample(f"{name}_count", labels, float(point.count))
    yield Sample(f"{name}_sum", labels, point.sum)


def render(take: Callable[[], Snapshot], accept: str) -> tuple[bytes, str]:
    """The exposition body and its Content-Type for this `Accept` header (rule 2)."""
    return exposition(SnapshotCollector(take), accept)


def exposition(collector: Collector, accept: str) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
