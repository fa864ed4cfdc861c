"""proxy.rollout.machine: the state machine as tables of (state, event) → state and decision.

A state carries the judge's evidence: a new rollout (restart, adopt, resume after a
rollback) starts it afresh from the slice after now, a new step (advance, resume after
a pause) empties the step's window and keeps the rollout's, anything else keeps it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.model import (
    AutoRollout,
    Backend,
    Checks,
    ErrorRateCheck,
    OnFailure,
    Rollout,
    Route,
    Variant,
)
from proxy.judge.analysis import CheckResult, Evidence, Judgement, Verdict, judge
from proxy.judge.stats import VariantStats
from proxy.rollout.machine import (
    MAX_DECISIONS,
    Action,
    Cause,
    Decision,
    OperatorAction,
    RouteState,
    Status,
    Transition,
    TransitionRefused,
    canary_identity,
    on_judgement,
    on_operator,
    reconcile,
    served_weight,
)
from tests.factories import CANARY_BACKEND, make_config, make_route

STEPS = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0)
AUTO = AutoRollout(steps=STEPS, pass_intervals=2, failure_limit=2)
HOLD = replace(AUTO, on_failure=OnFailure.HOLD)
NOW = 1_800_000_000.0
IDENTITY = "canary-v2"

P, F, U = Verdict.PASS, Verdict.FAIL, Verdict.INCONCLUSIVE  # U: undecided

NEXT_SLICE = 1_800_000_001  # the first whole 1 s stats slice after NOW


def variant(requests: int, errors: int = 0) -> VariantStats:
    """Stats of `requests` requests, the first `errors` of them failed."""
    stats = VariantStats()
    for i in range(requests):
        stats.record(0.2 + i / 1000, 0.05, "http_500" if i < errors else None, 12)
    return stats


# What a route two minutes into its rollout has seen: 600 canary requests, 200 of them
# at its current step.
EVIDENCE = (
    Evidence.fresh(NEXT_SLICE - 120)
    .added(variant(400, 4), variant(4000, 30), NEXT_SLICE - 60, AUTO)
    .new_step()
    .added(variant(200, 1), variant(2000, 12), NEXT_SLICE, AUTO)
)
EMPTY = VariantStats().to_mapping()


def fresh_at(now: float) -> dict[str, object]:
    """The mapping of the evidence a rollout begun at `now` starts with."""
    return Evidence.fresh(int(now // 1.0) + 1).to_mapping()


def assert_new_step(new: Evidence, old: Evidence) -> None:
    """The same rollout's window and next slice, and an empty step window."""
    assert new.to_mapping() == {**old.to_mapping(), "step_canary": EMPTY, "step_stable": EMPTY}


def state(
    status: Status = Status.PROGRESSING,
    weight: float = 5.0,
    step: int = 1,
    passes: int = 0,
    failures: int = 0,
    **changes: Any,
) -> RouteState:
    base = RouteState(
        "chat",
        status,
        weight,
        step,
        passes=passes,
        failures=failures,
        step_started_at=NOW - 60,
        started_at=NOW - 120,
        canary=IDENTITY,
        config_weight=0.0,
        evidence=EVIDENCE,
    )
    return replace(base, **changes)


def judgement(verdict: Verdict) -> Judgement:
    check = CheckResult("error_rate", verdict, 0.01, 0.01, 0.02, 500, 500, f"error rate {verdict}")
    return Judgement(verdict, (check,), 500, 500, f"error rate {verdict}")


def auto_route(weight: float = 0.0, auto: AutoRollout | None = AUTO, **changes: Any) -> Route:
    return make_route(rollout=Rollout(weight=weight, auto=auto), **changes)


def identity_of(route: Route) -> str:
    return canary_identity(route, make_config(route).backends)


@dataclass(frozen=True)
class Expect:
    status: Status
    weight: float
    step: int
    passes: int = 0
    failures: int = 0
    action: str | None = None  # the decision's action; None: no decision


def assert_transition(transition: Transition, expect: Expect) -> None:
    new = transition.state
    assert (new.status, new.weight, new.step, new.passes, new.failures) == (
        expect.status,
        expect.weight,
        expect.step,
        expect.passes,
        expect.failures,
    )
    if expect.action is None:
        assert transition.decision is None
    else:
        decision = transition.decision
        assert decision is not None
        assert decision.action == expect.action
        assert decision.at == NOW
        assert decision.weight_after == new.weight
        assert decision.status is new.status
        assert new.decisions[-1] == decision


# --- judgements -------------------------------------------------------------------------

JUDGEMENT_TABLE = [
    # (id, start, policy, verdict or None, may_advance, expected)
    ("first-pass-counted", state(), AUTO, P, True, Expect(Status.PROGRESSING, 5, 1, passes=1)),
    (
        "pass-intervals-advance",
        state(passes=1),
        AUTO,
        P,
        True,
        Expect(Status.PROGRESSING, 10, 2, action="advance"),
    ),
    (
        "single-pass-interval-advances",
        state(),
        replace(AUTO, pass_intervals=1),
        P,
        True,
        Expect(Status.PROGRESSING, 10, 2, action="advance"),
    ),
    (
        "inconclusive-keeps-passes",
        state(passes=1),
        AUTO,
        U,
        True,
        Expect(Status.PROGRESSING, 5, 1, passes=1),
    ),
    (
        "inconclusive-keeps-failures",
        state(failures=1),
        AUTO,
        U,
        True,
        Expect(Status.PROGRESSING, 5, 1, failures=1),
    ),
    (
        "pass-resets-failures",
        state(failures=1),
        AUTO,
        P,
        True,
        Expect(Status.PROGRESSING, 5, 1, passes=1),
    ),
    (
        "fail-resets-passes",
        state(passes=1),
        AUTO,
        F,
        True,
        Expect(Status.PROGRESSING, 5, 1, failures=1),
    ),
    (
        "failure-limit-rolls-back",
        state(failures=1),
        AUTO,
        F,
        True,
        Expect(Status.ROLLED_BACK, 0, -1, action="rollback"),
    ),
    (
        "failure-limit-one-rolls-back-at-once",
        state(weight=25, step=3),
        replace(AUTO, failure_limit=1),
        F,
        True,
        Expect(Status.ROLLED_BACK, 0, -1, action="rollback"),
    ),
    (
        "failure-limit-holds",
        state(failures=1),
        HOLD,
        F,
        True,
        Expect(Status.PAUSED, 5, 1, action="hold"),
    ),
    (
        "last-step-promotes",
        state(weight=50, step=4, passes=1),
        AUTO,
        P,
        True,
        Expect(Status.PROMOTED, 100, 5, action="promote"),
    ),
    (
        "past-last-step-promotes-without-a-100-step",
        state(weight=50, step=2, passes=1),
        replace(AUTO, steps=(1.0, 5.0, 50.0)),
        P,
        True,
        Expect(Status.PROMOTED, 100, 2, action="promote"),
    ),
    (
        "below-first-step-takes-it-unjudged",
        state(weight=0, step=-1),
        AUTO,
        None,
        True,
        Expect(Status.PROGRESSING, 1, 0, action="advance"),
    ),
    (
        "below-first-step-waits-outside-window",
        state(weight=0, step=-1),
        AUTO,
        None,
        False,
        Expect(Status.PROGRESSING, 0, -1),
    ),
    (
        "outside-window-counts-but-does-not-advance",
        state(passes=1),
        AUTO,
        P,
        False,
        Expect(Status.PROGRESSING, 5, 1, passes=2),
    ),
    (
        "outside-window-pass-advances-once-inside",
        state(passes=2),
        AUTO,
        P,
        True,
        Expect(Status.PROGRESSING, 10, 2, action="advance"),
    ),
    (
        "outside-window-failures-roll-back",
        state(failures=1),
        AUTO,
        F,
        False,
        Expect(Status.ROLLED_BACK, 0, -1, action="rollback"),
    ),
    (
        "outside-window-failures-hold",
        state(failures=1),
        HOLD,
        F,
        False,
        Expect(Status.PAUSED, 5, 1, action="hold"),
    ),
]


@pytest.mark.parametrize(
    ("start", "policy", "verdict", "may_advance", "expect"),
    [row[1:] for row in JUDGEMENT_TABLE],
    ids=[row[0] for row in JUDGEMENT_TABLE],
)
def test_judgement_transitions(
    start: RouteState,
    policy: AutoRollout,
    verdict: Verdict | None,
    may_advance: bool,
    expect: Expect,
) -> None:
    given_judgement = judgement(verdict) if verdict is not None else None
    transition = on_judgement(start, policy, given_judgement, NOW, may_advance)
    assert_transition(transition, expect)
    new = transition.state
    if given_judgement is not None:
        # The last verdict is kept with its numbers, whatever it did.
        assert new.verdict == {**given_judgement.to_mapping(), "at": NOW}
    if transition.decision is not None:
        decision = transition.decision
        assert decision.weight_before == start.weight
        assert decision.cause == ("fail" if verdict is F else "pass")
        expected_judgement = given_judgement.to_mapping() if given_judgement else None
        assert decision.judgement == expected_judgement
        if decision.action in ("advance", "promote"):
            assert new.step_started_at == NOW  # the next window starts now
    else:
        assert new.decisions == start.decisions
    # An advance starts the step's window afresh and keeps the rollout's; nothing else
    # a judgement does touches the evidence.
    if expect.action == "advance":
        assert_new_step(new.evidence, start.evidence)
    else:
        assert new.evidence is start.evidence
    assert new.started_at == start.started_at


@pytest.mark.parametrize(
    ("start", "reason"),
    [
        (state(passes=1), "weight 5% → 10%: error rate pass"),
        (state(weight=50, step=4, passes=1), "promoted to 100%: error rate pass"),
        (state(weight=0, step=-1), "weight 0% → 1%: no canary traffic below the first step"),
    ],
)
def test_advance_decisions_say_why(start: RouteState, reason: str) -> None:
    given_judgement = judgement(P) if start.step >= 0 else None
    decision = on_judgement(start, AUTO, given_judgement, NOW, True).decision
    assert decision is not None
    assert decision.reason == reason


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        (AUTO, "rolled back after 2 failing judgements: error rate fail"),
        (HOLD, "held at 5% after 2 failing judgements: error rate fail"),
    ],
)
def test_failure_decisions_say_why(policy: AutoRollout, reason: str) -> None:
    decision = on_judgement(state(failures=1), policy, judgement(F), NOW, True).decision
    assert decision is not None
    assert decision.reason == reason
    assert decision.judgement is not None
    assert decision.judgement["verdict"] == "fail"


@pytest.mark.parametrize(
    "start",
    [
        state(Status.PAUSED),
        state(Status.PROMOTED, weight=100, step=5),
        state(Status.ROLLED_BACK, weight=0, step=-1),
        state(Status.MANUAL, weight=30, step=-1),
    ],
    ids=lambda s: s.status.value,
)
@pytest.mark.parametrize("verdict", [P, F, U, None])
def test_non_progressing_states_ignore_judgements(
    start: RouteState, verdict: Verdict | None
) -> None:
    for failures in (0, 5):
        begun = replace(start, failures=failures, passes=failures)
        given_judgement = judgement(verdict) if verdict is not None else None
        transition = on_judgement(begun, AUTO, given_judgement, NOW, True)
        assert transition == Transition(begun, None)


def test_a_full_ramp_takes_pass_intervals_at_every_step() -> None:
    current = state(weight=0, step=-1)
    weights = [current.weight]
    for _ in range(30):
        given_judgement = judgement(P) if current.step >= 0 else None
        current = on_judgement(current, AUTO, given_judgement, NOW, True).state
        if current.weight != weights[-1]:
            weights.append(current.weight)
        if current.status is Status.PROMOTED:
            break
    assert weights == [0, 1, 5, 10, 25, 50, 100]
    assert current.status is Status.PROMOTED
    assert [d.action for d in current.decisions] == ["advance"] * 5 + ["promote"]


# --- operators --------------------------------------------------------------------------

OPERATOR_STARTS = {
    Status.PROGRESSING: state(Status.PROGRESSING, weight=10, step=2, passes=1, failures=0),
    Status.PAUSED: state(Status.PAUSED, weight=10, step=2, passes=1),
    Status.PROMOTED: state(Status.PROMOTED, weight=100, step=5),
    Status.ROLLED_BACK: state(Status.ROLLED_BACK, weight=0, step=-1),
    Status.MANUAL: state(Status.MANUAL, weight=30, step=-1, config_weight=30),
}

PAUSE, RESUME = OperatorAction.PAUSE, OperatorAction.RESUME
PROMOTE, ROLLBACK = OperatorAction.PROMOTE, OperatorAction.ROLLBACK
ADVANCE = OperatorAction.ADVANCE

OPERATOR_TABLE: list[tuple[Status, OperatorAction, tuple[Status, float, int] | None]] = [
    (Status.PROGRESSING, PAUSE, (Status.PAUSED, 10, 2)),
    (Status.PROGRESSING, RESUME, None),
    (Status.PROGRESSING, ADVANCE, (Status.PROGRESSING, 25, 3)),
    (Status.PROGRESSING, PROMOTE, (Status.PROMOTED, 100, 5)),
    (Status.PROGRESSING, ROLLBACK, (Status.ROLLED_BACK, 0, -1)),
    (Status.PAUSED, PAUSE, None),
    (Status.PAUSED, RESUME, (Status.PROGRESSING, 10, 2)),
    (Status.PAUSED, ADVANCE, (Status.PROGRESSING, 25, 3)),  # and judged afresh
    (Status.PAUSED, PROMOTE, (Status.PROMOTED, 100, 5)),
    (Status.PAUSED, ROLLBACK, (Status.ROLLED_BACK, 0, -1)),
    (Status.PROMOTED, PAUSE, None),
    (Status.PROMOTED, RESUME, None),
    (Status.PROMOTED, ADVANCE, None),
    (Status.PROMOTED, PROMOTE, (Status.PROMOTED, 100, 5)),
    (Status.PROMOTED, ROLLBACK, (Status.ROLLED_BACK, 0, -1)),
    (Status.ROLLED_BACK, PAUSE, None),
    (Status.ROLLED_BACK, RESUME, (Status.PROGRESSING, 1, 0)),  # from the first step
    (Status.ROLLED_BACK, ADVANCE, None),  # a resume starts it again
    (Status.ROLLED_BACK, PROMOTE, (Status.PROMOTED, 100, 5)),
    (Status.ROLLED_BACK, ROLLBACK, (Status.ROLLED_BACK, 0, -1)),
    (Status.MANUAL, PAUSE, None),
    (Status.MANUAL, RESUME, None),
    (Status.MANUAL, ADVANCE, None),  # no steps
    (Status.MANUAL, PROMOTE, (Status.MANUAL, 100, -1)),
    (Status.MANUAL, ROLLBACK, (Status.MANUAL, 0, -1)),
]


@pytest.mark.parametrize(
    ("status", "action", "expected"),
    OPERATOR_TABLE,
    ids=[f"{status.value}-{action.value}" for status, action, _ in OPERATOR_TABLE],
)
def test_operator_actions_from_every_state(
    status: Status, action: OperatorAction, expected: tuple[Status, float, int] | None
) -> None:
    start = OPERATOR_STARTS[status]
    policy = None if status is Status.MANUAL else AUTO
    if expected is None:
        with pytest.raises(TransitionRefused, match=f"cannot {action.value} route 'chat'"):
            on_operator(start, policy, action, NOW)
        return
    transition = on_operator(start, policy, action, NOW)
    new = transition.state
    assert (new.status, new.weight, new.step) == expected
    # A pause keeps the counts where they were; every other action starts them afresh.
    counts = (start.passes, start.failures) if action is PAUSE else (0, 0)
    assert (new.passes, new.failures) == counts
    assert new.step_started_at == (start.step_started_at if action is PAUSE else NOW)
    # Resuming after a rollback is a rollout of its own; after a pause, a new step of
    # the same one. Pause, promote and rollback keep what the judge has seen.
    if action is RESUME or (action is ADVANCE and status is Status.PAUSED):
        # A resumed rollout is judged afresh, whatever paused, held or rolled it back.
        assert new.evidence.to_mapping() == fresh_at(NOW)
        assert new.started_at == NOW
    elif action is ADVANCE:  # a new step of the same rollout
        assert_new_step(new.evidence, start.evidence)
        assert new.started_at == start.started_at
    else:
        assert new.evidence is start.evidence
        assert new.started_at == start.started_at
    decision = transition.decision
    assert decision is not None
    assert (decision.cause, decision.action) == ("operator", action.value)
    assert (decision.weight_before, decision.weight_after) == (start.weight, new.weight)
    assert new.decisions == (*start.decisions, decision)


def test_refused_action_names_the_state() -> None:
    with pytest.raises(TransitionRefused) as caught:
        on_operator(OPERATOR_STARTS[Status.PROMOTED], AUTO, RESUME, NOW)
    assert str(caught.value) == "cannot resume route 'chat': it is promoted"


def test_advance_past_the_last_step_promotes() -> None:
    last = state(weight=50, step=4)
    transition = on_operator(last, AUTO, ADVANCE, NOW)
    assert (transition.state.status, transition.state.weight) == (Status.PROMOTED, 100)
    assert transition.decision is not None
    assert transition.decision.reason == "promoted to 100%: advanced one step by an operator"
    below = on_operator(state(weight=0.5, step=-1), AUTO, ADVANCE, NOW)
    assert below.decision is not None
    assert below.decision.reason == "weight 0.5% → 1%: advanced one step by an operator"


COOLDOWN = replace(AUTO, cooldown_s=3600)


def rolled_back_at(at: float) -> RouteState:
    """A rollout the judge rolled back at `at`."""
    return on_judgement(state(failures=1), COOLDOWN, judgement(F), at, True).state


@pytest.mark.parametrize(
    ("ago_s", "refused_for"),
    [(0, "1h"), (1, "59m 59s"), (3599, "1s"), (3600, None), (86_400, None)],
)
def test_a_resume_within_the_cooldown_is_refused_with_the_time_left(
    ago_s: float, refused_for: str | None
) -> None:
    start = rolled_back_at(NOW - ago_s)
    if refused_for is None:
        assert on_operator(start, COOLDOWN, RESUME, NOW).state.status is Status.PROGRESSING
        return
    with pytest.raises(TransitionRefused) as caught:
        on_operator(start, COOLDOWN, RESUME, NOW)
    assert f"cooldown is 1h: {refused_for} left, unless forced" in str(caught.value)
    assert caught.value.retry_after_s == 3600 - ago_s
    forced = on_operator(start, COOLDOWN, RESUME, NOW, force=True)
    assert (forced.state.status, forced.state.weight) == (Status.PROGRESSING, 1)


def test_the_cooldown_counts_from_an_operators_rollback_too() -> None:
    promoted = state(Status.PROMOTED, weight=100, step=5)
    rolled = on_operator(promoted, COOLDOWN, ROLLBACK, NOW - 60).state
    with pytest.raises(TransitionRefused, match="rolled back 1m ago"):
        on_operator(rolled, COOLDOWN, RESUME, NOW)
    # Without a cooldown (the default) a resume is never refused.
    assert on_operator(rolled, AUTO, RESUME, NOW).state.status is Status.PROGRESSING


def test_resume_after_rollback_ramps_again_from_the_first_step() -> None:
    rolled_back = on_judgement(state(failures=1), AUTO, judgement(F), NOW, True).state
    assert rolled_back.evidence is EVIDENCE  # a rollback keeps what showed the failure
    resumed = on_operator(rolled_back, AUTO, RESUME, NOW + 1).state
    assert (resumed.status, resumed.weight, resumed.step) == (Status.PROGRESSING, 1, 0)
    assert resumed.step_started_at == NOW + 1
    assert resumed.started_at == NOW + 1
    assert resumed.evidence.to_mapping() == fresh_at(NOW + 1)
    assert resumed.evidence.next_slice == NEXT_SLICE + 1
    advanced = on_judgement(
        on_judgement(resumed, AUTO, judgement(P), NOW + 2, True).state,
        AUTO,
        judgement(P),
        NOW,
        True,
    ).state
    assert (advanced.weight, advanced.step) == (5, 1)


# --- reconcile with the config ----------------------------------------------------------


@pytest.mark.parametrize(
    ("config_weight", "weight", "step", "action"),
    [
        (0.0, 1.0, 0, "restart"),  # a first start at weight 0 begins at steps[0]
        (0.5, 0.5, -1, "adopt"),  # below the first step: the next judgement takes steps[0]
        (1.0, 1.0, 0, "adopt"),
        (25.0, 25.0, 3, "adopt"),
        (30.0, 30.0, 3, "adopt"),  # between steps: at the step below, next is 50
        (100.0, 100.0, 5, "adopt"),
    ],
)
def test_first_start_adopts_the_config_weight(
    config_weight: float, weight: float, step: int, action: str
) -> None:
    route = auto_route(config_weight)
    transition = reconcile(None, route, IDENTITY, NOW)
    new = transition.state
    assert (new.route, new.status, new.weight, new.step) == (
        "chat",
        Status.PROGRESSING,
        weight,
        step,
    )
    assert (new.canary, new.config_weight, new.step_started_at) == (IDENTITY, config_weight, NOW)
    assert new.started_at == NOW
    assert new.evidence.to_mapping() == fresh_at(NOW)
    assert transition.decision is not None
    assert (transition.decision.cause, transition.decision.action) == ("config", action)


@pytest.mark.parametrize(
    ("offset", "next_slice"),
    [(0.0, NEXT_SLICE), (0.25, NEXT_SLICE), (0.999, NEXT_SLICE), (1.0, NEXT_SLICE + 1)],
)
@pytest.mark.parametrize("config_weight", [0.0, 25.0], ids=["restart", "adopt"])
def test_a_rollout_gathers_evidence_from_the_slice_after_it_began(
    offset: float, next_slice: int, config_weight: float
) -> None:
    # The slice holding `now` began before the rollout did: it is not the canary's.
    new = reconcile(None, auto_route(config_weight), IDENTITY, NOW + offset).state
    assert new.evidence.next_slice == next_slice
    assert new.started_at == NOW + offset


def test_adopted_weight_goes_on_to_the_next_step_above_it() -> None:
    adopted = reconcile(None, auto_route(30.0), IDENTITY, NOW).state
    counted = on_judgement(adopted, AUTO, judgement(P), NOW, True).state
    advanced = on_judgement(counted, AUTO, judgement(P), NOW, True).state
    assert (advanced.weight, advanced.step) == (50, 4)


RECONCILE_STARTS = [
    state(Status.PROGRESSING, weight=10, step=2, passes=1),
    state(Status.PAUSED, weight=10, step=2),
    state(Status.PROMOTED, weight=100, step=5),
    state(Status.ROLLED_BACK, weight=0, step=-1),
    state(Status.MANUAL, weight=30, step=-1),
]


@pytest.mark.parametrize("start", RECONCILE_STARTS, ids=lambda s: s.status.value)
def test_a_new_canary_restarts_at_the_first_step(start: RouteState) -> None:
    transition = reconcile(start, auto_route(0.0), "another-canary", NOW)
    new = transition.state
    assert (new.status, new.weight, new.step, new.passes, new.failures) == (
        Status.PROGRESSING,
        1.0,
        0,
        0,
        0,
    )
    assert new.canary == "another-canary"
    assert transition.decision is not None
    assert transition.decision.action == "restart"
    assert transition.decision.weight_before == start.weight
    assert new.version == start.version
    # Nothing the old canary did counts for the new one.
    assert (new.started_at, new.step_started_at) == (NOW, NOW)
    assert new.evidence.to_mapping() == fresh_at(NOW)


@pytest.mark.parametrize("start", RECONCILE_STARTS, ids=lambda s: s.status.value)
def test_an_edited_config_weight_is_adopted(start: RouteState) -> None:
    transition = reconcile(start, auto_route(25.0), IDENTITY, NOW)
    new = transition.state
    assert (new.status, new.weight, new.step, new.config_weight) == (
        Status.PROGRESSING,
        25.0,
        3,
        25.0,
    )
    assert transition.decision is not None
    assert transition.decision.action == "adopt"
    assert "edited to 25%" in transition.decision.reason
    assert new.started_at == NOW
    assert new.evidence.to_mapping() == fresh_at(NOW)


@pytest.mark.parametrize(
    "start",
    [s for s in RECONCILE_STARTS if s.status is not Status.MANUAL],
    ids=lambda s: s.status.value,
)
def test_the_same_config_keeps_the_state(start: RouteState) -> None:
    # Rolled back stays rolled back, promoted stays promoted, on an unrelated reload.
    transition = reconcile(start, auto_route(0.0), IDENTITY, NOW)
    assert transition == Transition(start, None)


def test_reload_with_new_steps_rereads_the_step_index() -> None:
    start = state(Status.PROGRESSING, weight=10, step=2)
    transition = reconcile(
        start, auto_route(0.0, replace(AUTO, steps=(10.0, 100.0))), IDENTITY, NOW
    )
    assert transition.decision is None
    assert (transition.state.weight, transition.state.step) == (10, 0)
    assert transition.state.evidence is start.evidence
    assert transition.state.started_at == start.started_at


def test_an_automatic_rollout_configured_on_a_manual_route_starts_from_its_weight() -> None:
    start = state(Status.MANUAL, weight=30, step=-1)
    transition = reconcile(start, auto_route(0.0), IDENTITY, NOW)
    assert (transition.state.status, transition.state.weight, transition.state.step) == (
        Status.PROGRESSING,
        30,
        3,
    )
    assert transition.decision is not None
    assert transition.decision.action == "adopt"
    assert transition.state.started_at == NOW
    assert transition.state.evidence.to_mapping() == fresh_at(NOW)


# --- manual routes ----------------------------------------------------------------------


def test_a_manual_route_serves_the_config_weight() -> None:
    transition = reconcile(None, auto_route(12.5, auto=None), IDENTITY, NOW)
    new = transition.state
    assert (new.status, new.weight, new.step, new.config_weight) == (Status.MANUAL, 12.5, -1, 12.5)
    assert transition.decision is None
    again = reconcile(new, auto_route(12.5, auto=None), IDENTITY, NOW + 5)
    assert again.decision is None
    assert again.state.weight == 12.5


@pytest.mark.parametrize(("action", "weight"), [(PROMOTE, 100.0), (ROLLBACK, 0.0)])
def test_an_operator_action_on_a_manual_route_holds_until_the_weight_is_edited(
    action: OperatorAction, weight: float
) -> None:
    route = auto_route(12.5, auto=None)
    manual = reconcile(None, route, IDENTITY, NOW).state
    acted = on_operator(manual, None, action, NOW).state
    assert (acted.status, acted.weight) == (Status.MANUAL, weight)
    # An unrelated reload keeps the operator's weight, silently.
    reloaded = reconcile(acted, route, IDENTITY, NOW + 1)
    assert reloaded.decision is None
    assert reloaded.state.weight == weight
    # Editing the weight in the config takes over again.
    edited = reconcile(reloaded.state, auto_route(20.0, auto=None), IDENTITY, NOW + 2)
    assert (edited.state.status, edited.state.weight) == (Status.MANUAL, 20.0)
    assert edited.decision is not None
    assert (edited.decision.cause, edited.decision.action) == ("config", "manual")


def test_a_new_canary_on_a_manual_route_gets_the_config_weight() -> None:
    # An operator's promote of the old canary must not send all traffic to a new one.
    route = auto_route(5.0, auto=None)
    promoted = on_operator(reconcile(None, route, IDENTITY, NOW).state, None, PROMOTE, NOW).state
    transition = reconcile(promoted, route, "another-canary", NOW + 1)
    assert (transition.state.status, transition.state.weight) == (Status.MANUAL, 5.0)
    assert transition.state.canary == "another-canary"
    assert transition.decision is not None


@pytest.mark.parametrize(
    "start",
    [s for s in RECONCILE_STARTS if s.status is not Status.MANUAL],
    ids=lambda s: s.status.value,
)
def test_removing_auto_makes_the_route_manual_at_the_config_weight(start: RouteState) -> None:
    transition = reconcile(start, auto_route(7.0, auto=None), IDENTITY, NOW)
    assert (transition.state.status, transition.state.weight, transition.state.step) == (
        Status.MANUAL,
        7.0,
        -1,
    )
    assert transition.decision is not None
    assert transition.decision.action == "manual"


# --- identity, serving, records ---------------------------------------------------------


def test_canary_identity_changes_with_backend_url_and_model_rewrite() -> None:
    route = auto_route()
    base = identity_of(route)
    assert identity_of(auto_route()) == base
    rewritten = auto_route(model_rewrite=MappingProxyType({Variant.CANARY: "llama-3.1"}))
    assert identity_of(rewritten) != base
    stable_rewrite = auto_route(model_rewrite=MappingProxyType({Variant.STABLE: "llama-3"}))
    assert identity_of(stable_rewrite) == base
    moved: dict[str, Backend] = dict(make_config(route).backends)
    moved["v2"] = replace(CANARY_BACKEND, url="http://127.0.0.1:3")
    assert canary_identity(route, moved) != base


@pytest.mark.parametrize(
    ("weight", "may_serve", "served"),
    [(25.0, True, 25.0), (25.0, False, 0.0), (0.0, True, 0.0), (100.0, False, 0.0)],
)
def test_served_weight_is_zero_outside_a_serve_window(
    weight: float, may_serve: bool, served: float
) -> None:
    assert served_weight(state(weight=weight), may_serve) == served


def test_decisions_are_capped() -> None:
    current = state()
    for i in range(MAX_DECISIONS + 7):
        action = PAUSE if current.status is Status.PROGRESSING else RESUME
        current = on_operator(current, AUTO, action, NOW + i).state
    assert len(current.decisions) == MAX_DECISIONS
    assert current.decisions[-1].at == NOW + MAX_DECISIONS + 6
    assert current.decisions[0].at == NOW + 7


def gathered(
    current: RouteState,
    canary: VariantStats,
    stable: VariantStats,
    policy: AutoRollout = AUTO,
) -> RouteState:
    """The state with 30 more slices of stats in its evidence, as the controller adds them."""
    evidence = current.evidence
    return replace(
        current, evidence=evidence.added(canary, stable, evidence.next_slice + 30, policy)
    )


def rich_state() -> RouteState:
    """A state with decisions (with and without judgements), a last verdict, and evidence
    over two steps."""
    current = reconcile(None, auto_route(0.0), IDENTITY, NOW).state
    current = gathered(current, variant(150, 2), variant(1500, 9))
    current = on_judgement(current, AUTO, judgement(P), NOW + 30, True).state
    current = gathered(current, variant(150, 1), variant(1500, 8))
    current = on_judgement(current, AUTO, judgement(P), NOW + 60, True).state
    current = gathered(current, variant(600, 40), variant(1500, 7))
    current = on_judgement(current, AUTO, judgement(F), NOW + 90, True).state
    return replace(current, version=7)


@pytest.mark.parametrize("via_json", [False, True])
def test_state_round_trips_through_its_mapping(via_json: bool) -> None:
    original = rich_state()
    assert original.verdict is not None
    assert len(original.decisions) == 2
    assert original.decisions[-1].judgement is not None
    assert original.started_at == NOW
    assert (original.evidence.rollout_canary.requests, original.evidence.step_canary.requests) == (
        900,
        600,
    )
    mapping = original.to_mapping()
    if via_json:
        mapping = json.loads(json.dumps(mapping))
    restored = RouteState.from_mapping(mapping)
    assert restored.started_at == NOW
    assert restored.evidence.next_slice == NEXT_SLICE + 90
    assert restored.evidence.to_mapping() == original.evidence.to_mapping()
    assert restored.to_mapping() == original.to_mapping()
    assert restored.last_decision == original.last_decision
    # A stored and reloaded state is the state that was stored (the store's
    # compare-and-set and its tests rely on it).
    assert restored == original


def test_a_state_stored_without_evidence_loads_with_empty_windows() -> None:
    # A state written before the evidence was stored with it.
    mapping = rich_state().to_mapping()
    del mapping["evidence"], mapping["started_at"]
    restored = RouteState.from_mapping(mapping)
    assert restored.started_at == 0.0
    for window in ("rollout_canary", "rollout_stable", "step_canary", "step_stable"):
        assert restored.evidence.to_mapping()[window] == EMPTY
    assert (restored.weight, restored.step, restored.version) == (5.0, 1, 7)


# --- judged rollouts: what each window of evidence does ---------------------------------

JUDGED = replace(AUTO, checks=Checks(error_rate=ErrorRateCheck(max=0.05)))


def judged(
    current: RouteState,
    policy: AutoRollout,
    canary: VariantStats,
    stable: VariantStats,
    now: float,
) -> Transition:
    """One interval: its stats join the evidence, then the judge's verdict is applied."""
    current = gathered(current, canary, stable, policy)
    return on_judgement(current, policy, judge(current.evidence, policy), now, True)


def test_each_step_passes_on_its_own_data() -> None:
    current = reconcile(None, auto_route(0.0, JUDGED), IDENTITY, NOW).state
    # One interval is one observation of its time (a burst would look the same), so a
    # step's first judgement waits for a second interval.
    first = judged(current, JUDGED, variant(300), variant(3000), NOW + 30)
    assert (first.decision, first.state.passes) == (None, 0)
    current = judged(first.state, JUDGED, variant(300), variant(3000), NOW + 60).state
    assert current.passes == 1
    advanced = judged(current, JUDGED, variant(300), variant(3000), NOW + 90)
    assert advanced.decision is not None
    assert advanced.decision.action == "advance"
    current = advanced.state
    assert (current.weight, current.evidence.rollout_canary.requests) == (5, 900)
    # Judged again before the new step has data: the earlier passes do not carry over.
    again = judged(current, JUDGED, VariantStats(), VariantStats(), NOW + 120)
    assert again.decision is None
    assert (again.state.weight, again.state.passes) == (5, 0)
    assert again.state.verdict is not None
    assert again.state.verdict["verdict"] == "inconclusive"
    assert again.state.verdict["reason"] == "too little data at this step: 0 of 100 canary requests"
    checks = again.state.verdict["checks"]
    assert isinstance(checks, list)
    (check,) = checks
    assert check["reason"] == (
        "error rate n/a (n=0) vs stable n/a (n=0) at this step: "
        "too little data at this step (0 of 100)"
    )
    for at, passes in ((150, 0), (180, 1)):
        current = judged(current, JUDGED, variant(100), variant(1000), NOW + at).state
        assert current.passes == passes
    current = judged(current, JUDGED, variant(100), variant(1000), NOW + 210).state
    assert (current.weight, current.step, current.passes) == (10, 2, 0)
    assert current.evidence.rollout_canary.requests == 1200
    assert current.evidence.step_canary.requests == 0
    assert current.started_at == NOW


def test_resuming_a_held_canary_judges_it_afresh() -> None:
    policy = replace(JUDGED, on_failure=OnFailure.HOLD)
    current = reconcile(None, auto_route(0.0, policy), IDENTITY, NOW).state
    for at in (30, 60, 90):  # the first slice alone is one observation
        current = judged(current, policy, variant(200, 30), variant(2000, 20), NOW + at).state
    assert current.status is Status.PAUSED
    assert current.evidence.rollout_canary.errors == 90
    # An operator resumes (having fixed the canary, say): what held it is behind it.
    resumed = on_operator(current, policy, RESUME, NOW + 100).state
    assert resumed.evidence.rollout_canary.requests == 0
    assert resumed.evidence.step_canary.requests == 0
    assert resumed.started_at == NOW + 100
    after = judged(resumed, policy, variant(200), variant(2000), NOW + 130)
    assert after.state.failures == 0
    assert after.state.verdict is not None
    assert after.state.verdict["verdict"] != "fail"


def test_decision_round_trips_through_its_mapping() -> None:
    decision = Decision(
        NOW, Cause.OPERATOR, Action.PAUSE, 10.0, 10.0, Status.PAUSED, "paused", None
    )
    assert Decision.from_mapping(decision.to_mapping()) == decision


# --- the ramp is monotone ---------------------------------------------------------------

events = st.lists(
    st.tuples(st.sampled_from([P, F, U, "resume"]), st.booleans()), min_size=1, max_size=60
)


@settings(max_examples=300, deadline=None)
@given(
    events=events,
    on_failure=st.sampled_from(list(OnFailure)),
    pass_intervals=st.integers(1, 3),
    failure_limit=st.integers(1, 3),
)
def test_weight_stays_on_the_steps_and_only_rollbacks_lower_it(
    events: list[tuple[Verdict | str, bool]],
    on_failure: OnFailure,
    pass_intervals: int,
    failure_limit: int,
) -> None:
    policy = replace(
        AUTO, on_failure=on_failure, pass_intervals=pass_intervals, failure_limit=failure_limit
    )
    allowed = {0.0, *STEPS, 100.0}
    current = reconcile(None, auto_route(0.0, policy), IDENTITY, NOW).state
    for at, (event, may_advance) in enumerate(events):
        if event == "resume":
            if current.status not in (Status.PAUSED, Status.ROLLED_BACK):
                continue
            transition = on_operator(current, policy, RESUME, NOW + at)
        else:
            assert isinstance(event, Verdict)
            current = gathered(current, ONE, ONE)
            given_judgement = judgement(event) if current.step >= 0 else None
            transition = on_judgement(current, policy, given_judgement, NOW + at, may_advance)
        new = transition.state
        assert new.weight in allowed
        assert new.step == (-1 if new.weight == 0 else STEPS.index(new.weight))
        if new.weight < current.weight:
            assert transition.decision is not None
            assert transition.decision.action == "rollback"
        if new.weight != current.weight:
            assert transition.decision is not None
        assert_evidence_follows(current, transition, NOW + at)
        current = new


ONE = variant(1)


def assert_evidence_follows(old: RouteState, transition: Transition, now: float) -> None:
    """Only a new rollout (or a resume) restarts the evidence, and only a new step its
    step window."""
    new, decision = transition.state, transition.decision
    action = decision.action if decision is not None else None
    if action == "resume":
        assert new.evidence.to_mapping() == fresh_at(now)
        assert new.started_at == now
        return
    assert new.started_at == old.started_at
    if action == "advance":
        assert_new_step(new.evidence, old.evidence)
    else:
        assert new.evidence is old.evidence
    evidence = new.evidence
    assert evidence.rollout_canary.requests >= evidence.step_canary.requests
