"""What a fleet shares of a config (`proxy.config.fleet`), without sockets.

Two replicas on one host differ in their ports; that must not make them disagree.
Two replicas with different rollouts must, and must say where.
"""

from __future__ import annotations

import pytest

from proxy.config import Config, parse_config
from proxy.config.fleet import disagreements, explain, shared_settings

pytestmark = pytest.mark.timeout(10)

ENV = {"V1_KEY": "sk-one-value"}

BASE = """\
listen: 127.0.0.1:8080
admin: {listen: 127.0.0.1:9090}
limits: {max_concurrency: 100}
telemetry: {service_name: unit-a}
backends:
  v1: {url: 'http://10.0.0.1:8000', api_key_env: V1_KEY, timeouts: {connect: 2s}}
  v2: {url: 'http://10.0.0.2:8000'}
routes:
  - name: chat
    stable: v1
    canary: v2
    sticky: {keys: [header:x-user-id], salt: s1}
    rollout:
      weight: 1
      auto:
        steps: [1, 5, 100]
        interval: 30s
        checks: {error_rate: {max: 0.05}}
  - name: embed
    stable: v1
    canary: v1
    sticky: {keys: [auth], salt: s2}
state: {store: redis, url: 'redis://10.0.0.9:6379/0'}
"""


def config(text: str, environ: dict[str, str] = ENV) -> Config:
    return parse_config(text, environ=environ)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("listen: 127.0.0.1:8080", "listen: 0.0.0.0:8081"),
        ("admin: {listen: 127.0.0.1:9090}", "admin: {listen: 127.0.0.1:9091}"),
        ("limits: {max_concurrency: 100}", "limits: {max_concurrency: 200}"),
        ("service_name: unit-a", "service_name: unit-b"),
        ("listen: 127.0.0.1:8080", "# unit b\nlisten: 127.0.0.1:8080"),
        ("interval: 30s", "interval: 30000ms"),
        ("steps: [1, 5, 100]", "steps:\n          - 1\n          - 5\n          - 100"),
        (
            "    sticky: {keys: [auth], salt: s2}",
            "    sticky: {keys: [auth], salt: s2}\n"
            "    notify: [{url: 'http://hooks.local/a', format: slack}]",
        ),
    ],
    ids=[
        "listen",
        "admin",
        "limits",
        "telemetry",
        "comment",
        "same duration",
        "same list",
        "webhooks",
    ],
)
def test_per_process_settings_and_spelling_leave_the_fleet_version_alone(
    old: str, new: str
) -> None:
    first, second = config(BASE), config(BASE.replace(old, new))
    assert first.fleet_version == second.fleet_version
    assert first.version != second.version  # the files do differ


def test_a_secret_value_is_not_shared_or_compared() -> None:
    first, second = config(BASE), config(BASE, {"V1_KEY": "sk-another-value"})
    assert first.fleet_version == second.fleet_version
    assert "sk-one-value" not in repr(shared_settings(first))


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ("steps: [1, 5, 100]", "steps: [1, 10, 100]", "routes.chat.rollout.auto.steps"),
        ("interval: 30s", "interval: 10s", "routes.chat.rollout.auto.interval"),
        ("{max: 0.05}", "{max: 0.06}", "routes.chat.rollout.auto.checks.error_rate.max"),
        ("salt: s1", "salt: s9", "routes.chat.sticky.salt"),
        ("weight: 1", "weight: 2", "routes.chat.rollout.weight"),
        ("'http://10.0.0.2:8000'", "'http://10.0.0.3:8000'", "backends.v2.url"),
        ("{connect: 2s}", "{connect: 3s}", "backends.v1.timeouts.connect"),
        ("api_key_env: V1_KEY", "api_key_env: OTHER_KEY", "backends.v1.api_key_env"),
        ("6379/0", "6379/1", "state.url"),
        ("6379/0'}", "6379/0', cluster: true}", "state.cluster"),
    ],
)
def test_a_shared_setting_that_differs_is_named_by_its_path(old: str, new: str, path: str) -> None:
    environ = {**ENV, "OTHER_KEY": "sk-x"}
    first, second = config(BASE, environ), config(BASE.replace(old, new), environ)
    assert first.fleet_version != second.fleet_version
    found = disagreements([("a:1", shared_settings(first)), ("b:2", shared_settings(second))])
    assert [d.path for d in found] == [path]


def test_route_order_is_shared_because_the_first_match_wins() -> None:
    routes = BASE[BASE.index("  - name: chat") : BASE.index("state:")]
    chat, embed = routes.split("  - name: embed")
    swapped = BASE.replace(routes, "  - name: embed" + embed + chat)
    found = disagreements(
        [("a", shared_settings(config(BASE))), ("b", shared_settings(config(swapped)))]
    )
    assert [d.path for d in found] == ["routes"]


def test_explain_names_each_value_and_who_has_it_most_common_first() -> None:
    three = [
        ("a:1", shared_settings(config(BASE))),
        ("b:2", shared_settings(config(BASE.replace("[1, 5, 100]", "[1, 10, 100]")))),
        ("c:3", shared_settings(config(BASE))),
    ]
    assert explain(disagreements(three)) == (
        "routes.chat.rollout.auto.steps ([1.0, 5.0, 100.0] on a:1, c:3; [1.0, 10.0, 100.0] on b:2)"
    )


def test_a_route_only_one_process_has_is_absent_on_the_other() -> None:
    without_embed = BASE[: BASE.index("  - name: embed")] + BASE[BASE.index("state:") :]
    found = disagreements(
        [("a", shared_settings(config(BASE))), ("b", shared_settings(config(without_embed)))]
    )
    assert found[0].path == "routes"
    absent = [d for d in found if d.path == "routes.embed.stable"]
    assert absent[0].values == (('"v1"', ("a",)), ("absent", ("b",)))
    assert explain(found).endswith(f"and {len(found) - 3} more settings")


def test_no_disagreement_among_equals() -> None:
    settings = shared_settings(config(BASE))
    assert disagreements([("a", settings), ("b", dict(settings))]) == []
