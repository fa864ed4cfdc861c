"""A/B mode (`rollout.ab`): a fixed split that no judgement moves, complete at the end
of its duration or on demand, stopped only by its guard. The pure state machine, the
config, and the planner that judges it."""

from __future__ import annotations

from dataclasses import replace

import jsonschema
import pytest

from proxy.config import ConfigError, parse_config
from proxy.config.model import AbTest, Checks, ErrorRateCheck, Rollout, Route
from proxy.config.schema import config_schema
from proxy.judge.analysis import CheckResult, Evidence, Judgement, Verdict
from proxy.rollout.machine import (
    Action,
    Cause,
    OperatorAction,
    RouteState,
    Status,
    TransitionRefused,
    ab_left_s,
    canary_identity,
    on_judgement,
    on_operator,
    reconcile,
)
from proxy.rollout.planner import Fleet, due, plan
from tests.factories import make_config, make_route

NOW = 1_800_000_000.0
AB = AbTest(duration_s=3600.0, interval_s=30.0, guard=Checks(error_rate=ErrorRateCheck(max=0.2)))
POLICY = AB.policy(50.0)


def ab_route(weight: float = 50.0, ab: AbTest = AB) -> Route:
    return make_route(rollout=Rollout(weight=weight, auto=ab.policy(weight), ab=ab))


def identity(route: Route) -> str:
    return canary_identity(route, make_config(route).backends)


def started(route: Route | None = None) -> RouteState:
    route = route or ab_route()
    transition = reconcile(None, route, identity(route), NOW)
    return transition.state


def judged(verdict: Verdict) -> Judgement:
    check = CheckResult("error_rate", verdict, 0.3, 0.01, 0.2, 500, 500, f"error rate {verdict}")
    return Judgement(verdict, (check,), 500, 500, f"error rate {verdict}")


# --- the state machine --------------------------------------------------------------------


def test_a_test_starts_at_its_weight_with_a_decision_saying_for_how_long() -> None:
    route = ab_route()
    transition = reconcile(None, route, identity(route), NOW)
    state = transition.state
    assert (state.status, state.weight, state.step, state.started_at) == (
        Status.TESTING,
        50.0,
        0,
        NOW,
    )
    assert state.evidence == Evidence.fresh(int(NOW) + 1)
    decision = transition.decision
    assert decision is not None
    assert (decision.action, decision.cause) == (Action.TEST, Cause.CONFIG)
    assert decision.reason == "weight 50% for 1h: an A/B test starts"
    assert ab_left_s(state, POLICY, NOW + 600) == 3000


@pytest.mark.parametrize("verdict", [Verdict.PASS, Verdict.INCONCLUSIVE])
def test_no_judgement_moves_the_weight_of_a_test(verdict: Verdict) -> None:
    state = started()
    for k in range(1, 100):  # passes far beyond pass_intervals
        transition = on_judgement(state, POLICY, judged(verdict), NOW + 30 * k, True)
        assert transition.decision is None
        state = transition.state
        assert (state.status, state.weight) == (Status.TESTING, 50.0)
    assert state.verdict is not None  # each judgement is kept for the status page


def test_the_test_is_complete_at_the_first_judgement_past_its_duration() -> None:
    state = started()
    before = on_judgement(state, POLICY, judged(Verdict.PASS), NOW + 3599, True)
    assert before.state.status is Status.TESTING
    transition = on_judgement(before.state, POLICY, judged(Verdict.PASS), NOW + 3605, True)
    new = transition.state
    assert (new.status, new.weight) == (Status.COMPLETE, 50.0)  # the split stays
    decision = transition.decision
    assert decision is not None
    assert (decision.action, decision.cause) == (Action.COMPLETE, Cause.DURATION)
    assert decision.reason == "A/B test complete after 1h at 50%: see its report"
    # Complete, nothing judges it any more, and it waits for nobody.
    assert on_judgement(new, POLICY, judged(Verdict.FAIL), NOW + 4000, True).decision is None
    assert ab_left_s(new, POLICY, NOW + 4000) == 0


def test_its_guard_stops_a_canary_beyond_gross_limits() -> None:
    state = started()
    once = on_judgement(state, POLICY, judged(Verdict.FAIL), NOW + 30, True)
    assert (once.state.status, once.state.failures, once.decision) == (Status.TESTING, 1, None)
    # A failure not in a row is forgotten.
    reset = on_judgement(once.state, POLICY, judged(Verdict.INCONCLUSIVE), NOW + 60, True)
    assert reset.state.failures == 0
    twice = on_judgement(
        on_judgement(reset.state, POLICY, judged(Verdict.FAIL), NOW + 90, True).state,
        POLICY,
        judged(Verdict.FAIL),
        NOW + 120,
        True,
    )
    assert (twice.state.status, twice.state.weight) == (Status.ROLLED_BACK, 0.0)
    assert twice.decision is not None
    assert twice.decision.reason.startswith(
        "A/B test stopped by its guard after 2 failing judgements: error rate fail"
    )


def test_operators_complete_promote_roll_back_and_restart_a_test() -> None:
    state = started()
    done = on_operator(state, POLICY, OperatorAction.COMPLETE, NOW + 600)
    assert (done.state.status, done.state.weight) == (Status.COMPLETE, 50.0)
    assert done.decision is not None
    assert done.decision.reason == "A/B test completed by an operator after 10m at 50%"
    again = on_operator(done.state, POLICY, OperatorAction.RESUME, NOW + 700)
    assert (again.state.status, again.state.weight, again.state.started_at) == (
        Status.TESTING,
        50.0,
        NOW + 700,
    )
    assert again.decision is not None
    assert again.decision.cause is Cause.OPERATOR
    promoted = on_operator(again.state, POLICY, OperatorAction.PROMOTE, NOW + 800)
    assert (promoted.state.status, promoted.state.weight) == (Status.PROMOTED, 100.0)
    rolled = on_operator(state, POLICY, OperatorAction.ROLLBACK, NOW + 800)
    assert (rolled.state.status, rolled.state.weight) == (Status.ROLLED_BACK, 0.0)
    restarted = on_operator(rolled.state, POLICY, OperatorAction.RESUME, NOW + 900)
    assert (restarted.state.status, restarted.state.weight) == (Status.TESTING, 50.0)


@pytest.mark.parametrize("action", [OperatorAction.PAUSE, OperatorAction.ADVANCE])
def test_a_test_is_neither_paused_nor_stepped_up(action: OperatorAction) -> None:
    with pytest.raises(
        TransitionRefused, match=f"cannot {action.value} route 'chat': it is testing"
    ):
        on_operator(started(), POLICY, action, NOW + 10)


def test_complete_applies_to_a_running_test_only() -> None:
    done = on_operator(started(), POLICY, OperatorAction.COMPLETE, NOW + 10).state
    with pytest.raises(TransitionRefused, match="cannot complete route 'chat': it is complete"):
        on_operator(done, POLICY, OperatorAction.COMPLETE, NOW + 20)


def test_a_reload_keeps_a_test_and_an_edit_starts_another() -> None:
    route = ab_route()
    state = on_judgement(started(route), POLICY, judged(Verdict.PASS), NOW + 30, True).state
    kept = reconcile(state, route, identity(route), NOW + 60)
    assert kept.decision is None
    assert kept.state == state
    done = on_operator(state, POLICY, OperatorAction.COMPLETE, NOW + 90).state
    assert reconcile(done, route, identity(route), NOW + 120).state.status is Status.COMPLETE
    edited = reconcile(state, ab_route(weight=30), identity(route), NOW + 60)
    assert (edited.state.status, edited.state.weight) == (Status.TESTING, 30.0)
    assert edited.decision is not None
    assert (
        edited.decision.reason == "weight 30% for 1h: the weight was edited to 30%: a new A/B test"
    )
    # From a ramp to a test, and back: each starts its own.
    ramp = make_route(
        rollout=Rollout(weight=0, auto=replace(POLICY, ab_duration_s=0.0, steps=(5.0, 100.0)))
    )
    to_ramp = reconcile(state, ramp, identity(ramp), NOW + 60)
    assert (to_ramp.state.status, to_ramp.state.weight) == (Status.PROGRESSING, 0.0)
    back = reconcile(to_ramp.state, route, identity(route), NOW + 90)
    assert back.state.status is Status.TESTING


def test_the_planner_judges_a_test_and_completes_it_on_time() -> None:
    route = ab_route(ab=replace(AB, duration_s=60.0))
    config = make_config(route)
    state = started(route)
    timers = {"chat": NOW + 30}
    assert due(config, {"chat": state}, timers, NOW + 30) == [route]
    first = plan(NOW + 30, {"chat": state}, {}, config, Fleet(leader=True), timers)
    (one,) = first.judged
    assert one.transition.state.status is Status.TESTING
    second = plan(
        NOW + 61, {"chat": one.transition.state}, {}, config, Fleet(leader=True), first.timers
    )
    (two,) = second.judged
    assert two.transition.state.status is Status.COMPLETE
    assert due(config, {"chat": two.transition.state}, second.timers, NOW + 200) == []


# --- the config ---------------------------------------------------------------------------

BACKENDS = """\
backends:
  v1: {url: "http://10.0.0.1:8000"}
  v2: {url: "http://10.0.0.2:8000"}
routes:
  - name: chat
    stable: v1
    canary: v2
"""


def rollout_of(text: str) -> Rollout:
    return parse_config(BACKENDS + "    rollout: " + text + "\n", environ={}).routes[0].rollout


def problems(text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse_config(BACKENDS + "    rollout: " + text + "\n", environ={})
    return caught.value.problems


def test_an_ab_section_reads_into_a_test_and_its_policy() -> None:
    rollout = rollout_of(
        "{weight: 50, ab: {duration: 2h, interval: 10s, guard: {error_rate: {max: 0.2}}}}"
    )
    assert rollout.ab == AbTest(
        duration_s=7200.0, interval_s=10.0, guard=Checks(error_rate=ErrorRateCheck(max=0.2))
    )
    auto = rollout.auto
    assert auto is not None
    assert (auto.steps, auto.ab_duration_s, auto.interval_s, auto.is_ab) == (
        (50.0,),
        7200,
        10,
        True,
    )
    assert rollout_of("{weight: 10, ab: {duration: 30m}}").ab == AbTest(duration_s=1800.0)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{weight: 50, ab: {}}", "routes[0].rollout.ab.duration: is required"),
        ("{ab: {duration: 1h}}",
         "routes[0].rollout.weight: an A/B test (ab) splits the traffic: above 0 and below 100, "
         "got 0"),
        ("{weight: 100, ab: {duration: 1h}}",
         "routes[0].rollout.weight: an A/B test (ab) splits the traffic: above 0 and below 100, "
         "got 100"),
        ("{weight: 50, ab: {duration: 1h}, auto: {steps: [50]}}",
         "routes[0].rollout.ab: cannot be used with auto: a route either ramps (auto) or holds a "
         "fixed split (ab)"),
        ("{weight: 50, ab: {duration: 1h, steps: [50]}}",
         "routes[0].rollout.ab.steps: unknown key 'steps' (expected one of: duration, interval, "
         "confidence, failure_limit, guard)"),
        ("{weight: 50, ab: {duration: 1h, guard: {error_rate: {}}}}",
         "routes[0].rollout.ab.guard.error_rate: needs max, max_increase or both"),
        ("{weight: 50, ab: {duration: soon}}", "routes[0].rollout.ab.duration: must be a duration"),
    ],
)  # fmt: skip
def test_a_bad_ab_section_says_what_is_wrong(text: str, problem: str) -> None:
    found = problems(text)
    assert any(p.startswith(problem) for p in found), found


def test_the_schema_knows_the_ab_section() -> None:
    schema = config_schema()
    ab = schema["$defs"]["AbTest"]
    assert ab["required"] == ["duration"]
    assert set(ab["properties"]) == {"duration", "interval", "confidence", "failure_limit", "guard"}
    route = {"name": "chat", "stable": "v1", "canary": "v2"}
    backends = {"v1": {"url": "http://a:1"}, "v2": {"url": "http://b:1"}}
    good = {"weight": 50, "ab": {"duration": "2h", "guard": {"error_rate": {"max": 0.2}}}}
    jsonschema.validate({"backends": backends, "routes": [{**route, "rollout": good}]}, schema)
    bad = {"weight": 50, "ab": {"interval": "2s"}}
    with pytest.raises(jsonschema.ValidationError, match="'duration' is a required property"):
        jsonschema.validate({"backends": backends, "routes": [{**route, "rollout": bad}]}, schema)
