"""One `/metrics` from several workers' own. Pure.

`run --workers N` answers `/metrics` for all its workers at once. Counters and
histograms of different processes cannot be told apart once summed (a restarted
worker's counters start again from zero), so each worker's samples keep their own
series, marked with a `worker` label, and each family is declared once. Queries sum
them (`sum without (worker) (...)`), as they would sum the pods of a Deployment.

Rules:
1. The supervisor asks each worker for OpenMetrics (`WORKER_ACCEPT`), which keeps
   counters' types and histograms' exemplars; it parses them with prometheus_client.
2. A family's description and type are the first worker's; its samples are every
   worker's, in worker order. The result is written in the format the scraper asked
   for, like a worker's own (`proxy.telemetry.prometheus`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy.telemetry.prometheus import exposition

__all__ = ["WORKER_ACCEPT", "merge_expositions"]

WORKER_ACCEPT = "application/openmetrics-text; version=1.0.0"


class _Merged:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merged_families(expositions: Iterable[tuple[str, str]]) -> list[Metric]:
    """Every worker's families from `(worker label, OpenMetrics text)` pairs, labelled."""
    families: dict[str, Metric] = {}
    for worker, text in expositions:
        for family in text_string_to_metric_families(text):  # type: ignore[no-untyped-call]
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            merged.samples.extend(
                Sample(
                    sample.name,
                    {"worker": worker, **sample.labels},
                    sample.value,
                    sample.timestamp,
                    sample.exemplar,
                )
                for sample in family.samples
            )
    return list(families.values())


def merge_expositions(
    expositions: Iterable[tuple[str, str]], accept: str = ""
) -> tuple[bytes, str]:
    """The merged exposition, and its Content-Type, for this `Accept` header."""
    return exposition(_Merged(merged_families(expositions)), accept)
