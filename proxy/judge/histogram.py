"""A log-bucketed histogram of durations: cheap to record, exact to merge, good to 4.4%.

Bucket `i` holds values in (2^(i/8), 2^((i+1)/8)] seconds: eight buckets per doubling,
each 9% wide, so any quantile read from it is within 4.4% of the true one. The
buckets are OpenTelemetry's exponential histogram at scale 3 (upper bounds
inclusive, as Prometheus's `le`), and every power of two is a bucket boundary, so the
exported histograms (`le` = powers of two) are read from it exactly.

Rules:
1. Recording is O(1): one log2 and one dict increment.
2. Histograms merge by adding counts, so the stats of several workers or replicas
   combine into exactly the histogram of their traffic together.
3. Values at or below `_FLOOR_S` (1 µs) count in the lowest bucket, with their sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

__all__ = ["EXPORT_BOUNDS_S", "SCALE", "LogHistogram"]

SCALE: Final = 3  # OpenTelemetry exponential histogram scale: 2^SCALE buckets per doubling
_PER_DOUBLING: Final = 1 << SCALE
_FLOOR_S: Final = 1e-6
_FLOOR_INDEX: Final = math.ceil(math.log2(_FLOOR_S) * _PER_DOUBLING) - 1
# Bounds of the exported (Prometheus / OTLP explicit) histograms: powers of two from
# 1/256 s (3.9 ms) to 512 s, past the 300 s an LLM generation may take.
EXPORT_BOUNDS_S: Final[tuple[float, ...]] = tuple(2.0**e for e in range(-8, 10))


class LogHistogram:
    """Counts of durations in seconds by log bucket, with their count and sum."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.sum = 0.0

    def record(self, value_s: float) -> None:
        index = (
            math.ceil(math.log2(value_s) * _PER_DOUBLING) - 1
            if value_s > _FLOOR_S
            else _FLOOR_INDEX
        )
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + 1
        self.count += 1
        self.sum += value_s

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LogHistogram):
            return NotImplemented
        return (self.buckets, self.count, self.sum) == (other.buckets, other.count, other.sum)

    __hash__ = None  # type: ignore[assignment]  # mutable: equal by value, not hashable

    def merge(self, other: LogHistogram) -> None:
        buckets = self.buckets
        for index, count in other.buckets.items():
            buckets[index] = buckets.get(index, 0) + count
        self.count += other.count
        self.sum += other.sum

    @classmethod
    def merged(cls, histograms: Iterable[LogHistogram]) -> LogHistogram:
        total = cls()
        for histogram in histograms:
            total.merge(histogram)
        return total

    def quantile(self, q: float) -> float | None:
        """The value below which a share `q` of the recorded values fall; None when empty.

        The answer is interpolated geometrically inside its bucket.
        """
        if self.count == 0:
            return None
        rank = q * self.count
        seen = 0
        for index in sorted(self.buckets):
            count = self.buckets[index]
            if seen + count >= rank:
                within = (rank - seen) / count if count else 0.0
                return float(2.0 ** ((index + within) / _PER_DOUBLING))
            seen += count
        return float(2.0 ** ((max(self.buckets) + 1) / _PER_DOUBLING))

    def cumulative(self, bounds: Sequence[float]) -> list[int]:
        """Counts at or below each bound (`le`), for bounds that are powers of two."""
        edges = [round(math.log2(bound) * _PER_DOUBLING) for bound in bounds]
        out = [0] * len(bounds)
        for index, count in self.buckets.items():
            # Bucket `index` ends at 2^((index+1)/8): it is under every edge >= index+1.
            for position, edge in enumerate(edges):
                if index + 1 <= edge:
                    out[position] += count
                    break
        running = 0
        for position, value in enumerate(out):
            running += value
            out[position] = running
        return out

    def to_mapping(self) -> dict[str, object]:
        """A plain form for JSON (the state store and the fleet merge it)."""
        return {
            "buckets": {str(i): c for i, c in self.buckets.items()},
            "count": self.count,
            "sum": self.sum,
        }

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> LogHistogram:
        histogram = cls()
        buckets = data.get("buckets", {})
        assert isinstance(buckets, Mapping)
        histogram.buckets = {int(i): int(c) for i, c in buckets.items()}
        count, total = data.get("count", 0), data.get("sum", 0.0)
        assert isinstance(count, int)
        assert isinstance(total, int | float)
        histogram.count = count
        histogram.sum = float(total)
        return histogram
