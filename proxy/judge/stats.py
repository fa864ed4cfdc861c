"""What backend attempts did, per route and variant, over any recent window. Pure.

Each attempt lands in the current time slice of its route and variant: a count,
errors by type, a latency histogram, a time-to-first-token histogram (streams only)
and output tokens. Any window is the sum of its slices, and slices from several
processes add up the same way (histograms merge exactly), so the status page and the
rollout judge read the numbers of all workers and replicas as one.

Rules:
1. An error is what SPEC §5 counts as a backend error: a connection failure, a
   timeout, a reset, a 5xx or 429, a stream cut before its end. A fallen-back canary
   attempt is a canary error.
2. A client that went away before the answer ended says nothing about the backend:
   such attempts are not recorded here (the metrics count them as cancelled).
3. Slices older than the retention are dropped as new ones start.
4. Times are wall-clock epoch seconds, so slice numbers mean the same instant in every
   process and survive a restart.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from typing import Final

from proxy.judge.histogram import LogHistogram

__all__ = ["RETENTION_S", "SLICE_S", "VariantStats", "WindowStats"]

SLICE_S: Final = 1.0
# The rollout controller adds each interval's slices to its own running totals, so
# slices need only outlive a judgement interval and the status page's window.
RETENTION_S: Final = 900.0


class VariantStats:
    """Counts and distributions for one variant over some span of time."""

    __slots__ = ("errors", "errors_by_type", "latency", "output_tokens", "requests", "ttft")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.errors_by_type: dict[str, int] = {}
        self.latency = LogHistogram()
        self.ttft = LogHistogram()
        self.output_tokens = 0

    def record(
        self,
        latency_s: float,
        ttft_s: float | None,
        error_type: str | None,
        output_tokens: int | None,
    ) -> None:
        self.requests += 1
        if error_type is not None:
            self.errors += 1
            self.errors_by_type[error_type] = self.errors_by_type.get(error_type, 0) + 1
        self.latency.record(latency_s)
        if ttft_s is not None:
            self.ttft.record(ttft_s)
        if output_tokens:
            self.output_tokens += output_tokens

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VariantStats):
            return NotImplemented
        return self.to_mapping() == other.to_mapping()

    __hash__ = None  # type: ignore[assignment]  # mutable: equal by value, not hashable

    def merge(self, other: VariantStats) -> None:
        self.requests += other.requests
        self.errors += other.errors
        for error_type, count in other.errors_by_type.items():
            self.errors_by_type[error_type] = self.errors_by_type.get(error_type, 0) + count
        self.latency.merge(other.latency)
        self.ttft.merge(other.ttft)
        self.output_tokens += other.output_tokens

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def summary(self) -> dict[str, object]:
        """The figures the status page shows (seconds; None where there is no data)."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "errors_by_type": dict(sorted(self.errors_by_type.items())),
            "latency_s": {
                "p50": self.latency.quantile(0.5),
                "p95": self.latency.quantile(0.95),
                "p99": self.latency.quantile(0.99),
            },
            "ttft_s": {"p50": self.ttft.quantile(0.5), "p95": self.ttft.quantile(0.95)},
            "output_tokens": self.output_tokens,
        }

    def to_mapping(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "errors_by_type": dict(self.errors_by_type),
            "latency": self.latency.to_mapping(),
            "ttft": self.ttft.to_mapping(),
            "output_tokens": self.output_tokens,
        }

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> VariantStats:
        stats = cls()
        requests, errors, tokens = data["requests"], data["errors"], data["output_tokens"]
        by_type, latency, ttft = data["errors_by_type"], data["latency"], data["ttft"]
        assert isinstance(requests, int)
        assert isinstance(errors, int)
        assert isinstance(tokens, int)
        assert isinstance(by_type, Mapping)
        assert isinstance(latency, Mapping)
        assert isinstance(ttft, Mapping)
        stats.requests, stats.errors, stats.output_tokens = requests, errors, tokens
        stats.errors_by_type = {str(k): int(v) for k, v in by_type.items()}
        stats.latency = LogHistogram.from_mapping(latency)
        stats.ttft = LogHistogram.from_mapping(ttft)
        return stats


class WindowStats:
    """Time-sliced `VariantStats` per (route, variant)."""

    def __init__(self, slice_s: float = SLICE_S, retention_s: float = RETENTION_S) -> None:
        self.slice_s = slice_s
        self._keep = max(1, int(retention_s / slice_s))
        self._rings: dict[tuple[str, str], deque[tuple[int, VariantStats]]] = {}

    def keep_for(self, retention_s: float) -> None:
        """Hold slices this long from now on (at least a judgement interval, twice over)."""
        self._keep = max(1, int(retention_s / self.slice_s))

    @property
    def retention_s(self) -> float:
        return self._keep * self.slice_s

    def record(
        self,
        route: str,
        variant: str,
        now: float,
        latency_s: float,
        ttft_s: float | None,
        error_type: str | None,
        output_tokens: int | None,
    ) -> None:
        self.slice_for(route, variant, now).record(latency_s, ttft_s, error_type, output_tokens)

    def slice_for(self, route: str, variant: str, now: float) -> VariantStats:
        """The current slice of a route's variant, started if need be."""
        index = int(now // self.slice_s)
        ring = self._rings.get((route, variant))
        if ring is None:
            ring = self._rings[(route, variant)] = deque()
        if not ring or ring[-1][0] != index:
            ring.append((index, VariantStats()))
            while ring[0][0] <= index - self._keep:
                ring.popleft()
        return ring[-1][1]

    def window(self, route: str, variant: str, since: float, until: float) -> VariantStats:
        """The sum of the slices that overlap [since, until]."""
        return self.between(route, variant, self.slice_of(since), self.slice_of(until))

    def between(self, route: str, variant: str, first: int, last: int) -> VariantStats:
        """The sum of the slices numbered `first` to `last`, both included."""
        total = VariantStats()
        for index, stats in self._rings.get((route, variant), ()):
            if first <= index <= last:
                total.merge(stats)
        return total

    def slice_of(self, epoch_s: float) -> int:
        return int(epoch_s // self.slice_s)

    def slices(self) -> Iterator[tuple[str, str, int, VariantStats]]:
        """Every slice held: (route, variant, slice index, stats)."""
        for (route, variant), ring in self._rings.items():
            for index, stats in ring:
                yield route, variant, index, stats
