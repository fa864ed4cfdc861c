"""The rollout state machine (SPEC §6): a route's state, and how events change it. Pure.

States: `shadow` (weight 0: a share of stable's requests is also sent to the canary,
whose answers are judged and thrown away), `progressing` (ramping on evidence), `paused`
(by an operator, or held after failures with `on_failure: hold`), `promoted` (reached
100), `rolled_back` (weight 0 after failure), `manual` (no `auto`: the config's weight
is served), and for an A/B test (`rollout.ab`) `testing` (the fixed split, for its
duration) and `complete`.

Transitions are a table: (state, event) → handler. Events are a judgement (pass,
fail, inconclusive), an operator's action (pause, resume, advance, promote, rollback),
and the config (reconciled at start and on every reload).

Rules:
1. `pass_intervals` passing judgements in a row move the weight to the next step;
   past the last step the canary is promoted to 100. An inconclusive judgement
   neither counts nor breaks the row. Below the first step there is no canary traffic
   to judge, so the first step is taken without a judgement.
2. `failure_limit` failing judgements in a row trigger `on_failure`: `rollback`
   (weight 0, `rolled_back`) or `hold` (the weight stays, `paused`).
3. Outside an `advance` schedule window steps do not go up; failures still count.
4. A new canary (its backend, URL or model rewrite changed) starts at `steps[0]`.
5. An edited `rollout.weight` is served at once, and an automatic rollout goes on
   from there to the next step above it.
6. `rolled_back` stays until the canary changes, the weight is edited, or an
   operator resumes (from `steps[0]`). A resume, from `paused` too, judges the canary
   afresh: what paused, held or rolled it back is behind it.
7. The judge's evidence (`proxy.judge.analysis.Evidence`) starts again with every new
   rollout (a new canary, an adopted weight, a resume), and its step window and
   passing tests with every step.
8. Every change is a `Decision` saying when, what, why, and with which numbers.
9. An operator's `advance` takes the next step at once (past the last one: promoted),
   skipping what is left of a step's pause, and leaves the rollout progressing; from
   `paused` the judge starts afresh, as on a resume.
10. Within `cooldown` of its last rollback, a rolled-back canary is resumed only when
    the operator forces it; the refusal says how long is left.
11. An A/B test starts `testing` at the config's weight (a new canary or an edited
    weight starts a new test), and no judgement ever moves its weight: at the first
    judgement at or past `duration` from its start it is `complete`, at the same
    weight, and the report reads its evidence. Its guard's `failure_limit` failing
    judgements in a row stop it (weight 0, `rolled_back`): a canary beyond gross limits
    is not kept for the sake of a test. An operator may `complete` it early, promote it
    or roll it back; a resume from `complete` or `rolled_back` starts a new test.
12. With `shadow` configured, a new canary (rule 4), and a rolled-back one an operator
    resumes, starts in `shadow` at weight 0, judged on its shadow pairs. Passing
    judgements take it to `steps[0]` as passes take a step up (the planner holds it
    there for `shadow.duration`, as a step's pause), with a rollout of its own;
    `failure_limit` failing ones roll it back whatever `on_failure` says (holding a
    canary no user sees helps nobody). Operators act in shadow as at any step: a pause
    holds it at 0 and a resume goes back into shadow, an advance goes to `steps[0]`.
    Shadow configured away from a canary in shadow takes it to `steps[0]`.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Final

from proxy.config.model import AutoRollout, Backend, OnFailure, Route, Variant
from proxy.config.summary import format_duration, format_span
from proxy.judge.analysis import Evidence, Judgement, Verdict
from proxy.judge.stats import SLICE_S

__all__ = [
    "Action",
    "Cause",
    "Decision",
    "OperatorAction",
    "RouteState",
    "Status",
    "Transition",
    "TransitionRefused",
    "ab_left_s",
    "canary_identity",
    "cooldown_left_s",
    "on_judgement",
    "on_operator",
    "reconcile",
    "rolled_back_at",
    "served_weight",
]

MAX_DECISIONS: Final = 20


class Status(StrEnum):
    SHADOW = "shadow"
    PROGRESSING = "progressing"
    PAUSED = "paused"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    MANUAL = "manual"
    TESTING = "testing"  # an A/B test's fixed split (rule 11)
    COMPLETE = "complete"  # an A/B test past its duration, or completed by an operator


class OperatorAction(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    ADVANCE = "advance"
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    COMPLETE = "complete"  # an A/B test, before its duration


class Cause(StrEnum):
    """What moved a rollout."""

    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    OPERATOR = "operator"
    CONFIG = "config"
    DURATION = "duration"  # an A/B test's time ran out


class Action(StrEnum):
    """What a decision did to a rollout."""

    ADVANCE = "advance"
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    HOLD = "hold"
    PAUSE = "pause"
    RESUME = "resume"
    ADOPT = "adopt"
    RESTART = "restart"
    MANUAL = "manual"
    TEST = "test"  # an A/B test started
    COMPLETE = "complete"


class TransitionRefused(Exception):
    """An operator's action that does not apply to the route's state (HTTP 409).

    `retry_after_s`: when the action will apply by itself after a while (a cooldown).
    """

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Decision:
    """One change of a route's rollout, explained."""

    at: float  # epoch seconds
    cause: Cause
    action: Action
    weight_before: float
    weight_after: float
    status: Status
    reason: str
    judgement: Mapping[str, object] | None = None

    def to_mapping(self) -> dict[str, object]:
        return {
            "at": self.at,
            "cause": self.cause.value,
            "action": self.action.value,
            "weight_before": self.weight_before,
            "weight_after": self.weight_after,
            "status": self.status.value,
            "reason": self.reason,
            "judgement": dict(self.judgement) if self.judgement is not None else None,
        }

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> Decision:
        judgement = data.get("judgement")
        return cls(
            at=float(data["at"]),  # type: ignore[arg-type]
            cause=Cause(str(data["cause"])),
            action=Action(str(data["action"])),
            weight_before=float(data["weight_before"]),  # type: ignore[arg-type]
            weight_after=float(data["weight_after"]),  # type: ignore[arg-type]
            status=Status(str(data["status"])),
            reason=str(data["reason"]),
            judgement=judgement if isinstance(judgement, Mapping) else None,
        )


@dataclass(frozen=True, slots=True)
class RouteState:
    """What the rollout of one route is, as stored and shared."""

    route: str
    status: Status
    weight: float
    step: int  # index into steps of the step reached; -1 below the first
    passes: int = 0  # passing judgements in a row at this step
    failures: int = 0  # failing judgements in a row
    step_started_at: float = 0.0  # epoch seconds
    started_at: float = 0.0  # epoch seconds: when this canary's rollout began
    canary: str = ""  # canary_identity() of the canary this state is about
    config_weight: float = 0.0  # the config's rollout.weight last adopted
    decisions: tuple[Decision, ...] = field(default=())
    verdict: Mapping[str, object] | None = None  # the last judgement, with its numbers
    evidence: Evidence = field(default_factory=Evidence)  # what the judge has seen
    version: int = 0  # bumped by the store on every write (compare-and-set)

    @property
    def last_decision(self) -> Decision | None:
        return self.decisions[-1] if self.decisions else None

    def to_mapping(self) -> dict[str, object]:
        return {
            "route": self.route,
            "status": self.status.value,
            "weight": self.weight,
            "step": self.step,
            "passes": self.passes,
            "failures": self.failures,
            "step_started_at": self.step_started_at,
            "started_at": self.started_at,
            "canary": self.canary,
            "config_weight": self.config_weight,
            "decisions": [d.to_mapping() for d in self.decisions],
            "verdict": dict(self.verdict) if self.verdict is not None else None,
            "evidence": self.evidence.to_mapping(),
            "version": self.version,
        }

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> RouteState:
        decisions = data.get("decisions", [])
        assert isinstance(decisions, list)
        verdict = data.get("verdict")
        evidence = data.get("evidence")
        return cls(
            route=str(data["route"]),
            status=Status(str(data["status"])),
            weight=float(data["weight"]),  # type: ignore[arg-type]
            step=int(data["step"]),  # type: ignore[call-overload]
            passes=int(data["passes"]),  # type: ignore[call-overload]
            failures=int(data["failures"]),  # type: ignore[call-overload]
            step_started_at=float(data["step_started_at"]),  # type: ignore[arg-type]
            started_at=float(data.get("started_at", 0.0)),  # type: ignore[arg-type]
            canary=str(data["canary"]),
            config_weight=float(data["config_weight"]),  # type: ignore[arg-type]
            decisions=tuple(Decision.from_mapping(d) for d in decisions),
            verdict=verdict if isinstance(verdict, Mapping) else None,
            evidence=Evidence.from_mapping(evidence)
            if isinstance(evidence, Mapping)
            else Evidence(),
            version=int(data.get("version", 0)),  # type: ignore[call-overload]
        )


@dataclass(frozen=True, slots=True)
class Transition:
    state: RouteState
    decision: Decision | None  # None when nothing changed worth recording


def canary_identity(route: Route, backends: Mapping[str, Backend]) -> str:
    """What makes a canary the same canary: its backend's name and URL and its model."""
    backend = backends[route.canary]
    text = f"{backend.name}|{backend.url}|{route.model_rewrite.get(Variant.CANARY, '')}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def served_weight(state: RouteState, may_serve: bool) -> float:
    """The weight requests get: the state's, or 0 outside a `serve` window."""
    return state.weight if may_serve else 0.0


# --- config ------------------------------------------------------------------------------


def reconcile(state: RouteState | None, route: Route, identity: str, now: float) -> Transition:
    """The state of `route` under its (new) config, from the state it had, if any."""
    auto = route.rollout.auto
    config_weight = route.rollout.weight
    if auto is None:
        return _manual(state, route.name, config_weight, identity, now)
    if auto.is_ab:
        return _reconcile_test(state, route.name, auto, identity, now)
    if state is None and config_weight > 0:
        return _adopt(
            state,
            route.name,
            auto,
            config_weight,
            config_weight,
            identity,
            now,
            "the config's weight",
        )
    if state is None or state.canary != identity:
        return _restart(
            state,
            route.name,
            auto,
            config_weight,
            identity,
            now,
            "a new canary starts at the first step",
        )
    if state.config_weight != config_weight:
        return _adopt(
            state,
            route.name,
            auto,
            config_weight,
            config_weight,
            identity,
            now,
            f"the config's weight was edited to {config_weight:g}%",
        )
    if state.status is Status.MANUAL and state.weight == 0 and auto.shadow is not None:
        # No user has seen this canary yet: it is judged in shadow first.
        return _restart(
            state, route.name, auto, config_weight, identity, now, "an automatic rollout"
        )
    if state.status in (Status.MANUAL, *_TEST_STATES):
        return _adopt(
            state,
            route.name,
            auto,
            state.weight,
            config_weight,
            identity,
            now,
            "an automatic rollout was configured",
        )
    if state.status is Status.SHADOW and auto.shadow is None:
        return _leave_shadow(state, auto, now, Cause.CONFIG, None, "shadow is no longer configured")
    # The same canary and weight: keep the state, with the steps re-read.
    return Transition(replace(state, step=_step_of(auto, state.weight)), None)


# The states only an A/B test is in; a test is also promoted or rolled back.
_TEST_STATES: Final = (Status.TESTING, Status.COMPLETE)


def _reconcile_test(
    state: RouteState | None, route: str, auto: AutoRollout, identity: str, now: float
) -> Transition:
    """Rule 11: the same canary at the same weight goes on as it is (testing, complete,
    promoted or rolled back); anything else starts a new test."""
    weight = auto.steps[0]
    if state is None:
        return _test(None, route, auto, identity, now, "an A/B test starts")
    if state.canary != identity:
        return _test(state, route, auto, identity, now, "a new canary starts a new A/B test")
    if state.config_weight != weight:
        why = f"the weight was edited to {weight:g}%: a new A/B test"
        return _test(state, route, auto, identity, now, why)
    if state.status in (Status.PROGRESSING, Status.PAUSED, Status.MANUAL, Status.SHADOW):
        return _test(state, route, auto, identity, now, "an A/B test was configured")
    step = -1 if state.status is Status.ROLLED_BACK else 0
    return Transition(replace(state, step=step), None)


def _test(
    state: RouteState | None,
    route: str,
    auto: AutoRollout,
    identity: str,
    now: float,
    why: str,
    cause: Cause = Cause.CONFIG,
) -> Transition:
    """An A/B test of its own at its weight, from now."""
    weight = auto.steps[0]
    new = _begun(state, route, Status.TESTING, weight, 0, identity, weight, now)
    ends = format_duration(auto.ab_duration_s)
    return _record(new, state, now, cause, Action.TEST, f"weight {weight:g}% for {ends}: {why}")


def _begun(
    state: RouteState | None,
    route: str,
    status: Status,
    weight: float,
    step: int,
    identity: str,
    config_weight: float,
    now: float,
    *,
    shadow: bool = False,
) -> RouteState:
    """A rollout (or test) of `identity` beginning now, with fresh evidence; the route's
    decisions and store version carry over from `state`."""
    return RouteState(
        route,
        status,
        weight,
        step,
        step_started_at=now,
        started_at=now,
        evidence=Evidence.fresh(_next_slice(now), shadow=shadow),
        canary=identity,
        config_weight=config_weight,
        decisions=state.decisions if state is not None else (),
        version=state.version if state is not None else 0,
    )


def ab_left_s(state: RouteState, auto: AutoRollout | None, now: float) -> float:
    """What is left of an A/B test's duration (rule 11); 0 when none runs."""
    if state.status is not Status.TESTING or auto is None or not auto.is_ab:
        return 0.0
    return max(0.0, state.started_at + auto.ab_duration_s - now)


def _manual(
    state: RouteState | None, route: str, config_weight: float, identity: str, now: float
) -> Transition:
    weight = config_weight
    if (
        state is not None
        and state.status is Status.MANUAL
        and state.config_weight == config_weight
        and state.canary == identity
    ):
        # An operator's promote or rollback holds until the next edit; a new canary
        # starts from the config's weight, never from what the old one was given.
        weight = state.weight
    new = RouteState(
        route,
        Status.MANUAL,
        weight,
        -1,
        step_started_at=now,
        canary=identity,
        config_weight=config_weight,
        decisions=state.decisions if state is not None else (),
        version=state.version if state is not None else 0,
    )
    if state is None or (state.status, state.weight, state.canary) == (
        Status.MANUAL,
        weight,
        identity,
    ):
        return Transition(new, None)  # nothing changed worth a decision
    return _record(
        new,
        state,
        now,
        Cause.CONFIG,
        Action.MANUAL,
        f"weight {weight:g}% from the config (no automatic rollout)",
    )


def _restart(
    state: RouteState | None,
    route: str,
    auto: AutoRollout,
    config_weight: float,
    identity: str,
    now: float,
    why: str,
) -> Transition:
    """A rollout of its own from the first step, or from shadow when it is configured."""
    if auto.shadow is not None:
        new = _begun(
            state, route, Status.SHADOW, 0.0, -1, identity, config_weight, now, shadow=True
        )
        return _record(
            new,
            state,
            now,
            Cause.CONFIG,
            Action.RESTART,
            "weight 0%: a new canary starts in shadow",
        )
    return _adopt(
        state, route, auto, auto.steps[0], config_weight, identity, now, why, action=Action.RESTART
    )


def _adopt(
    state: RouteState | None,
    route: str,
    auto: AutoRollout,
    weight: float,
    config_weight: float,
    identity: str,
    now: float,
    why: str,
    action: Action = Action.ADOPT,
) -> Transition:
    """A rollout of its own from `weight`, ramping from the step at or below it."""
    new = _begun(
        state,
        route,
        Status.PROGRESSING,
        weight,
        _step_of(auto, weight),
        identity,
        config_weight,
        now,
    )
    return _record(new, state, now, Cause.CONFIG, action, f"weight {weight:g}%: {why}")


def _next_slice(now: float) -> int:
    """The first stats slice wholly after `now`: what a new rollout's evidence starts at."""
    return int(now // SLICE_S) + 1


def _step_of(auto: AutoRollout, weight: float) -> int:
    """The index of the highest step at or below `weight`, -1 below the first."""
    return bisect.bisect_right(auto.steps, weight) - 1


# --- judgements --------------------------------------------------------------------------


def on_judgement(
    state: RouteState, auto: AutoRollout, judgement: Judgement | None, now: float, may_advance: bool
) -> Transition:
    """What a judgement (None below the first step: nothing to judge) does to the state."""
    if state.status is Status.TESTING and judgement is not None:
        return _on_test_judgement(state, auto, judgement, now)
    if state.status is Status.SHADOW:
        return _judged_in_shadow(state, auto, judgement, now, may_advance)
    if state.status is not Status.PROGRESSING:
        return Transition(state, None)
    if state.step < 0 or judgement is None:
        if not may_advance:
            return Transition(state, None)
        return _advance(
            state, auto, now, Cause.PASS, None, "no canary traffic below the first step"
        )
    judged = replace(state, verdict={**judgement.to_mapping(), "at": now})
    handler = _JUDGEMENT_TABLE[judgement.verdict]
    return handler(judged, auto, judgement, now, may_advance)


def _on_test_judgement(
    state: RouteState, auto: AutoRollout, judgement: Judgement, now: float
) -> Transition:
    """Rule 11: the guard may stop a test, the clock completes it; nothing else moves it."""
    judged = replace(state, verdict={**judgement.to_mapping(), "at": now})
    if judgement.verdict is Verdict.FAIL:
        failures = state.failures + 1
        if failures >= auto.failure_limit:
            new = replace(judged, status=Status.ROLLED_BACK, weight=0.0, step=-1, failures=0)
            plural = "s" if failures > 1 else ""
            return _record(
                new,
                state,
                now,
                Cause.FAIL,
                Action.ROLLBACK,
                f"A/B test stopped by its guard after {failures} failing judgement{plural}: "
                f"{judgement.reason}",
                judgement,
            )
        judged = replace(judged, failures=failures)
    else:
        judged = replace(judged, failures=0)
    if now < state.started_at + auto.ab_duration_s:
        return Transition(judged, None)
    new = replace(judged, status=Status.COMPLETE, step_started_at=now)
    took = format_span(now - state.started_at)
    return _record(
        new,
        state,
        now,
        Cause.DURATION,
        Action.COMPLETE,
        f"A/B test complete after {took} at {state.weight:g}%: see its report",
    )


def _on_pass(
    state: RouteState, auto: AutoRollout, judgement: Judgement, now: float, may_advance: bool
) -> Transition:
    passes = state.passes + 1
    counted = replace(state, passes=passes, failures=0)
    if passes < auto.pass_intervals:
        return Transition(counted, None)
    if not may_advance:
        return Transition(counted, None)
    return _advance(counted, auto, now, Cause.PASS, judgement, judgement.reason)


def _on_fail(
    state: RouteState, auto: AutoRollout, judgement: Judgement, now: float, may_advance: bool
) -> Transition:
    failures = state.failures + 1
    counted = replace(state, failures=failures, passes=0)
    if failures < auto.failure_limit:
        return Transition(counted, None)
    judgements = f"{failures} failing judgement{'s' if failures > 1 else ''}"
    if auto.on_failure is OnFailure.ROLLBACK:
        new = replace(counted, status=Status.ROLLED_BACK, weight=0.0, step=-1, failures=0)
        return _record(
            new,
            state,
            now,
            Cause.FAIL,
            Action.ROLLBACK,
            f"rolled back after {judgements}: {judgement.reason}",
            judgement,
        )
    new = replace(counted, status=Status.PAUSED, failures=0)
    return _record(
        new,
        state,
        now,
        Cause.FAIL,
        Action.HOLD,
        f"held at {state.weight:g}% after {judgements}: {judgement.reason}",
        judgement,
    )


def _on_inconclusive(
    state: RouteState, auto: AutoRollout, judgement: Judgement, now: float, may_advance: bool
) -> Transition:
    return Transition(state, None)


_JUDGEMENT_TABLE: Final[
    dict[Verdict, Callable[[RouteState, AutoRollout, Judgement, float, bool], Transition]]
] = {
    Verdict.PASS: _on_pass,
    Verdict.FAIL: _on_fail,
    Verdict.INCONCLUSIVE: _on_inconclusive,
}


def _judged_in_shadow(
    state: RouteState, auto: AutoRollout, judgement: Judgement | None, now: float, may_advance: bool
) -> Transition:
    """Rule 11: passes leave shadow for steps[0]; failures roll back, whatever `on_failure`."""
    if judgement is None:
        return Transition(state, None)
    judged = replace(state, verdict={**judgement.to_mapping(), "at": now})
    if judgement.verdict is Verdict.INCONCLUSIVE:
        return Transition(judged, None)
    if judgement.verdict is Verdict.PASS:
        passes = judged.passes + 1
        counted = replace(judged, passes=passes, failures=0)
        if passes < auto.pass_intervals or not may_advance:
            return Transition(counted, None)
        return _leave_shadow(
            counted, auto, now, Cause.PASS, judgement, f"passed in shadow: {judgement.reason}"
        )
    failures = judged.failures + 1
    counted = replace(judged, failures=failures, passes=0)
    if failures < auto.failure_limit:
        return Transition(counted, None)
    new = replace(counted, status=Status.ROLLED_BACK, failures=0)
    judgements = f"{failures} failing judgement{'s' if failures > 1 else ''}"
    return _record(
        new,
        judged,
        now,
        Cause.FAIL,
        Action.ROLLBACK,
        f"rolled back in shadow after {judgements}, no user served: {judgement.reason}",
        judgement,
    )


def _leave_shadow(
    state: RouteState,
    auto: AutoRollout,
    now: float,
    cause: Cause,
    judgement: Judgement | None,
    why: str,
) -> Transition:
    """From shadow (or paused in it) to steps[0]: served traffic, judged afresh."""
    served = replace(
        state,
        status=Status.PROGRESSING,
        weight=0.0,
        step=-1,
        started_at=now,
        evidence=Evidence.fresh(_next_slice(now)),
    )
    return _advance(served, auto, now, cause, judgement, why)


def _advance(
    state: RouteState,
    auto: AutoRollout,
    now: float,
    cause: Cause,
    judgement: Judgement | None,
    why: str,
) -> Transition:
    step = state.step + 1
    if step >= len(auto.steps) or auto.steps[step] >= 100:
        new = replace(
            state,
            status=Status.PROMOTED,
            weight=100.0,
            step=len(auto.steps) - 1,
            passes=0,
            failures=0,
            step_started_at=now,
        )
        return _record(
            new, state, now, cause, Action.PROMOTE, f"promoted to 100%: {why}", judgement
        )
    weight = auto.steps[step]
    new = replace(
        state,
        weight=weight,
        step=step,
        passes=0,
        failures=0,
        step_started_at=now,
        evidence=state.evidence.new_step(),
    )
    return _record(
        new,
        state,
        now,
        cause,
        Action.ADVANCE,
        f"weight {state.weight:g}% → {weight:g}%: {why}",
        judgement,
    )


# --- operators ---------------------------------------------------------------------------


def on_operator(
    state: RouteState,
    auto: AutoRollout | None,
    action: OperatorAction,
    now: float,
    *,
    force: bool = False,
) -> Transition:
    """What an operator's action does; `TransitionRefused` when it does not apply.

    `force` overrides the re-entry cooldown of a resume (rule 10).
    """
    handler = _OPERATOR_TABLE.get((state.status, action))
    if handler is None:
        raise TransitionRefused(
            f"cannot {action.value} route {state.route!r}: it is {state.status.value}"
        )
    if action is OperatorAction.RESUME and state.status is Status.ROLLED_BACK and not force:
        _check_cooldown(state, auto, now)
    return handler(state, auto, now)


def rolled_back_at(state: RouteState) -> float | None:
    """When the rollout was last rolled back (by the judge or an operator), if ever."""
    return next((d.at for d in reversed(state.decisions) if d.action is Action.ROLLBACK), None)


def cooldown_left_s(state: RouteState, auto: AutoRollout | None, now: float) -> float:
    """How long a resume of a rolled-back rollout is still refused without force (rule 10)."""
    if state.status is not Status.ROLLED_BACK or auto is None or auto.cooldown_s <= 0:
        return 0.0
    at = rolled_back_at(state)
    return 0.0 if at is None else max(0.0, at + auto.cooldown_s - now)


def _check_cooldown(state: RouteState, auto: AutoRollout | None, now: float) -> None:
    left = cooldown_left_s(state, auto, now)
    if left <= 0:
        return
    assert auto is not None
    ago = now - (rolled_back_at(state) or now)
    raise TransitionRefused(
        f"cannot resume route {state.route!r} yet: it was rolled back {format_span(ago)} "
        f"ago, and its cooldown is {format_duration(auto.cooldown_s)}: "
        f"{format_span(left)} left, unless forced",
        left,
    )


def _pause(state: RouteState, auto: AutoRollout | None, now: float) -> Transition:
    new = replace(state, status=Status.PAUSED)
    return _record(
        new, state, now, Cause.OPERATOR, Action.PAUSE, f"paused by an operator at {state.weight:g}%"
    )


def _resume(state: RouteState, auto: AutoRollout | None, now: float) -> Transition:
    assert auto is not None
    if auto.is_ab:
        return _test(
            state,
            state.route,
            auto,
            state.canary,
            now,
            "a new A/B test, by an operator",
            Cause.OPERATOR,
        )
    if auto.shadow is not None and (state.status is Status.ROLLED_BACK or _paused_in_shadow(state)):
        new = replace(
            state,
            status=Status.SHADOW,
            weight=0.0,
            step=-1,
            passes=0,
            failures=0,
            step_started_at=now,
            started_at=now,
            evidence=Evidence.fresh(_next_slice(now), shadow=True),
        )
        return _record(
            new, state, now, Cause.OPERATOR, Action.RESUME, "resumed by an operator in shadow"
        )
    if state.status is Status.ROLLED_BACK:
        weight = auto.steps[0]
        new = replace(
            state,
            status=Status.PROGRESSING,
            weight=weight,
            step=0,
            passes=0,
            failures=0,
            step_started_at=now,
            started_at=now,
            evidence=Evidence.fresh(_next_slice(now)),  # a rollout of its own
        )
        return _record(
            new,
            state,
            now,
            Cause.OPERATOR,
            Action.RESUME,
            f"resumed by an operator from the first step, {weight:g}%",
        )
    # The judge starts again from here: what paused or held the canary is behind it.
    new = replace(
        state,
        status=Status.PROGRESSING,
        passes=0,
        failures=0,
        step_started_at=now,
        started_at=now,
        evidence=Evidence.fresh(_next_slice(now)),
    )
    return _record(
        new,
        state,
        now,
        Cause.OPERATOR,
        Action.RESUME,
        f"resumed by an operator at {state.weight:g}%",
    )


def _paused_in_shadow(state: RouteState) -> bool:
    """Paused below the first step at weight 0: only a pause in shadow leaves it so."""
    return state.status is Status.PAUSED and state.step < 0 and state.weight == 0


def _step_up(state: RouteState, auto: AutoRollout | None, now: float) -> Transition:
    assert auto is not None
    if state.status is Status.SHADOW or _paused_in_shadow(state):
        return _leave_shadow(
            state, auto, now, Cause.OPERATOR, None, "advanced out of shadow by an operator"
        )
    if state.status is Status.PAUSED:
        # As a resume: the judge starts afresh (what paused the canary is behind it).
        state = replace(
            state,
            status=Status.PROGRESSING,
            started_at=now,
            evidence=Evidence.fresh(_next_slice(now)),
        )
    return _advance(state, auto, now, Cause.OPERATOR, None, "advanced one step by an operator")


def _complete(state: RouteState, auto: AutoRollout | None, now: float) -> Transition:
    new = replace(state, status=Status.COMPLETE, step_started_at=now)
    took = format_span(now - state.started_at)
    return _record(
        new,
        state,
        now,
        Cause.OPERATOR,
        Action.COMPLETE,
        f"A/B test completed by an operator after {took} at {state.weight:g}%",
    )


def _promote(state: RouteState, auto: AutoRollout | None, now: float) -> Transition:
    status = Status.MANUAL if state.status is Status.MANUAL else Status.PROMOTED
    step = len(auto.steps) - 1 if auto is not None else -1
    new = replace(
        state, status=status, weight=100.0, step=step, passes=0, failures=0, step_started_at=now
    )
    return _record(
        new, state, now, Cause.OPERATOR, Action.PROMOTE, "promoted to 100% by an operator"
    )


def _rollback(state: RouteState, auto: AutoRollout | None, now: float) -> Transition:
    status = Status.MANUAL if state.status is Status.MANUAL else Status.ROLLED_BACK
    new = replace(
        state, status=status, weight=0.0, step=-1, passes=0, failures=0, step_started_at=now
    )
    return _record(
        new, state, now, Cause.OPERATOR, Action.ROLLBACK, "rolled back to 0% by an operator"
    )


_AUTO_STATES: Final = (
    Status.SHADOW,
    Status.PROGRESSING,
    Status.PAUSED,
    Status.PROMOTED,
    Status.ROLLED_BACK,
    *_TEST_STATES,
)
_OPERATOR_TABLE: Final[
    dict[
        tuple[Status, OperatorAction], Callable[[RouteState, AutoRollout | None, float], Transition]
    ]
] = {
    (Status.PROGRESSING, OperatorAction.PAUSE): _pause,
    (Status.SHADOW, OperatorAction.PAUSE): _pause,
    (Status.SHADOW, OperatorAction.ADVANCE): _step_up,
    (Status.PAUSED, OperatorAction.RESUME): _resume,
    (Status.ROLLED_BACK, OperatorAction.RESUME): _resume,
    (Status.COMPLETE, OperatorAction.RESUME): _resume,
    (Status.TESTING, OperatorAction.COMPLETE): _complete,
    (Status.PROGRESSING, OperatorAction.ADVANCE): _step_up,
    (Status.PAUSED, OperatorAction.ADVANCE): _step_up,
    **{(status, OperatorAction.PROMOTE): _promote for status in (*_AUTO_STATES, Status.MANUAL)},
    **{(status, OperatorAction.ROLLBACK): _rollback for status in (*_AUTO_STATES, Status.MANUAL)},
}


def _record(
    new: RouteState,
    old: RouteState | None,
    now: float,
    cause: Cause,
    action: Action,
    reason: str,
    judgement: Judgement | None = None,
) -> Transition:
    decision = Decision(
        at=now,
        cause=cause,
        action=action,
        weight_before=old.weight if old is not None else new.weight,
        weight_after=new.weight,
        status=new.status,
        reason=reason,
        judgement=judgement.to_mapping() if judgement is not None else None,
    )
    decisions = (*new.decisions, decision)[-MAX_DECISIONS:]
    return Transition(replace(new, decisions=decisions), decision)
