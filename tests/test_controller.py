"""The rollout controller driven tick by tick on a fake clock and an in-memory store.

Whole rollouts (promotion, rollback, pause, a config edit, a lost lease, a restart, a
store outage, a fleet that disagrees) run here in milliseconds, with no socket and no
sleep: the controller's decisions are `proxy.rollout.planner`'s, and its clock and
store are injected. The same code runs in the proxy (tests/test_controller_e2e.py
drives it through the HTTP and admin ports).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from proxy.config import Config, parse_config
from proxy.config.model import Variant
from proxy.judge.analysis import Evidence, Verdict
from proxy.judge.stats import WindowStats
from proxy.rollout.machine import Action, Decision, OperatorAction, RouteState, Status
from proxy.rollout.planner import (
    SETTLE_SLICES,
    due,
    plan,
    reconcile_all,
    slices_to_gather,
    timers_for,
)
from proxy.rollout.planner import Fleet as FleetView
from proxy.server.controller import LEASE_S, Controller
from proxy.store.memory import MemoryStore
from tests.harness import auto_rollout, proxy_yaml, sticky

pytestmark = pytest.mark.timeout(20)

START = 1_800_000_000.0


def config(
    *,
    weight: float = 0,
    steps: str = "[10, 50, 100]",
    canary_url: str = "http://10.0.0.2:8000",
    min_requests: int = 50,
) -> Config:
    rollout = auto_rollout(
        weight,
        steps=steps,
        interval="5s",
        min_requests=min_requests,
        pass_intervals=2,
        failure_limit=2,
        checks="error_rate: {max: 0.05, max_increase: 0.02}, latency_p95: {max_ratio: 1.5}",
    )
    return parse_config(proxy_yaml("http://10.0.0.1:8000", canary_url, route=sticky("s") + rollout))


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Host:
    """The proxy as the controller sees it: a config, window stats, served weights."""

    config: Config
    stats: WindowStats = field(default_factory=WindowStats)
    weights: list[dict[str, float]] = field(default_factory=list)
    shadowing: list[frozenset[str]] = field(default_factory=list)
    judgements: list[tuple[str, Verdict | None]] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def set_weights(
        self, weights: Mapping[str, float], shadowing: frozenset[str] = frozenset()
    ) -> None:
        if not self.weights or self.weights[-1] != weights:
            self.weights.append(dict(weights))
        if not self.shadowing or self.shadowing[-1] != shadowing:
            self.shadowing.append(shadowing)

    def record_judgement(self, route: str, verdict: Verdict | None) -> None:
        self.judgements.append((route, verdict))

    def record_decision(self, route: str, decision: Decision) -> None:
        self.decisions.append(decision)

    def describe(self) -> Mapping[str, object]:
        return {}

    @property
    def served(self) -> float:
        return self.weights[-1]["chat"]


@dataclass
class Traffic:
    """Requests per second, split by the weight served; each variant's error rate and latency."""

    rps: int = 100
    canary_error_rate: float = 0.01
    stable_error_rate: float = 0.01
    canary_latency_s: float = 0.2
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def second(self, host: Host, now: float) -> None:
        weight = host.served if host.weights else 0.0
        for _ in range(self.rps):
            canary = self.rng.random() * 100 < weight
            variant = Variant.CANARY if canary else Variant.STABLE
            rate = self.canary_error_rate if canary else self.stable_error_rate
            error = "upstream_status" if self.rng.random() < rate else None
            latency = self.canary_latency_s if canary else 0.2
            user = self.rng.randrange(10_000)  # each request from another user
            host.stats.record("chat", variant, now, latency, None, error, 10, user=user)


class Fleet:
    """Controllers sharing one in-memory store, as the processes of a fleet."""

    def __init__(self, *configs: Config) -> None:
        self.clock = Clock()
        self.store = MemoryStore(self.clock)
        self.hosts = [Host(c) for c in configs]
        self.controllers = [
            Controller(h, clock=self.clock, store=self.store, source=f"proc-{n}")
            for n, h in enumerate(self.hosts)
        ]
        self.running = list(range(len(self.hosts)))

    async def start(self) -> None:
        for n in self.running:
            await self.controllers[n].start(run=False)

    async def run(self, seconds: int, traffic: Traffic, *, until: Status | None = None) -> None:
        """Each second: traffic to every live process, then every live process ticks."""
        for _ in range(seconds):
            for n in self.running:
                traffic.second(self.hosts[n], self.clock.now)
            self.clock.now += 1.0
            for n in self.running:
                await self.controllers[n].tick()
            if until is not None and self.state.status is until:
                return

    @property
    def state(self) -> RouteState:
        return self.controllers[self.running[0]].states["chat"]

    def actions(self, n: int = 0) -> list[str]:
        return [d.action for d in self.hosts[n].decisions]


async def test_a_healthy_canary_is_promoted_step_by_step() -> None:
    fleet = Fleet(config())
    await fleet.start()
    await fleet.run(600, Traffic(), until=Status.PROMOTED)
    host = fleet.hosts[0]
    assert fleet.state.status is Status.PROMOTED
    assert fleet.actions() == ["restart", "advance", "promote"]
    assert [w["chat"] for w in host.weights] == [10.0, 50.0, 100.0]
    assert {verdict for _, verdict in host.judgements} <= {None, Verdict.PASS, Verdict.INCONCLUSIVE}
    assert fleet.clock.now - START < 600


async def test_a_failing_canary_is_rolled_back_and_served_at_zero() -> None:
    fleet = Fleet(config())
    await fleet.start()
    await fleet.run(300, Traffic(canary_error_rate=0.5), until=Status.ROLLED_BACK)
    assert fleet.state.status is Status.ROLLED_BACK
    assert fleet.actions() == ["restart", "rollback"]
    assert fleet.hosts[0].served == 0.0
    assert "error rate" in fleet.hosts[0].decisions[-1].reason
    # It stays rolled back however long the traffic goes on.
    await fleet.run(60, Traffic(canary_error_rate=0.0))
    assert fleet.state.status is Status.ROLLED_BACK


async def test_a_canary_failing_everything_is_rolled_back_long_before_min_requests() -> None:
    # min_requests gates passing only: 10 canary requests a second that all fail are
    # enough to roll back within a few intervals, thousands of requests short of it.
    fleet = Fleet(config(min_requests=5000))
    await fleet.start()
    await fleet.run(60, Traffic(canary_error_rate=1.0), until=Status.ROLLED_BACK)
    assert fleet.state.status is Status.ROLLED_BACK
    assert fleet.clock.now - START <= 30
    reason = fleet.hosts[0].decisions[-1].reason
    assert "error rate 100.00%" in reason
    assert "beyond the limit 5.00%" in reason


async def test_a_shared_incident_holds_the_rollout_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fleet = Fleet(config())
    await fleet.start()
    await fleet.run(3, Traffic())
    with caplog.at_level("INFO", logger="proxy.server.controller"):
        # The model servers' common dependency fails: both answer 40% errors.
        await fleet.run(40, Traffic(canary_error_rate=0.4, stable_error_rate=0.4))
    state = fleet.state
    assert (state.status, state.weight) == (Status.PROGRESSING, 10)
    assert state.verdict is not None
    assert state.verdict["verdict"] == "inconclusive"
    assert str(state.verdict["reason"]).startswith("shared incident: stable's error rate")
    assert state.verdict["shared_incident"]
    held = [r for r in caplog.records if "shared incident" in r.getMessage()]
    assert held
    assert all(r.levelname == "WARNING" for r in held)
    assert fleet.actions() == ["restart"]
    # Once it is over, the rollout goes on.
    await fleet.run(600, Traffic(), until=Status.PROMOTED)
    assert status(fleet) is Status.PROMOTED


async def test_a_paused_rollout_is_not_judged_until_it_is_resumed() -> None:
    fleet = Fleet(config())
    await fleet.start()
    controller = fleet.controllers[0]
    await controller.operate("chat", OperatorAction.PAUSE)
    judged = len(fleet.hosts[0].judgements)
    await fleet.run(120, Traffic())
    assert fleet.state.status is Status.PAUSED
    assert fleet.state.weight == 10
    assert len(fleet.hosts[0].judgements) == judged
    await controller.operate("chat", OperatorAction.RESUME)
    await fleet.run(600, Traffic(), until=Status.PROMOTED)
    assert fleet.actions() == ["restart", "pause", "resume", "advance", "promote"]


PAUSED_STEPS = "[10, {weight: 50, pause: 2m}, 100]"


async def test_a_timed_pause_holds_a_healthy_canary_at_its_step_for_the_pause() -> None:
    fleet = Fleet(config(steps=PAUSED_STEPS))
    await fleet.start()
    await fleet.run(600, Traffic(), until=Status.PROGRESSING)
    for _ in range(600):
        await fleet.run(1, Traffic())
        if fleet.state.weight == 50:
            break
    reached = fleet.clock.now
    await fleet.run(100, Traffic())
    # Judged all along, and passing: only the pause holds the step.
    assert (fleet.state.weight, fleet.state.status) == (50, Status.PROGRESSING)
    assert fleet.state.passes >= 2
    await fleet.run(600, Traffic(), until=Status.PROMOTED)
    assert fleet.state.status is Status.PROMOTED
    assert fleet.actions() == ["restart", "advance", "promote"]
    # Promoted at the first judgement after the pause: within one interval of its end.
    assert 120 <= fleet.clock.now - reached <= 120 + 5 + 1


async def test_a_failing_canary_is_rolled_back_during_a_timed_pause() -> None:
    fleet = Fleet(config(weight=50, steps=PAUSED_STEPS))
    await fleet.start()
    assert fleet.state.weight == 50
    await fleet.run(120, Traffic(canary_error_rate=0.5), until=Status.ROLLED_BACK)
    assert fleet.state.status is Status.ROLLED_BACK
    assert fleet.clock.now - START < 120, "a rollback never waits for a pause"


async def test_an_operator_advances_one_step_past_a_pause() -> None:
    fleet = Fleet(config(weight=50, steps=PAUSED_STEPS))
    await fleet.start()
    await fleet.controllers[0].operate("chat", OperatorAction.ADVANCE)
    assert (fleet.state.status, fleet.state.weight) == (Status.PROMOTED, 100)
    assert fleet.hosts[0].served == 100
    assert fleet.hosts[0].decisions[-1].reason == (
        "promoted to 100%: advanced one step by an operator"
    )


async def test_a_config_edit_adopts_the_weight_and_a_new_canary_starts_again() -> None:
    fleet = Fleet(config())
    await fleet.start()
    host, controller = fleet.hosts[0], fleet.controllers[0]
    host.config = config(weight=50)
    host.set_weights(*await controller.config_changed(host.config))
    assert fleet.state.weight == 50
    assert host.served == 50
    assert fleet.actions()[-1] == "adopt"
    host.config = config(weight=50, canary_url="http://10.0.0.3:8000")
    host.set_weights(*await controller.config_changed(host.config))
    assert fleet.state.weight == 10, "a new canary starts at the first step"
    assert fleet.actions()[-1] == "restart"


async def test_a_lost_lease_passes_to_another_process_and_nothing_is_decided_twice() -> None:
    fleet = Fleet(config(), config())
    await fleet.start()
    await fleet.run(3, Traffic())
    leaders = [c.leader for c in fleet.controllers]
    assert leaders.count(True) == 1
    gone = leaders.index(True)
    fleet.running.remove(gone)  # the leader stops ticking, as a process that hangs
    await fleet.run(int(LEASE_S) + 2, Traffic())
    survivor = fleet.controllers[fleet.running[0]]
    assert survivor.leader
    await fleet.run(600, Traffic(), until=Status.PROMOTED)
    everything = fleet.hosts[0].decisions + fleet.hosts[1].decisions
    assert [d.action for d in everything].count(Action.PROMOTE) == 1


async def test_a_restarted_process_takes_the_stored_state_up_where_it_was() -> None:
    fleet = Fleet(config())
    await fleet.start()
    await fleet.run(600, Traffic(), until=Status.PROGRESSING)  # started
    for _ in range(600):
        await fleet.run(1, Traffic())
        if fleet.state.weight == 50:
            break
    assert fleet.state.weight == 50
    await fleet.controllers[0].stop()
    again = Host(config())
    restarted = Controller(again, clock=fleet.clock, store=fleet.store, source="proc-0b")
    await restarted.start(run=False)
    assert restarted.states["chat"].weight == 50
    assert again.served == 50
    assert again.decisions == [], "a restart decides nothing"


async def test_a_store_outage_pauses_decisions_and_keeps_the_weights() -> None:
    fleet = Fleet(config())
    await fleet.start()
    fleet.store.down = True
    await fleet.run(120, Traffic(canary_error_rate=0.5))
    controller = fleet.controllers[0]
    assert controller.store_up is False
    assert not controller.leader
    assert fleet.state.status is Status.PROGRESSING, "no decision without the store"
    assert fleet.hosts[0].served == 10
    fleet.store.down = False
    await fleet.run(300, Traffic(canary_error_rate=0.5), until=Status.ROLLED_BACK)
    assert store_up(controller) is True
    assert status(fleet) is Status.ROLLED_BACK


async def test_a_store_that_lost_its_data_gets_the_states_back_from_memory() -> None:
    fleet = Fleet(config())
    await fleet.start()
    fleet.store.forget()
    await fleet.run(2, Traffic())
    stored = await fleet.store.load_states()
    assert stored["chat"].weight == 10
    assert stored["chat"].status is Status.PROGRESSING


async def test_processes_that_disagree_on_the_steps_hold_then_go_on_once_they_agree() -> None:
    fleet = Fleet(config(), config(steps="[10, 60, 100]"))
    await fleet.start()
    await fleet.run(120, Traffic())
    leader = next(c for c in fleet.controllers if c.leader)
    assert leader.held_because is not None
    assert "routes.chat.rollout.auto.steps" in leader.held_because
    assert fleet.state.weight == 10, "held at the first step"
    assert fleet.state.passes >= 2, "the passes count; only the step waits"
    fleet.hosts[1].config = config()
    await fleet.controllers[1].config_changed(fleet.hosts[1].config)
    await fleet.run(600, Traffic(), until=Status.PROMOTED)
    assert held_because(leader) is None
    assert status(fleet) is Status.PROMOTED


# Read afresh: a tick changes what an earlier assert narrowed.
def store_up(controller: Controller) -> bool | None:
    return controller.store_up


def held_because(controller: Controller) -> str | None:
    return controller.held_because


def status(fleet: Fleet) -> Status:
    return fleet.state.status


# --- the planner's own rules, without a controller --------------------------------------


def test_a_route_is_first_judged_one_interval_after_it_is_planned() -> None:
    cfg = config()
    timers = timers_for(cfg, {}, START)
    assert timers == {"chat": START + 5}
    states = {"chat": reconciled(cfg)}
    assert due(cfg, states, timers, START + 4.9) == []
    assert [r.name for r in due(cfg, states, timers, START + 5)] == ["chat"]
    assert timers_for(cfg, timers, START + 100) == timers, "a running timer is kept"


def test_evidence_grows_by_settled_slices_only() -> None:
    now = START + 0.5
    span = slices_to_gather(Evidence.fresh(int(START) - 10), now)
    assert span is not None
    assert (span.first, span.last) == (int(START) - 10, int(START) - SETTLE_SLICES)
    assert slices_to_gather(Evidence.fresh(span.next), now) is None


def test_a_process_that_does_not_lead_plans_no_judgement() -> None:
    cfg = config()
    states = {"chat": reconciled(cfg)}
    follower = plan(START + 60, states, {}, cfg, FleetView(leader=False), {"chat": START})
    leader = plan(START + 60, states, {}, cfg, FleetView(leader=True), {"chat": START})
    assert follower.judged == ()
    assert [j.route.name for j in leader.judged] == ["chat"]
    assert leader.timers["chat"] == START + 65


def reconciled(cfg: Config) -> RouteState:
    (only,) = reconcile_all(cfg, {}, START)
    return only.transition.state
