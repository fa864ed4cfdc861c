"""The config parser under fuzzing, and secrets pasted where a variable's name belongs.

Whatever the file holds, `parse_config` returns a `Config` or raises one `ConfigError`
whose problems each name their path; it never raises anything else. A literal key in
an `*_env` field is refused and never echoed (issue: hardening).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import Config, ConfigError, parse_config
from proxy.config.model import ListenAddress

BASE: dict[str, Any] = {
    "listen": "127.0.0.1:8080",
    "admin": {"listen": "127.0.0.1:9090", "token_env": "ADMIN_TOKEN"},
    "limits": {"max_body_bytes": 1000, "max_concurrency": 10, "header_timeout": "2s"},
    "trusted_proxies": ["10.0.0.0/8"],
    "shutdown_grace": "5s",
    "backends": {
        "v1": {
            "url": "http://10.0.0.1:8000",
            "api_key_env": "V1_KEY",
            "timeouts": {"connect": "1s", "first_byte": "10s", "idle": "5s"},
            "max_connections": 4,
        },
        "v2": {"url": "http://10.0.0.2:8000/base"},
    },
    "routes": [
        {
            "name": "chat",
            "match": {"path_prefix": "/v1/", "models": ["m1"]},
            "stable": "v1",
            "canary": "v2",
            "model_rewrite": {"canary": "m2"},
            "sticky": {"keys": ["header:x-user-id", "body:user", "ip"], "salt": "s"},
            "override_header": "x-canary",
            "cohort": {"include": {"header:x-tier": ["beta"]}},
            "schedule": {"timezone": "UTC", "windows": ["Mon-Fri 09:00-18:00"]},
            "fallback_to_stable": True,
            "rollout": {
                "weight": 5,
                "auto": {
                    "steps": [5, 50, 100],
                    "interval": "30s",
                    "min_requests": 10,
                    "checks": {"error_rate": {"max": 0.05}, "latency_p95": {"max_ratio": 1.5}},
                },
            },
        }
    ],
    "telemetry": {"service_name": "p", "trace_sample_ratio": 0.5, "prometheus": True},
    "state": {"store": "sqlite", "path": "state.db"},
}
ENV = {"ADMIN_TOKEN": "admin-secret", "V1_KEY": "v1-secret"}


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in `value` (mapping keys and list indexes)."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths(child, (*prefix, index))
    return found


PATHS = paths(BASE)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["0", "-1s", "1e400", "0.0.0.0:0", "header:", ":", "Mon-Sun 25:00-26:00"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=8,
)


def replaced(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    tree = copy.deepcopy(BASE)
    node: Any = tree
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return tree


def parse_or_problems(text: str | bytes) -> Config | tuple[str, ...]:
    try:
        return parse_config(text, environ=ENV)
    except ConfigError as error:
        problems = error.problems
    assert problems, "a ConfigError names at least one problem"
    for problem in problems:
        assert ": " in problem, problem  # "path: message"
    return problems


def assert_sound(result: Config | tuple[str, ...]) -> None:
    """A config that parsed keeps the promises the rest of the proxy relies on."""
    if isinstance(result, tuple):
        return  # parse_or_problems checked the problems
    assert result.routes, "at least one route"
    for route in result.routes:
        assert route.stable in result.backends, route.name
        assert route.canary in result.backends, route.name
        assert 0 <= route.rollout.weight <= 100, route.name


def test_the_base_config_is_valid() -> None:
    assert isinstance(parse_or_problems(yaml.safe_dump(BASE)), Config)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=VALUES)
def test_any_value_anywhere_is_a_config_or_a_config_error(
    path: tuple[Any, ...], value: Any
) -> None:
    assert_sound(parse_or_problems(yaml.safe_dump(replaced(path, value), allow_unicode=True)))


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_any_text_is_a_config_or_a_config_error(text: str | bytes) -> None:
    assert_sound(parse_or_problems(text))


@settings(max_examples=100, deadline=None)
@given(
    doubled=st.sampled_from(["listen", "backends", "routes", "limits"]),
    extra=st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=10),
)
def test_duplicate_and_unknown_keys_are_refused(doubled: str, extra: str) -> None:
    text = yaml.safe_dump(BASE)
    duplicated = text + f"{doubled}: {{}}\n"
    assert not isinstance(parse_or_problems(duplicated), Config)
    unknown = text + f"zz{extra}: 1\n"
    assert not isinstance(parse_or_problems(unknown), Config)


SECRETS = st.one_of(
    st.from_regex(
        r"(sk-|sk-proj-|sk-ant-|hf_|gsk_|r8_|ghp_|xoxb-|eyJ|nvapi-|AIza)[A-Za-z0-9]{20,40}",
        fullmatch=True,
    ),
    st.from_regex(r"[A-Za-z0-9]{24,48}", fullmatch=True).filter(
        lambda s: any(c.isdigit() for c in s) and any(c.isalpha() for c in s)
    ),
    st.from_regex(r"[a-z]{4,8}_[A-Z]{4,8}[0-9]{4,8}[a-z]{8,16}", fullmatch=True),
)


@settings(max_examples=200, deadline=None)
@given(secret=SECRETS, where=st.sampled_from(["backend", "admin"]))
def test_a_pasted_secret_is_refused_and_never_echoed(secret: str, where: str) -> None:
    tree = copy.deepcopy(BASE)
    if where == "backend":
        tree["backends"]["v1"]["api_key_env"] = secret
    else:
        tree["admin"]["token_env"] = secret
    problems = parse_or_problems(yaml.safe_dump(tree))
    assert not isinstance(problems, Config)
    assert secret not in "\n".join(problems)


@pytest.mark.parametrize("name", ["V1_API_KEY", "OPENAI_API_KEY", "llama_key", "KEY2", "ASIA_KEY"])
def test_variable_names_are_not_taken_for_secrets(name: str) -> None:
    tree = copy.deepcopy(BASE)
    tree["backends"]["v1"]["api_key_env"] = name
    config = parse_or_problems(yaml.safe_dump(tree))
    assert config == (f"backends.v1.api_key_env: environment variable {name} is not set",)


def test_the_admin_port_is_on_loopback_unless_told_otherwise() -> None:
    tree = copy.deepcopy(BASE)
    del tree["admin"]
    config = parse_or_problems(yaml.safe_dump(tree))
    assert isinstance(config, Config)
    assert config.admin.listen == ListenAddress("127.0.0.1", 9090)
    assert config.admin.token is None


@pytest.mark.timeout(30)
def test_check_refuses_a_pasted_key_without_printing_it(tmp_path: Path) -> None:
    key = "hf_QmN3xLp0aRt7YvK2sWdE9uBcZ4gHjF6iO1"
    tree = copy.deepcopy(BASE)
    tree["backends"]["v1"]["api_key_env"] = key
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(tree))
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
        env={"ADMIN_TOKEN": "x", "PATH": ""},
    )
    assert result.returncode == 1
    assert "backends.v1.api_key_env: looks like a secret" in result.stderr + result.stdout
    assert key not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
