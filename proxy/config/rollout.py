"""Reading a route's `rollout` section (SPEC §3): the weight, and the auto rollout's policy.

Rules:
1. `weight` and every step are percents with at most two decimals, because the
   bucket grid is 0.01 % (SPEC §4: `bucket < round(weight * 100)`).
2. Steps strictly increase; each check names at least one of its two limits.
3. A step is a weight (`5`) or a weight with a timed pause (`{weight: 5, pause: 30m}`);
   100 cannot pause: the canary is promoted there, and nothing waits.
4. The checks are `error_rate`, `cancel_rate` and `feedback_negative_rate` (`max`,
   `max_increase`: shares 0-1), a quantile of latency, time to first token or time per
   output token at p50, p95 or p99 (`latency_p95`, `tpot_p99`, ...: `max` a duration,
   `max_ratio` >= 1), and `output_tokens_ratio` (`max`: a ratio of means above 0).
5. `ab` is an A/B test instead of a ramp: a fixed split at `weight` (above 0, below
   100) for `duration`, with the checks of `guard` (optional) stopping a canary beyond
   gross limits. A route has `auto` or `ab`, never both: one ramps, the other holds.
6. `shadow` (SHADOW_KEYS, all optional): a share in (0, 1], a duration, at least one
   shadow request in flight, a queue of 0 or more, tool names, and the checks only
   pairs can tell: `agreement` (`min` required, `similarity`: shares 0-1) and
   `output_length` (`max_ratio` > 1 required, `max_share` 0-1).
"""

from __future__ import annotations

import itertools
from typing import Any

from proxy.config.model import (
    QUANTILE_CHECKS,
    RATE_CHECKS,
    RATIO_CHECKS,
    AbTest,
    AgreementCheck,
    AutoRollout,
    Checks,
    ErrorRateCheck,
    LatencyCheck,
    LengthCheck,
    OnFailure,
    PairChecks,
    RatioCheck,
    Rollout,
    Shadow,
)
from proxy.config.reader import Fields, Reader

__all__ = ["read_rollout"]

AUTO_KEYS = (
    "steps",
    "interval",
    "min_requests",
    "pass_intervals",
    "failure_limit",
    "on_failure",
    "confidence",
    "checks",
    "cooldown",
    "shadow",
)
SHADOW_KEYS = ("share", "duration", "max_concurrency", "queue", "never_tools", "checks")
STEP_KEYS = ("weight", "pause")
AB_KEYS = ("duration", "interval", "confidence", "failure_limit", "guard")


def read_rollout(reader: Reader) -> Rollout | None:
    fields = reader.fields(("weight", "auto", "ab"))
    if fields is None:
        return None
    weight = fields.get("weight", Reader.percent, 0.0)
    ab = fields.get("ab", _read_ab, None)
    if ab is None:
        return Rollout(weight=weight, auto=fields.get("auto", _read_auto, None))
    if "auto" in fields:
        fields.at("ab").error(
            "cannot be used with auto: a route either ramps (auto) or holds a fixed split (ab)"
        )
        return None
    if not 0 < weight < 100:
        fields.at("weight").error(
            f"an A/B test (ab) splits the traffic: above 0 and below 100, got {weight:g}"
        )
        return None
    return Rollout(weight=weight, auto=ab.policy(weight), ab=ab)


def _read_ab(reader: Reader) -> AbTest | None:
    fields = reader.fields(AB_KEYS)
    if fields is None:
        return None
    duration = fields.need("duration", Reader.duration)
    if duration is None:
        return None
    defaults = AbTest(duration_s=duration)
    return AbTest(
        duration_s=duration,
        interval_s=fields.get("interval", Reader.duration, defaults.interval_s),
        confidence=fields.get(
            "confidence", lambda r: r.number(above=0.5, below=1.0), defaults.confidence
        ),
        failure_limit=_count(fields, "failure_limit", defaults.failure_limit),
        guard=fields.get("guard", _read_checks, Checks()),
    )


def _read_auto(reader: Reader) -> AutoRollout | None:
    fields = reader.fields(AUTO_KEYS)
    if fields is None:
        return None
    steps, pauses = fields.need("steps", _read_steps) or ((), ())
    defaults = AutoRollout(steps=())
    auto = AutoRollout(
        steps=steps,
        interval_s=fields.get("interval", Reader.duration, defaults.interval_s),
        min_requests=_count(fields, "min_requests", defaults.min_requests),
        pass_intervals=_count(fields, "pass_intervals", defaults.pass_intervals),
        failure_limit=_count(fields, "failure_limit", defaults.failure_limit),
        on_failure=fields.get("on_failure", lambda r: r.choice(OnFailure), defaults.on_failure),
        confidence=fields.get(
            "confidence", lambda r: r.number(above=0.5, below=1.0), defaults.confidence
        ),
        checks=fields.get("checks", _read_checks, Checks()),
        step_pauses_s=pauses if any(pauses) else (),
        cooldown_s=fields.get(
            "cooldown", lambda r: r.duration(allow_zero=True), defaults.cooldown_s
        ),
        shadow=fields.get("shadow", _read_shadow, None),
    )
    return auto if steps else None


def _count(fields: Fields, name: str, default: int) -> int:
    return fields.get(name, lambda r: r.integer(minimum=1), default)


def _read_steps(reader: Reader) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The steps' weights, and each one's pause in seconds (0: none)."""
    items = reader.items()
    if items is None:
        return None
    steps = [_read_step(item) for item in items]
    valid = [step for step in steps if step is not None]
    if len(valid) != len(steps):
        return None
    for (before, _), (after, _) in itertools.pairwise(valid):
        if after <= before:
            reader.error(f"must increase, got {after:g} after {before:g}")
            return None
    return tuple(weight for weight, _ in valid), tuple(pause for _, pause in valid)


def _read_step(reader: Reader) -> tuple[float, float] | None:
    """`5` or `{weight: 5, pause: 30m}`: the weight, and the pause in seconds (0: none)."""
    if not isinstance(reader.value, dict):
        weight = reader.percent(allow_zero=False)
        return None if weight is None else (weight, 0.0)
    fields = reader.fields(STEP_KEYS, required=("weight",))
    if fields is None or "weight" not in fields:
        return None
    weight = fields.get("weight", lambda r: r.percent(allow_zero=False), None)
    pause = fields.get("pause", Reader.duration, 0.0)
    if weight is None or ("pause" in fields and pause == 0.0):
        return None
    if weight >= 100 and pause > 0:
        fields.at("pause").error("cannot pause at 100: the canary is promoted there")
        return None
    return weight, pause


def _read_shadow(reader: Reader) -> Shadow | None:
    """`shadow: {share: 0.05, duration: 30m, ...}`; every key has a default."""
    fields = reader.fields(SHADOW_KEYS)
    if fields is None:
        return None
    defaults = Shadow()
    return Shadow(
        share=fields.get("share", lambda r: r.number(above=0.0, maximum=1.0), defaults.share),
        duration_s=fields.get("duration", Reader.duration, defaults.duration_s),
        max_concurrency=_count(fields, "max_concurrency", defaults.max_concurrency),
        queue=fields.get("queue", lambda r: r.integer(minimum=0), defaults.queue),
        never_tools=fields.get("never_tools", _read_names, defaults.never_tools),
        checks=fields.get("checks", _read_pair_checks, defaults.checks),
    )


def _read_pair_checks(reader: Reader) -> PairChecks | None:
    fields = reader.fields(("agreement", "output_length"))
    if fields is None:
        return None
    return PairChecks(
        agreement=fields.get("agreement", _read_agreement, None),
        output_length=fields.get("output_length", _read_length, None),
    )


def _read_agreement(reader: Reader) -> AgreementCheck | None:
    fields = reader.fields(("min", "similarity"), required=("min",))
    if fields is None or "min" not in fields:
        return None
    least = fields.get("min", _read_share, None)
    similarity = fields.get("similarity", _read_share, AgreementCheck(0.0).similarity)
    return None if least is None or similarity is None else AgreementCheck(least, similarity)


def _read_length(reader: Reader) -> LengthCheck | None:
    fields = reader.fields(("max_ratio", "max_share"), required=("max_ratio",))
    if fields is None or "max_ratio" not in fields:
        return None
    ratio = fields.get("max_ratio", lambda r: r.number(above=1.0), None)
    share = fields.get("max_share", _read_share, LengthCheck(2.0).max_share)
    return None if ratio is None or share is None else LengthCheck(ratio, share)


def _read_names(reader: Reader) -> tuple[str, ...] | None:
    items = reader.items(non_empty=False)
    if items is None:
        return None
    names = [item.string() for item in items]
    return tuple(name for name in names if name is not None)


def _read_checks(reader: Reader) -> Checks | None:
    fields = reader.fields((*RATE_CHECKS, *QUANTILE_CHECKS, *RATIO_CHECKS))
    if fields is None:
        return None
    found: dict[str, Any] = {name: fields.get(name, _read_error_rate, None) for name in RATE_CHECKS}
    found |= {name: fields.get(name, _read_latency, None) for name in QUANTILE_CHECKS}
    found |= {name: fields.get(name, _read_ratio, None) for name in RATIO_CHECKS}
    return Checks(**found)


def _read_error_rate(reader: Reader) -> ErrorRateCheck | None:
    fields = reader.fields(("max", "max_increase"))
    if fields is None or not _has_a_limit(reader, fields, "max", "max_increase"):
        return None
    return ErrorRateCheck(
        max=fields.get("max", _read_share, None),
        max_increase=fields.get("max_increase", _read_share, None),
    )


def _read_share(reader: Reader) -> float | None:
    return reader.number(minimum=0.0, maximum=1.0)


def _read_latency(reader: Reader) -> LatencyCheck | None:
    fields = reader.fields(("max", "max_ratio"))
    if fields is None or not _has_a_limit(reader, fields, "max", "max_ratio"):
        return None
    return LatencyCheck(
        max_s=fields.get("max", Reader.duration, None),
        max_ratio=fields.get("max_ratio", lambda r: r.number(minimum=1.0), None),
    )


def _read_ratio(reader: Reader) -> RatioCheck | None:
    fields = reader.fields(("max",))
    if fields is None:
        return None
    limit = fields.need("max", lambda r: r.number(above=0.0))
    return None if limit is None else RatioCheck(max=limit)


def _has_a_limit(reader: Reader, fields: Fields, first: str, second: str) -> bool:
    if first in fields or second in fields:
        return True
    reader.error(f"needs {first}, {second} or both")
    return False
