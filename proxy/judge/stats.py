"""What backend attempts did, per route and variant, over any recent window. Pure.

Each attempt lands in the current time slice of its route and variant: a count,
errors by type, cancellations, a latency histogram, a time-to-first-token histogram
(streams only), a time-per-output-token histogram (streams of two tokens or more),
output tokens, the user feedback given on the variant's answers, and per user cluster
a few sums the judge needs to tell a regression from one user's bad luck. Any window is
the sum of its slices, and slices from several processes add up the same way
(histograms and sums merge exactly), so the status page and the rollout judge read the
numbers of all workers and replicas as one.

Rules:
1. An error is what SPEC §5 counts as a backend error: a connection failure, a
   timeout, a reset, a 5xx or 429, a stream cut before its end. A fallen-back canary
   attempt is a canary error.
2. A client that went away before the answer ended is a *cancel*, not an error: it
   counts in `cancels`, and its latency is the time it was cancelled at, a lower bound
   of what the answer would have taken (a canary so slow that users give up shows as
   slow). It is not a trial of the error rate: nobody knows how it would have ended.
3. Users are clustered by their sticky bucket (`proxy.routing.assignment.bucket_of`)
   modulo `CLUSTERS`. A bucket is a hash of the user's key into 10,000 values: it names
   nobody and cannot be turned back into a key, and it fixes the user's variant, so a
   cluster never mixes the two variants at one weight. A request without a key gets a
   cluster of its own turn. Per cluster: requests, errors, cancels, and the sum and sum
   of squares of log latency.
4. Slices older than the retention are dropped as new ones start.
5. Times are wall-clock epoch seconds, so slice numbers mean the same instant in every
   process and survive a restart.
6. Feedback lands in the slice of when it came, not of the request it rates. A slice
   written before a counter existed reads it as 0.
7. Output tokens per request and per second count only the answers, not cancelled,
   whose usage said how many tokens they had (an embedding, an error or a usage-less
   stream does not dilute them): `token_answers` of them, taking `token_seconds` in all,
   with `token_squares` the sum of each one's count squared (how much answers' lengths
   vary, which the judge's `output_tokens_ratio` check and the report need), and
   `token_seconds_squares` and `token_cross` the sums of each one's time squared and of
   its count times its time (the report's interval of tokens per second).
8. A shadow pair (`proxy.http.shadow`) also counts, on its canary side, whether the two
   answers agreed and whether their lengths matched, each only when it could be told
   (`pairs`/`disagreements`, `length_pairs`/`length_mismatches`); slices without
   pairs carry none of these.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping
from enum import StrEnum
from typing import Final

from proxy.config.model import Variant
from proxy.judge.histogram import LogHistogram

__all__ = [
    "CLUSTERS",
    "RETENTION_S",
    "SLICE_S",
    "USER_CANCELS",
    "USER_ERRORS",
    "USER_LOG_SQUARES",
    "USER_LOG_SUM",
    "USER_REQUESTS",
    "Series",
    "ShadowSide",
    "VariantStats",
    "WindowStats",
]


class ShadowSide(StrEnum):
    """The two sides of the shadow pairs of a canary in its shadow phase
    (`proxy.http.shadow`), kept apart from the traffic the variants served."""

    CANARY = "shadow_canary"
    STABLE = "shadow_stable"


# What a route's stats are kept per: a variant's served traffic, or a side of its pairs.
Series = Variant | ShadowSide

# Rule 3: 64 clusters keep a slice's user sums within 320 numbers per variant, and
# are enough to estimate how much one user's requests hang together (the judge's
# design effect) to within about a fifth.
CLUSTERS: Final = 64
# The fields of a cluster's sums.
USER_REQUESTS: Final = 0
USER_ERRORS: Final = 1
USER_CANCELS: Final = 2
USER_LOG_SUM: Final = 3
USER_LOG_SQUARES: Final = 4
_USER_FIELDS: Final = 5
_FLOOR_S: Final = 1e-6

SLICE_S: Final = 1.0
# The rollout controller adds each interval's slices to its own running totals, so
# slices need only outlive a judgement interval and the status page's window.
RETENTION_S: Final = 900.0


class VariantStats:
    """Counts and distributions for one variant over some span of time."""

    __slots__ = (
        "cancels",
        "disagreements",
        "errors",
        "errors_by_type",
        "feedback",
        "feedback_negative",
        "latency",
        "length_mismatches",
        "length_pairs",
        "output_tokens",
        "pairs",
        "requests",
        "token_answers",
        "token_cross",
        "token_seconds",
        "token_seconds_squares",
        "token_squares",
        "tpot",
        "ttft",
        "users",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.errors_by_type: dict[str, int] = {}
        self.cancels = 0
        self.latency = LogHistogram()
        self.ttft = LogHistogram()
        self.tpot = LogHistogram()
        self.output_tokens = 0
        # cluster -> [requests, errors, cancels, sum of log latency, sum of its squares]
        self.users: dict[int, list[float]] = {}
        self.token_answers = 0  # answers whose usage gave an output token count (rule 7)
        self.token_seconds = 0.0  # the time those answers took, summed
        self.token_squares = 0.0  # their output tokens, each squared, summed
        self.token_seconds_squares = 0.0  # their times, each squared, summed
        self.token_cross = 0.0  # each one's tokens times its time, summed
        self.feedback = 0
        self.feedback_negative = 0
        # Shadow pairs (rule 8): whose answers could be compared, and did not agree; whose
        # output lengths could be compared, and did not match.
        self.pairs = 0
        self.disagreements = 0
        self.length_pairs = 0
        self.length_mismatches = 0

    def record(
        self,
        latency_s: float,
        ttft_s: float | None,
        error_type: str | None,
        output_tokens: int | None,
        cancelled: bool = False,
        user: int | None = None,
    ) -> None:
        """One attempt. `cancelled`: the client left first (rule 2; an error wins);
        `user`: the user's bucket, or any number standing for the user (rule 3)."""
        self.requests += 1
        cancel = cancelled and error_type is None
        if error_type is not None:
            self.errors += 1
            self.errors_by_type[error_type] = self.errors_by_type.get(error_type, 0) + 1
        elif cancel:
            self.cancels += 1
        self.latency.record(latency_s)
        if ttft_s is not None:
            self.ttft.record(ttft_s)
            if output_tokens is not None and output_tokens > 1 and not cancel:
                self.tpot.record(max(latency_s - ttft_s, 0.0) / (output_tokens - 1))
        if output_tokens is not None:
            self.output_tokens += output_tokens
            if not cancel:
                self.token_answers += 1
                self.token_seconds += latency_s
                self.token_squares += output_tokens * output_tokens
                self.token_seconds_squares += latency_s * latency_s
                self.token_cross += output_tokens * latency_s
        if user is not None:
            sums = self.users.get(user % CLUSTERS)
            if sums is None:
                sums = self.users[user % CLUSTERS] = [0.0] * _USER_FIELDS
            log_latency = math.log(latency_s if latency_s > _FLOOR_S else _FLOOR_S)
            sums[USER_REQUESTS] += 1
            sums[USER_LOG_SUM] += log_latency
            sums[USER_LOG_SQUARES] += log_latency * log_latency
            if error_type is not None:
                sums[USER_ERRORS] += 1
            elif cancel:
                sums[USER_CANCELS] += 1

    def record_pair(self, agreed: bool | None, length_matched: bool | None) -> None:
        """What a shadow pair's comparison found (None: it could not be told)."""
        if agreed is not None:
            self.pairs += 1
            self.disagreements += not agreed
        if length_matched is not None:
            self.length_pairs += 1
            self.length_mismatches += not length_matched

    def record_feedback(self, negative: bool) -> None:
        self.feedback += 1
        if negative:
            self.feedback_negative += 1

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VariantStats):
            return NotImplemented
        return self.to_mapping() == other.to_mapping()

    __hash__ = None  # type: ignore[assignment]  # mutable: equal by value, not hashable

    def merge(self, other: VariantStats, users: bool = True) -> None:
        """Add `other` in (its user sums too, unless `users` is False)."""
        self.requests += other.requests
        self.errors += other.errors
        for error_type, count in other.errors_by_type.items():
            self.errors_by_type[error_type] = self.errors_by_type.get(error_type, 0) + count
        self.cancels += other.cancels
        self.latency.merge(other.latency)
        self.ttft.merge(other.ttft)
        self.tpot.merge(other.tpot)
        self.output_tokens += other.output_tokens
        self.token_answers += other.token_answers
        self.token_seconds += other.token_seconds
        self.token_squares += other.token_squares
        self.token_seconds_squares += other.token_seconds_squares
        self.token_cross += other.token_cross
        self.feedback += other.feedback
        self.feedback_negative += other.feedback_negative
        self.pairs += other.pairs
        self.disagreements += other.disagreements
        self.length_pairs += other.length_pairs
        self.length_mismatches += other.length_mismatches
        if not users:
            return
        mine = self.users
        for cluster, sums in other.users.items():
            row = mine.get(cluster)
            if row is None:
                mine[cluster] = list(sums)
            else:
                for field, value in enumerate(sums):
                    row[field] += value

    @property
    def error_rate(self) -> float | None:
        """Errors per attempt that ended (a cancel is not a trial: rule 2)."""
        trials = self.requests - self.cancels
        return self.errors / trials if trials > 0 else None

    @property
    def cancel_rate(self) -> float | None:
        return self.cancels / self.requests if self.requests else None

    @property
    def feedback_negative_rate(self) -> float | None:
        return self.feedback_negative / self.feedback if self.feedback else None

    @property
    def output_tokens_per_request(self) -> float | None:
        """Mean output tokens of the answers that reported them (rule 5)."""
        return self.output_tokens / self.token_answers if self.token_answers else None

    @property
    def output_tokens_per_s(self) -> float | None:
        """Output tokens per second of answer time, over the answers that reported them."""
        return self.output_tokens / self.token_seconds if self.token_seconds > 0 else None

    def summary(self) -> dict[str, object]:
        """The figures the status page shows (seconds; None where there is no data)."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "errors_by_type": dict(sorted(self.errors_by_type.items())),
            "cancels": self.cancels,
            "cancel_rate": self.cancel_rate,
            "latency_s": _quantiles(self.latency),
            "ttft_s": _quantiles(self.ttft),
            "tpot_s": _quantiles(self.tpot),
            "output_tokens": self.output_tokens,
            "output_tokens_per_request": self.output_tokens_per_request,
            # rounded: a float sum differs in its last bits by the order slices merged in
            "output_tokens_per_s": _round(self.output_tokens_per_s),
            "feedback": self.feedback,
            "feedback_negative": self.feedback_negative,
            "feedback_negative_rate": self.feedback_negative_rate,
            "disagreement_rate": self.disagreements / self.pairs if self.pairs else None,
            "length_mismatch_rate": (
                self.length_mismatches / self.length_pairs if self.length_pairs else None
            ),
        }

    def to_mapping(self) -> dict[str, object]:
        mapping: dict[str, object] = {
            "requests": self.requests,
            "errors": self.errors,
            "errors_by_type": dict(self.errors_by_type),
            "cancels": self.cancels,
            "latency": self.latency.to_mapping(),
            "ttft": self.ttft.to_mapping(),
            "tpot": self.tpot.to_mapping(),
            "output_tokens": self.output_tokens,
            "users": {str(cluster): list(sums) for cluster, sums in self.users.items()},
            "token_answers": self.token_answers,
            "token_seconds": self.token_seconds,
            "token_squares": self.token_squares,
            "token_seconds_squares": self.token_seconds_squares,
            "token_cross": self.token_cross,
            "feedback": self.feedback,
            "feedback_negative": self.feedback_negative,
        }
        if self.pairs or self.length_pairs:  # rule 8: only slices with pairs carry them
            mapping["pairs"] = self.pairs
            mapping["disagreements"] = self.disagreements
            mapping["length_pairs"] = self.length_pairs
            mapping["length_mismatches"] = self.length_mismatches
        return mapping

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> VariantStats:
        """From `to_mapping`'s form; the fields added since (cancels, tpot, users) may be
        missing from slices an older process published."""
        stats = cls()
        requests, errors, tokens = data["requests"], data["errors"], data["output_tokens"]
        by_type, latency, ttft = data["errors_by_type"], data["latency"], data["ttft"]
        cancels, tpot, users = data.get("cancels", 0), data.get("tpot"), data.get("users", {})
        assert isinstance(requests, int)
        assert isinstance(errors, int)
        assert isinstance(tokens, int)
        assert isinstance(cancels, int)
        assert isinstance(by_type, Mapping)
        assert isinstance(latency, Mapping)
        assert isinstance(ttft, Mapping)
        assert isinstance(users, Mapping)
        stats.requests, stats.errors, stats.output_tokens = requests, errors, tokens
        stats.cancels = cancels
        stats.errors_by_type = {str(k): int(v) for k, v in by_type.items()}
        stats.latency = LogHistogram.from_mapping(latency)
        stats.ttft = LogHistogram.from_mapping(ttft)
        if isinstance(tpot, Mapping):
            stats.tpot = LogHistogram.from_mapping(tpot)
        for cluster, sums in users.items():
            assert isinstance(sums, list)
            assert len(sums) == _USER_FIELDS
            stats.users[int(cluster)] = [float(value) for value in sums]
        # Counters added since the first slices were written: absent reads as 0 (rule 6).
        stats.token_answers = _count(data.get("token_answers", 0))
        token_seconds = data.get("token_seconds", 0.0)
        assert isinstance(token_seconds, int | float)
        stats.token_seconds = float(token_seconds)
        stats.token_squares = _sum(data.get("token_squares", 0.0))
        stats.token_seconds_squares = _sum(data.get("token_seconds_squares", 0.0))
        stats.token_cross = _sum(data.get("token_cross", 0.0))
        stats.feedback = _count(data.get("feedback", 0))
        stats.feedback_negative = _count(data.get("feedback_negative", 0))
        stats.pairs = _count(data.get("pairs", 0))
        stats.disagreements = _count(data.get("disagreements", 0))
        stats.length_pairs = _count(data.get("length_pairs", 0))
        stats.length_mismatches = _count(data.get("length_mismatches", 0))
        return stats


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _quantiles(histogram: LogHistogram) -> dict[str, float | None]:
    return {
        "p50": histogram.quantile(0.5),
        "p95": histogram.quantile(0.95),
        "p99": histogram.quantile(0.99),
    }


def _sum(value: object) -> float:
    assert isinstance(value, int | float)
    return float(value)


def _count(value: object) -> int:
    assert isinstance(value, int)
    return value


class WindowStats:
    """Time-sliced `VariantStats` per (route, variant)."""

    def __init__(self, slice_s: float = SLICE_S, retention_s: float = RETENTION_S) -> None:
        self.slice_s = slice_s
        self._keep = max(1, int(retention_s / slice_s))
        self._rings: dict[tuple[str, Series], deque[tuple[int, VariantStats]]] = {}

    def keep_for(self, retention_s: float) -> None:
        """Hold slices this long from now on (at least a judgement interval, twice over)."""
        self._keep = max(1, int(retention_s / self.slice_s))

    @property
    def retention_s(self) -> float:
        return self._keep * self.slice_s

    def record(
        self,
        route: str,
        variant: Series,
        now: float,
        latency_s: float,
        ttft_s: float | None,
        error_type: str | None,
        output_tokens: int | None,
        cancelled: bool = False,
        user: int | None = None,
    ) -> None:
        self.slice_for(route, variant, now).record(
            latency_s, ttft_s, error_type, output_tokens, cancelled, user
        )

    def record_pair(
        self, route: str, now: float, agreed: bool | None, length_matched: bool | None
    ) -> None:
        """A shadow pair's comparison, on its canary side (rule 8)."""
        self.slice_for(route, ShadowSide.CANARY, now).record_pair(agreed, length_matched)

    def record_feedback(self, route: str, variant: Variant, now: float, negative: bool) -> None:
        self.slice_for(route, variant, now).record_feedback(negative)

    def slice_for(self, route: str, variant: Series, now: float) -> VariantStats:
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

    def window(self, route: str, variant: Series, since: float, until: float) -> VariantStats:
        """The sum of the slices that overlap [since, until]."""
        return self.between(route, variant, self.slice_of(since), self.slice_of(until))

    def between(self, route: str, variant: Series, first: int, last: int) -> VariantStats:
        """The sum of the slices numbered `first` to `last`, both included."""
        total = VariantStats()
        for index, stats in self._rings.get((route, variant), ()):
            if first <= index <= last:
                total.merge(stats)
        return total

    def slice_of(self, epoch_s: float) -> int:
        return int(epoch_s // self.slice_s)

    def slices(self) -> Iterator[tuple[str, Series, int, VariantStats]]:
        """Every slice held: (route, variant, slice index, stats)."""
        for (route, variant), ring in self._rings.items():
            for index, stats in ring:
                yield route, variant, index, stats
