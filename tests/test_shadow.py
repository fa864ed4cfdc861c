"""The shadow phase without sockets: the config, which requests are shadowed, and whole
shadow rollouts on a fake clock and an in-memory store (as tests/test_controller.py).

tests/test_shadow_e2e.py drives the same code through the HTTP and admin ports.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.apis.streams import Api
from proxy.apis.text import answer_text
from proxy.config import Config, ConfigError, parse_config
from proxy.config.model import AgreementCheck, LengthCheck, PairChecks, Shadow, Variant
from proxy.http.shadow import _retry_after
from proxy.judge.analysis import Evidence, Verdict, judge
from proxy.judge.pairs import PREFIX_CHARS, agree, lengths_match
from proxy.judge.stats import ShadowSide, VariantStats, WindowStats
from proxy.rollout.machine import (
    Decision,
    OperatorAction,
    RouteState,
    Status,
    TransitionRefused,
    on_operator,
    reconcile,
)
from proxy.rollout.planner import pause_left_s, reconcile_all, variants_of
from proxy.routing.assignment import Assignment, AssignReason, RouteTable
from proxy.routing.shadow import chosen, eligible, offered_tools
from proxy.server.controller import Controller
from proxy.store.memory import MemoryStore
from tests.harness import auto_rollout, proxy_yaml, sticky

pytestmark = pytest.mark.timeout(20)

START = 1_800_000_000.0
SHADOW = "shadow: {share: 0.5, duration: 60s}"


def config(shadow: str = SHADOW, *, on_failure: str = "rollback", weight: float = 0) -> Config:
    rollout = auto_rollout(
        weight,
        steps="[10, 50, 100]",
        interval="5s",
        min_requests=50,
        pass_intervals=2,
        failure_limit=2,
        checks="error_rate: {max: 0.05, max_increase: 0.02}, latency_p95: {max_ratio: 1.5}",
    )
    rollout += f"    on_failure: {on_failure}\n"
    if shadow:
        rollout += f"    {shadow}\n"
    return parse_config(
        proxy_yaml("http://10.0.0.1:8000", "http://10.0.0.2:8000", route=sticky("s") + rollout)
    )


# --- the config ---------------------------------------------------------------------------


def test_shadow_settings_are_read_with_their_defaults() -> None:
    auto = config("shadow: {}").routes[0].rollout.auto
    assert auto is not None
    assert auto.shadow == Shadow()
    assert auto.shadow.share == 0.05
    assert auto.shadow.duration_s == 1800
    written = config(
        "shadow: {share: 0.2, duration: 5m, max_concurrency: 2, queue: 0, never_tools: [a, b]}"
    )
    auto = written.routes[0].rollout.auto
    assert auto is not None
    assert auto.shadow == Shadow(0.2, 300.0, 2, 0, ("a", "b"))
    assert config("").routes[0].rollout.auto is not None
    assert config("").routes[0].rollout.auto.shadow is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("shadow", "expected"),
    [
        ("{share: 0}", "shadow.share: must be greater than 0, got 0"),
        ("{share: 1.5}", "shadow.share: must be at most 1, got 1.5"),
        ("{duration: 0s}", "shadow.duration: must be longer than zero, got '0s'"),
        ("{max_concurrency: 0}", "shadow.max_concurrency: must be at least 1, got 0"),
        ("{queue: -1}", "shadow.queue: must be at least 0, got -1"),
        ("{never_tools: send_email}", "shadow.never_tools: must be a list, got 'send_email'"),
        ("{sample: 1}", "shadow.sample: unknown key 'sample' (expected one of: share,"),
        ("5%", "shadow: must be a mapping"),
    ],
)
def test_a_bad_shadow_setting_is_named_with_its_path(shadow: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(f"shadow: {shadow}")
    problems = caught.value.problems
    assert any(f"routes[0].rollout.auto.{expected}" in problem for problem in problems), problems


# --- which requests -----------------------------------------------------------------------


def test_users_below_the_share_are_shadowed_and_overrides_and_cohorts_never() -> None:
    never = lambda: 0.99  # noqa: E731
    always = lambda: 0.0  # noqa: E731
    assert chosen(Assignment(Variant.STABLE, AssignReason.HASH, 499), 500, never)
    assert not chosen(Assignment(Variant.STABLE, AssignReason.HASH, 500), 500, always)
    assert chosen(Assignment(Variant.STABLE, AssignReason.ANONYMOUS), 500, always)
    assert not chosen(Assignment(Variant.STABLE, AssignReason.ANONYMOUS), 500, never)
    assert not chosen(Assignment(Variant.STABLE, AssignReason.OVERRIDE), 10_000, always)
    assert not chosen(Assignment(Variant.STABLE, AssignReason.COHORT), 10_000, always)


CHAT: dict[str, Any] = {"model": "m", "messages": []}


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "expected"),
    [
        ("POST", "/v1/chat/completions", {}, CHAT, True),
        ("POST", "/v1/chat/completions/", {}, CHAT, True),
        ("POST", "/v1/messages", {}, CHAT, True),
        ("POST", "/v1/responses", {}, CHAT, True),
        ("POST", "/v1/embeddings", {}, CHAT, True),
        ("POST", "/api/generate", {}, CHAT, True),
        ("POST", "/generate_stream", {}, CHAT, True),
        ("GET", "/v1/chat/completions", {}, CHAT, False),
        ("POST", "/v1/files", {}, CHAT, False),
        ("POST", "/v1/audio/speech", {}, CHAT, False),
        ("POST", "/v1/chat/completions", {"x-canary-no-shadow": ""}, CHAT, False),
        ("POST", "/v1/chat/completions", {}, {"tools": [{"function": {"name": "mail"}}]}, False),
        ("POST", "/v1/messages", {}, {"tools": [{"name": "mail"}]}, False),
        ("POST", "/v1/responses", {}, {"tools": [{"type": "function", "name": "mail"}]}, False),
        ("POST", "/v1/chat/completions", {}, {"functions": [{"name": "mail"}]}, False),
        ("POST", "/v1/chat/completions", {}, {"tools": [{"function": {"name": "look"}}]}, True),
    ],
)
def test_only_idempotent_llm_calls_without_marked_tools_are_eligible(
    method: str, path: str, headers: Mapping[str, str], body: dict[str, Any], expected: bool
) -> None:
    assert eligible(method, path, headers, body, ("mail",)) is expected


def test_tools_are_read_from_every_shape_and_junk_is_skipped() -> None:
    body = {
        "tools": [{"function": {"name": "a"}}, {"name": "b"}, "junk", {"function": "x"}, {}],
        "functions": [{"name": "c"}],
    }
    assert offered_tools(body) == ["a", "b", "c"]
    assert offered_tools({"tools": "none"}) == []
    # Without never_tools the tools are not even looked at.
    assert eligible("POST", "/v1/chat/completions", {}, {"tools": [{"name": "a"}]}, ())


def test_a_route_table_shadows_only_routes_with_a_shadow_phase() -> None:
    with_shadow = config()
    table = RouteTable.build(with_shadow, {}, {"chat"})
    assert table.by_name["chat"].shadow == 5000
    assert table.shadowing == {"chat"}
    assert table.with_weights({"chat": 0}).shadowing == {"chat"}  # kept unless given
    assert table.with_weights({}, frozenset()).shadowing == frozenset()
    assert RouteTable.build(config(""), {}, {"chat"}).by_name["chat"].shadow == 0
    tiny = config("shadow: {share: 0.00001}")
    assert RouteTable.build(tiny, {}, {"chat"}).by_name["chat"].shadow == 1


# --- the state machine --------------------------------------------------------------------


def state_of(cfg: Config, now: float = START) -> RouteState:
    (reconciled,) = reconcile_all(cfg, {}, now)
    return reconciled.transition.state


def test_a_new_canary_starts_in_shadow_at_weight_zero() -> None:
    state = state_of(config())
    assert (state.status, state.weight, state.step) == (Status.SHADOW, 0.0, -1)
    (decision,) = state.decisions
    assert decision.reason == "weight 0%: a new canary starts in shadow"
    assert variants_of(state) == (ShadowSide.CANARY, ShadowSide.STABLE)
    auto = config().routes[0].rollout.auto
    assert auto is not None
    assert pause_left_s(state, auto, START + 20) == 40
    assert pause_left_s(state, auto, START + 90) == 0
    # Without shadow, as before: the first step.
    plain = state_of(config(""))
    assert (plain.status, plain.weight) == (Status.PROGRESSING, 10.0)
    assert variants_of(plain) == (Variant.CANARY, Variant.STABLE)


def test_operators_act_in_shadow_as_at_a_step() -> None:
    cfg = config()
    auto = cfg.routes[0].rollout.auto
    state = state_of(cfg)
    paused = on_operator(state, auto, OperatorAction.PAUSE, START + 1).state
    assert (paused.status, paused.weight) == (Status.PAUSED, 0.0)
    resumed = on_operator(paused, auto, OperatorAction.RESUME, START + 2)
    assert resumed.state.status is Status.SHADOW
    assert resumed.state.step_started_at == START + 2  # the shadow's time starts again
    assert resumed.decision is not None
    assert resumed.decision.reason == "resumed by an operator in shadow"
    advanced = on_operator(resumed.state, auto, OperatorAction.ADVANCE, START + 3)
    assert (advanced.state.status, advanced.state.weight) == (Status.PROGRESSING, 10.0)
    assert advanced.decision is not None
    assert advanced.decision.reason == "weight 0% → 10%: advanced out of shadow by an operator"
    from_pause = on_operator(paused, auto, OperatorAction.ADVANCE, START + 3).state
    assert (from_pause.status, from_pause.weight) == (Status.PROGRESSING, 10.0)
    rolled = on_operator(state, auto, OperatorAction.ROLLBACK, START + 4).state
    assert rolled.status is Status.ROLLED_BACK
    again = on_operator(rolled, auto, OperatorAction.RESUME, START + 5).state
    assert (again.status, again.weight) == (Status.SHADOW, 0.0)
    promoted = on_operator(state, auto, OperatorAction.PROMOTE, START + 6).state
    assert (promoted.status, promoted.weight) == (Status.PROMOTED, 100.0)
    with pytest.raises(TransitionRefused):
        on_operator(state, auto, OperatorAction.RESUME, START + 7)


def test_a_config_edit_takes_shadow_in_and_out() -> None:
    state = state_of(config())
    route = config("").routes[0]
    left = reconcile(state, route, state.canary, START + 10)
    assert (left.state.status, left.state.weight) == (Status.PROGRESSING, 10.0)
    assert left.decision is not None
    assert left.decision.reason == "weight 0% → 10%: shadow is no longer configured"
    # A canary at 0 under fixed weights has served nobody: automated, it starts in shadow.
    manual = replace_status(state, Status.MANUAL)
    entered = reconcile(manual, config().routes[0], state.canary, START + 20).state
    assert entered.status is Status.SHADOW
    # A route already in shadow stays there, its time running on.
    kept = reconcile(state, config().routes[0], state.canary, START + 30)
    assert kept.decision is None
    assert kept.state.step_started_at == START


def replace_status(state: RouteState, status: Status) -> RouteState:
    return RouteState.from_mapping({**state.to_mapping(), "status": status.value})


# --- whole shadow rollouts on a fake clock ------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@dataclass
class Host:
    config: Config
    stats: WindowStats = field(default_factory=WindowStats)
    weights: list[float] = field(default_factory=list)
    shadowing: list[bool] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def set_weights(
        self, weights: Mapping[str, float], shadowing: frozenset[str] = frozenset()
    ) -> None:
        self.weights.append(weights["chat"])
        self.shadowing.append("chat" in shadowing)

    def record_judgement(self, route: str, verdict: Verdict | None) -> None:
        pass

    def record_decision(self, route: str, decision: Decision) -> None:
        self.decisions.append(decision)

    def describe(self) -> Mapping[str, object]:
        return {}


async def run(
    cfg: Config, seconds: int, canary_error_rate: float, until: Status | None = None
) -> tuple[Controller, Host, Clock]:
    """A controller with 100 requests a second; while it shadows, half of them pair."""
    clock = Clock()
    host = Host(cfg)
    controller = Controller(host, clock=clock, store=MemoryStore(clock), source="p")
    await controller.start(run=False)
    rng = random.Random(7)
    for _ in range(seconds):
        for _ in range(100):
            user = rng.randrange(10_000)
            served = Variant.CANARY if rng.random() * 100 < host.weights[-1] else Variant.STABLE
            host.stats.record("chat", served, clock.now, 0.2, None, None, 10, user=user)
            if host.shadowing[-1] and user < 5000:
                error = "500" if rng.random() < canary_error_rate else None
                stats = host.stats
                stats.record("chat", ShadowSide.STABLE, clock.now, 0.2, None, None, 10, user=user)
                stats.record("chat", ShadowSide.CANARY, clock.now, 0.2, None, error, 10, user=user)
        clock.now += 1.0
        await controller.tick()
        if until is not None and controller.states["chat"].status is until:
            break
    return controller, host, clock


async def test_a_healthy_canary_leaves_shadow_for_the_first_step_after_the_duration() -> None:
    controller, host, clock = await run(config(), 300, 0.0, until=Status.PROGRESSING)
    state = controller.states["chat"]
    assert (state.status, state.weight) == (Status.PROGRESSING, 10.0)
    assert [d.action for d in host.decisions] == ["restart", "advance"]
    advance = host.decisions[-1]
    assert advance.reason.startswith("weight 0% → 10%: passed in shadow: error rate 0.00%")
    assert advance.judgement is not None
    assert advance.at - START >= 60  # held in shadow for its duration
    assert clock.now - START < 90
    # Users got the canary only once it left shadow, and shadowing stopped there.
    assert host.weights[: host.shadowing.index(False)] == [0.0] * host.shadowing.index(False)
    assert host.shadowing[-1] is False
    assert state.evidence.rollout_canary.requests == 0  # served traffic is judged afresh


async def test_a_broken_canary_is_rolled_back_in_shadow_even_with_on_failure_hold() -> None:
    controller, host, clock = await run(
        config(on_failure="hold"), 120, 0.5, until=Status.ROLLED_BACK
    )
    state = controller.states["chat"]
    assert (state.status, state.weight) == (Status.ROLLED_BACK, 0.0)
    assert [d.action for d in host.decisions] == ["restart", "rollback"]
    reason = host.decisions[-1].reason
    assert reason.startswith("rolled back in shadow after 2 failing judgements, no user served")
    assert "error rate" in reason
    assert set(host.weights) == {0.0}
    assert host.shadowing[-1] is False
    assert clock.now - START < 60  # failing needs no duration


async def test_a_shadow_judgement_that_counted_says_so_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("INFO", logger="proxy.server.controller"):
        await run(config(), 12, 0.0)
    notes = [r.getMessage() for r in caplog.records if "in shadow: pass" in r.getMessage()]
    assert notes
    assert "held in shadow," in notes[0]
    assert "left" in notes[0]


def test_a_retry_after_in_seconds_sets_the_rest_within_bounds() -> None:
    assert _retry_after([(b"Retry-After", b"3")]) == 3.0
    assert _retry_after([(b"retry-after", b"600")]) == 30.0
    assert _retry_after([(b"retry-after", b"-2")]) == 0.0
    # An HTTP date, or nothing: the doubling rest instead.
    assert _retry_after([(b"retry-after", b"Wed, 21 Oct 2026 07:28:00 GMT")]) is None
    assert _retry_after([(b"content-type", b"application/json")]) is None


# --- comparing a pair ---------------------------------------------------------------------


def test_deterministic_answers_agree_only_when_equal_and_others_on_shared_words() -> None:
    assert agree("Paris is the capital", "Paris is the capital", True, 0.5)
    assert not agree("Paris is the capital", "paris is the capital", True, 0.5)
    assert agree("Paris is the capital", "paris is THE capital!", False, 0.5)  # 3 of 5 words
    assert not agree("Paris is the capital", "Lyon was a city", False, 0.5)
    assert agree("", "", False, 0.9)
    # Only a bounded prefix is compared: what differs past it does not count.
    same = "word " * (PREFIX_CHARS // 5)
    assert agree(same + "one ending", same + "another", True, 0.5)


def test_lengths_match_within_the_ratio_either_way_when_both_are_known() -> None:
    assert lengths_match(100, 190, 2.0)
    assert not lengths_match(100, 201, 2.0)
    assert not lengths_match(100, 49, 2.0)
    assert lengths_match(None, 10, 2.0) is None
    assert lengths_match(10, 0, 2.0) is None


@pytest.mark.parametrize(
    ("api", "body", "text"),
    [
        (Api.OPENAI, b'{"choices":[{"message":{"content":"hi there"}}]}', "hi there"),
        (Api.OPENAI, b'{"choices":[{"text":"hi"}]}', "hi"),
        (Api.OPENAI, b'{"object":"list","data":[{"embedding":[0.1]}]}', None),
        (
            Api.OPENAI,
            b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
            b'data: {"choices":[{"delta":{"content":"hi "}}]}\n\n'
            b'data: {"choices":[{"delta":{"content":"there"}}]}\n\n'
            b'data: {"choices":[],"usage":{"completion_tokens":2}}\n\ndata: [DONE]\n\n',
            "hi there",
        ),
        # Cut at the capture bound: the whole events still count.
        (Api.OPENAI, b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: {"choi', "hi"),
        (Api.OPENAI, b'{"choices":[{"message":{"content":"cut sh', None),
        (
            Api.RESPONSES,
            b'{"object":"response","output":[{"type":"message","content":'
            b'[{"type":"output_text","text":"hi"}]}]}',
            "hi",
        ),
        (
            Api.RESPONSES,
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            b'"delta":"hi"}\n\nevent: response.completed\ndata: {"type":"response.completed",'
            b'"response":{"output":[{"content":[{"type":"output_text","text":"hi"}]}]}}\n\n',
            "hi",
        ),
        (Api.ANTHROPIC, b'{"content":[{"type":"text","text":"hi"},{"type":"tool_use"}]}', "hi"),
        (
            Api.ANTHROPIC,
            b'event: content_block_delta\ndata: {"type":"content_block_delta",'
            b'"delta":{"type":"text_delta","text":"hi"}}\n\n',
            "hi",
        ),
        (Api.OLLAMA, b'{"message":{"content":"hi "},"done":false}\n{"done":true}\n', "hi "),
        (Api.OLLAMA, b'{"response":"hi","done":true}', "hi"),
        (Api.LLAMACPP, b'{"content":"hi","stop":true}', "hi"),
        (Api.TGI, b'[{"generated_text":"hi"}]', "hi"),
        (Api.TGI, b"[", None),
        (Api.TGI, b"[1]", None),
        (
            Api.TGI,
            b'data:{"token":{"text":"hi","special":false}}\n\n'
            b'data:{"token":{"text":"</s>","special":true},"generated_text":"hi"}\n\n',
            "hi",
        ),
        (Api.TGI, b'{"generated_text":"hi"}', "hi"),
        (Api.OPENAI, b"not an answer", None),
        (Api.OPENAI, b"", None),
    ],
)
def test_an_answers_text_is_read_in_its_apis_words(api: Api, body: bytes, text: str | None) -> None:
    assert answer_text(body, api) == text


def pair_auto(checks: str) -> Any:
    auto = config(f"shadow: {{share: 0.5, duration: 60s, checks: {checks}}}").routes[0].rollout.auto
    assert auto is not None
    return auto


def test_pair_checks_are_read_and_named_with_their_path() -> None:
    auto = pair_auto("{agreement: {min: 0.8}, output_length: {max_ratio: 2}}")
    assert auto.shadow.checks == PairChecks(AgreementCheck(0.8, 0.5), LengthCheck(2.0, 0.1))
    for checks, expected in [
        ("{agreement: {similarity: 0.5}}", "checks.agreement.min: is required"),
        ("{output_length: {max_ratio: 1}}", "checks.output_length.max_ratio: must be greater"),
        ("{output_length: {max_ratio: 2, max_share: 2}}", "output_length.max_share: must be at"),
        ("{agreement: {min: 0.8, similarity: -1}}", "checks.agreement.similarity: must be at"),
        ("{bleu: {min: 0.5}}", "shadow.checks.bleu: unknown key 'bleu'"),
    ]:
        with pytest.raises(ConfigError) as caught:
            pair_auto(checks)
        assert any(expected in p for p in caught.value.problems), caught.value.problems


def pairs_slice(pairs: int, disagreements: int, mismatches: int) -> tuple[Any, Any]:
    canary, stable = VariantStats(), VariantStats()
    for n in range(pairs):
        for side in (canary, stable):
            side.record(0.2, None, None, 10, user=n)
        canary.record_pair(n >= disagreements, n >= mismatches)
    return canary, stable


def test_the_judge_fails_a_canary_whose_answers_disagree_and_passes_one_that_agrees() -> None:
    auto = pair_auto("{agreement: {min: 0.8}, output_length: {max_ratio: 2, max_share: 0.1}}")
    bad = Evidence.fresh(0, shadow=True)
    good = Evidence.fresh(0, shadow=True)
    for index in range(4):
        bad = bad.added(*pairs_slice(100, 60, 0), index + 1, auto)
        good = good.added(*pairs_slice(100, 0, 1), index + 1, auto)
    failed = judge(bad, auto)
    assert failed.verdict is Verdict.FAIL
    (check,) = [c for c in failed.checks if c.verdict is Verdict.FAIL]
    assert check.check == "agreement"
    assert failed.reason.startswith("answer disagreement 60.00% (n=400) over the rollout: beyond")
    passed = judge(good, auto)
    assert passed.verdict is Verdict.PASS
    names = [c.check for c in passed.checks]
    assert names == ["error_rate", "latency_p95", "agreement", "output_length"]
    # Served traffic is never judged on pairs, nor is evidence stored before they were.
    served = Evidence.fresh(0).added(*pairs_slice(100, 60, 0), 1, auto)
    assert [c.check for c in judge(served, auto).checks] == ["error_rate", "latency_p95"]
    assert Evidence.from_mapping(bad.to_mapping()) == bad
    assert "shadow" not in served.to_mapping()


def test_a_pair_check_with_nothing_to_compare_passes_as_a_route_that_streams_nothing() -> None:
    auto = pair_auto("{agreement: {min: 0.8}}")
    evidence = Evidence.fresh(0, shadow=True)
    for index in range(4):
        canary, stable = pairs_slice(100, 0, 0)
        canary.pairs = canary.disagreements = 0  # nothing had text to compare
        evidence = evidence.added(canary, stable, index + 1, auto)
    judged = judge(evidence, auto)
    (agreement,) = [c for c in judged.checks if c.check == "agreement"]
    assert agreement.verdict is Verdict.PASS
    assert agreement.reason == "answer disagreement: no pairs it could compare"
