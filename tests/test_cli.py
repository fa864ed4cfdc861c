"""The `canary-proxy` command end to end (SPEC §2, §3, §4), run as a user runs it.

Every test starts `python -m proxy ...` as a child process and asserts on its exit
status, stdout and stderr. Rules the command must keep:
1. Every command answers `--help` (exit 0).
2. A bad flag or a bad config: exit 1, one line per mistake on stderr (a config
   mistake names its key's path), never a traceback.
3. Secrets named by environment variables are never printed.

Python starts in ~0.4 s, so the one-shot commands of a table run concurrently in a
module fixture and each row is then asserted as its own test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import signal
import socket
import string
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import mmh3
import pytest

from proxy import __version__
from tests.conftest import Backends
from tests.harness import closed_port, proxy_yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "example.yaml"
COMMAND = (sys.executable, "-m", "proxy")
PROCESS_TIMEOUT_S = 45.0
# The first test of a batch waits for the batch's module fixture: dozens of
# interpreters, each slower when coverage measures it.
BATCH_TIMEOUT_S = 120
STOP_WITHIN_S = 5.0
CONCURRENT_COMMANDS = max(2, os.cpu_count() or 1)

ADMIN_TOKEN = "admin-token-must-never-be-printed-7f3a"
V1_API_KEY = "sk-v1-key-must-never-be-printed-91c2"
MISSING_ENV = "CANARY_CLI_TEST_NEVER_SET"
LITERAL_KEY = "sk-literal-key-in-the-file-5d1e"
SECRET_AS_ENV_NAME = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx0123456789"


@dataclass(frozen=True, slots=True)
class CliResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def assert_no_traceback(self) -> None:
        assert "Traceback" not in self.stdout + self.stderr, self


def child_env() -> dict[str, str]:
    """The test's environment with the example's secrets set and MISSING_ENV unset."""
    env = {k: v for k, v in os.environ.items() if k != MISSING_ENV}
    env.update(CANARY_ADMIN_TOKEN=ADMIN_TOKEN, V1_API_KEY=V1_API_KEY, PYTHONUNBUFFERED="1")
    return env


def run_many(
    argvs: Sequence[Sequence[str]], env: Mapping[str, str] | None = None, cwd: Path = ROOT
) -> list[CliResult]:
    """Run `canary-proxy ARGV...` for each argv, a few at a time, and wait for them all.

    A few at a time, not all at once: twenty Pythons starting together on two busy
    cores can take longer than any one command's timeout.
    """
    environ = dict(env if env is not None else child_env())

    def run(argv: Sequence[str]) -> CliResult:
        done = subprocess.run(
            [*COMMAND, *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=environ,
            cwd=cwd,
            timeout=PROCESS_TIMEOUT_S,
            check=False,
        )
        return CliResult(tuple(argv), done.returncode, done.stdout, done.stderr)

    with ThreadPoolExecutor(max_workers=CONCURRENT_COMMANDS) as pool:
        return list(pool.map(run, argvs))


def run_one(*argv: str, env: Mapping[str, str] | None = None, cwd: Path = ROOT) -> CliResult:
    return run_many([argv], env, cwd)[0]


# --- help and version --------------------------------------------------------------------

HELP_CASES = {
    "top level": ((), "usage: canary-proxy"),
    "run": (("run",), "usage: canary-proxy run"),
    "check": (("check",), "usage: canary-proxy check"),
    "assign": (("assign",), "usage: canary-proxy assign"),
    "fake-backend": (("fake-backend",), "usage: canary-proxy fake-backend"),
    "schema": (("schema",), "usage: canary-proxy schema"),
    "simulate": (("simulate",), "usage: canary-proxy simulate"),
}


@pytest.fixture(scope="module")
def help_results() -> dict[str, CliResult]:
    argvs = [(*words, "--help") for words, _ in HELP_CASES.values()]
    return dict(zip(HELP_CASES, run_many(argvs), strict=True))


@pytest.mark.timeout(BATCH_TIMEOUT_S)
@pytest.mark.parametrize("command", list(HELP_CASES))
def test_every_command_answers_help(command: str, help_results: dict[str, CliResult]) -> None:
    result = help_results[command]
    assert result.returncode == 0, result
    assert result.stdout.startswith(HELP_CASES[command][1]), result.stdout
    assert result.stderr == ""


@pytest.mark.timeout(30)
def test_top_level_help_lists_every_command(help_results: dict[str, CliResult]) -> None:
    listed = help_results["top level"].stdout
    for command in ("run", "check", "assign", "fake-backend", "schema"):
        assert re.search(rf"^\s+{re.escape(command)}\b", listed, re.MULTILINE), listed


@pytest.mark.timeout(30)
def test_version_prints_the_package_version() -> None:
    result = run_one("--version")
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"canary-proxy {__version__}"


# --- check: the example ---------------------------------------------------------------


@pytest.mark.timeout(30)
def test_check_accepts_the_example_and_never_prints_its_secrets() -> None:
    result = run_one("check", "-c", str(EXAMPLE))
    assert result.returncode == 0, result
    assert result.stderr == ""
    assert result.stdout.rstrip().endswith(f"{EXAMPLE}: ok")
    expected_rows = ("llama-v1", "llama-v2", "chat", "embeddings", "$V1_API_KEY", "5% canary")
    for expected in (*expected_rows, "idle client connections closed after 75s"):
        assert expected in result.stdout, expected
    assert ADMIN_TOKEN not in result.stdout + result.stderr
    assert V1_API_KEY not in result.stdout + result.stderr


def env_without_secrets() -> dict[str, str]:
    """The test's environment as on a laptop or a CI runner: no production secrets."""
    return {k: v for k, v in child_env().items() if k not in ("CANARY_ADMIN_TOKEN", "V1_API_KEY")}


UNSET_SECRETS = (
    "admin.token_env: environment variable CANARY_ADMIN_TOKEN is not set",
    "backends.llama-v1.api_key_env: environment variable V1_API_KEY is not set",
)


@pytest.fixture(scope="module")
def results_without_secrets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CliResult]:
    """Every config-reading command on the example, with its secrets unset."""
    argvs = {
        "check": ("check", "-c", str(EXAMPLE)),
        "check --env": ("check", "--env", "-c", str(EXAMPLE)),
        "run": ("run", "-c", str(EXAMPLE)),
        "assign": ("assign", "-c", str(EXAMPLE), "--route", "chat", "alice"),
        "simulate": (
            "simulate",
            "-c",
            str(EXAMPLE),
            "--route",
            "chat",
            "--runs",
            "2",
            "--hours",
            "0.25",
        ),
    }
    results = run_many(list(argvs.values()), env=env_without_secrets())
    return dict(zip(argvs, results, strict=True))


@pytest.mark.timeout(BATCH_TIMEOUT_S)
def test_check_warns_of_unset_secrets_and_passes(
    results_without_secrets: dict[str, CliResult],
) -> None:
    result = results_without_secrets["check"]
    assert result.returncode == 0, result
    assert result.error_lines == [
        f"{EXAMPLE}: warning: {problem} (`run` needs it)" for problem in UNSET_SECRETS
    ]
    assert result.stdout.rstrip().endswith(f"{EXAMPLE}: ok")
    assert "token from $CANARY_ADMIN_TOKEN, not set here" in result.stdout
    assert "api key from $V1_API_KEY, not set here" in result.stdout


@pytest.mark.timeout(BATCH_TIMEOUT_S)
@pytest.mark.parametrize("command", ["check --env", "run"])
def test_check_env_and_run_reject_unset_secrets(
    command: str, results_without_secrets: dict[str, CliResult]
) -> None:
    result = results_without_secrets[command]
    assert result.returncode == 1, result
    assert result.stdout == ""
    result.assert_no_traceback()
    assert result.error_lines == [f"{EXAMPLE}: {problem}" for problem in UNSET_SECRETS]


@pytest.mark.timeout(BATCH_TIMEOUT_S)
@pytest.mark.parametrize("command", ["assign", "simulate"])
def test_assign_and_simulate_never_need_a_secret(
    command: str, results_without_secrets: dict[str, CliResult]
) -> None:
    result = results_without_secrets[command]
    assert result.returncode == 0, result
    assert result.stderr == ""
    assert "route chat" in result.stdout


@pytest.mark.timeout(30)
def test_check_env_accepts_the_example_when_its_secrets_are_set() -> None:
    result = run_one("check", "--env", "-c", str(EXAMPLE))
    assert result.returncode == 0, result
    assert result.stderr == ""
    assert "not set here" not in result.stdout
    assert ADMIN_TOKEN not in result.stdout
    assert V1_API_KEY not in result.stdout


@pytest.mark.timeout(30)
def test_check_says_when_the_state_store_is_a_redis_cluster(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        proxy_yaml(top="state: {store: redis, url: 'redis://redis-0:6379', cluster: true}")
    )
    result = run_one("check", "-c", str(path))
    assert result.returncode == 0, result
    (shown,) = [line for line in result.stdout.splitlines() if line.startswith("state ")]
    assert shown.split(None, 1)[1] == "redis cluster, nodes found from redis://redis-0:6379"


@pytest.mark.timeout(30)
def test_check_takes_values_from_the_environment_and_names_an_unset_one(tmp_path: Path) -> None:
    path = tmp_path / "env.yaml"
    path.write_text(
        "listen: ${LISTEN:-127.0.0.1:8181}\n"
        "backends:\n"
        "  v1: {url: '${STABLE_URL}'}\n"
        "  v2: {url: '${CANARY_URL:-http://10.0.0.2:8000}'}\n"
        "routes:\n"
        "  - name: chat\n"
        "    stable: v1\n"
        "    canary: v2\n"
        "    rollout:\n"
        "      weight: ${CANARY_WEIGHT}\n"
    )
    env = {**child_env(), "STABLE_URL": "http://10.0.0.1:8000", "CANARY_WEIGHT": "7.5"}
    unset = {k: v for k, v in env.items() if k != "STABLE_URL"}
    ok = run_one("check", "-c", str(path), env=env)
    refused = run_one("check", "-c", str(path), env=unset)
    assert ok.returncode == 0, ok
    shown = ok.stdout
    assert "127.0.0.1:8181" in shown
    assert "http://10.0.0.1:8000" in shown
    assert "http://10.0.0.2:8000" in shown
    assert "7.5% canary" in shown
    assert refused.returncode == 1
    assert refused.error_lines == [
        f"{path}: backends.v1.url: the environment variable STABLE_URL is not set "
        "(give a default with ${STABLE_URL:-value})"
    ]
    refused.assert_no_traceback()


# --- check: bad configs ----------------------------------------------------------------

BACKENDS = "backends:\n  v1: {url: 'http://127.0.0.1:1'}\n  v2: {url: 'http://127.0.0.1:2'}\n"
ROUTES = "routes:\n  - name: chat\n    stable: v1\n    canary: v2\n"
GOOD = BACKENDS + ROUTES


@dataclass(frozen=True, slots=True)
class BadConfig:
    """A config file with mistakes; None: the file does not exist."""

    text: str | None
    problems: tuple[str, ...]  # what each stderr line says after "FILE: ", in order
    secret: str = ""  # a value from the file that must never be printed
    flags: tuple[str, ...] = ()  # more flags for `check`


BAD_CONFIGS = {
    "yaml syntax error": BadConfig(
        "listen: [127.0.0.1:80\n" + GOOD,
        ("line 2, column 9: invalid YAML: expected ',' or ']'",),
    ),
    "unknown top-level key": BadConfig(
        "colour: red\n" + GOOD, ("colour: unknown key 'colour' (expected one of: listen,",)
    ),
    "unknown nested key": BadConfig(
        GOOD + "    sticky: {salts: x}\n",
        ("routes[0].sticky.salts: unknown key 'salts' (did you mean 'salt'?)",),
    ),
    "steps not increasing": BadConfig(
        GOOD + "    rollout: {auto: {steps: [1, 10, 5]}}\n",
        ("routes[0].rollout.auto.steps: must increase, got 5 after 10",),
    ),
    "weight out of range": BadConfig(
        GOOD + "    rollout: {weight: 101}\n",
        ("routes[0].rollout.weight: must be at most 100, got 101",),
    ),
    "weight with three decimals": BadConfig(
        GOOD + "    rollout: {weight: 5.125}\n",
        ("routes[0].rollout.weight: must have at most two decimals, got 5.125",),
    ),
    "unknown backend in a route": BadConfig(
        BACKENDS + "routes:\n  - {name: chat, stable: v1, canary: v3}\n",
        ("routes[0].canary: unknown backend 'v3' (backends: v1, v2)",),
    ),
    "duplicate route names": BadConfig(
        BACKENDS + "routes:\n"
        "  - {name: chat, stable: v1, canary: v2}\n"
        "  - {name: chat, stable: v2, canary: v1}\n",
        ("routes[1].name: duplicate route name 'chat' (also routes[0])",),
    ),
    "duplicate yaml key": BadConfig(
        "listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n" + GOOD,
        ("listen: duplicate key (line 2; first on line 1); YAML would keep only the last",),
    ),
    "bad duration": BadConfig(
        "shutdown_grace: 5 minutes\n" + GOOD,
        ('shutdown_grace: must be a duration like "2s", "250ms" or a number of seconds',),
    ),
    "bad key source": BadConfig(
        GOOD + "    sticky: {keys: [header:x-user-id, heder:x-org]}\n",
        ("routes[0].sticky.keys[1]: unknown key source 'heder:x-org'",),
    ),
    "missing env var for api_key_env": BadConfig(
        GOOD.replace(
            "'http://127.0.0.1:1'}", f"'http://127.0.0.1:1', api_key_env: {MISSING_ENV}}}"
        ),
        (f"backends.v1.api_key_env: environment variable {MISSING_ENV} is not set",),
        flags=("--env",),
    ),
    "literal api_key in a backend": BadConfig(
        GOOD.replace("'http://127.0.0.1:1'}", f"'http://127.0.0.1:1', api_key: {LITERAL_KEY}}}"),
        ("backends.v1.api_key: secrets are not allowed in the config file",),
        secret=LITERAL_KEY,
    ),
    "secret-looking api_key_env": BadConfig(
        GOOD.replace(
            "'http://127.0.0.1:1'}", f"'http://127.0.0.1:1', api_key_env: {SECRET_AS_ENV_NAME}}}"
        ),
        ("backends.v1.api_key_env: looks like a secret, not an environment variable name",),
        secret=SECRET_AS_ENV_NAME,
    ),
    "credentials in a backend url": BadConfig(
        GOOD.replace("http://127.0.0.1:1", f"http://user:{LITERAL_KEY}@127.0.0.1:1"),
        ("backends.v1.url: must not carry credentials",),
        secret=LITERAL_KEY,
    ),
    "redis store without url": BadConfig(
        GOOD + "state: {store: redis}\n", ("state.url: required when state.store is redis",)
    ),
    "missing file": BadConfig(None, ("cannot read the config file: No such file or directory",)),
    "empty file": BadConfig("", ("top level: is empty",)),
    "two mistakes": BadConfig(
        "colour: red\n" + GOOD + "    rollout: {weight: 5.125}\n",
        (
            "colour: unknown key 'colour'",
            "routes[0].rollout.weight: must have at most two decimals, got 5.125",
        ),
    ),
}
# Files that every config-reading command must reject the same way as `check`.
REJECTED_BY_EVERY_COMMAND = ("yaml syntax error", "two mistakes")
CONFIG_COMMANDS = {
    "run": ("run", "-c", "{path}"),
    "assign": ("assign", "-c", "{path}", "--route", "chat", "alice"),
}


@pytest.fixture(scope="module")
def bad_config_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("bad-configs")
    paths: dict[str, Path] = {}
    for index, (name, case) in enumerate(BAD_CONFIGS.items()):
        path = directory / f"bad-{index}.yaml"
        if case.text is not None:
            path.write_bytes(case.text.encode("utf-8", "surrogateescape"))
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def bad_config_results(bad_config_paths: dict[str, Path]) -> dict[tuple[str, str], CliResult]:
    """(command, case) -> result: `check` for every case, the other commands for a few."""
    jobs: dict[tuple[str, str], tuple[str, ...]] = {}
    for name, path in bad_config_paths.items():
        jobs["check", name] = ("check", *BAD_CONFIGS[name].flags, "-c", str(path))
    for name in REJECTED_BY_EVERY_COMMAND:
        for command, template in CONFIG_COMMANDS.items():
            jobs[command, name] = tuple(
                word.format(path=bad_config_paths[name]) for word in template
            )
    return dict(zip(jobs, run_many(list(jobs.values())), strict=True))


@pytest.mark.timeout(BATCH_TIMEOUT_S)
@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_check_reports_every_problem_with_its_path(
    case: str,
    bad_config_paths: dict[str, Path],
    bad_config_results: dict[tuple[str, str], CliResult],
) -> None:
    expected = BAD_CONFIGS[case]
    result = bad_config_results["check", case]
    prefix = f"{bad_config_paths[case]}: "
    assert result.returncode == 1, result
    assert result.stdout == ""
    result.assert_no_traceback()
    lines = result.error_lines
    assert len(lines) == len(expected.problems), lines
    for line, problem in zip(lines, expected.problems, strict=True):
        assert line.startswith(prefix + problem), (line, problem)
    if expected.secret:
        assert expected.secret not in result.stdout + result.stderr


@pytest.mark.timeout(BATCH_TIMEOUT_S)
@pytest.mark.parametrize("command", list(CONFIG_COMMANDS))
@pytest.mark.parametrize("case", REJECTED_BY_EVERY_COMMAND)
def test_every_command_rejects_a_bad_config_as_check_does(
    command: str, case: str, bad_config_results: dict[tuple[str, str], CliResult]
) -> None:
    result = bad_config_results[command, case]
    check = bad_config_results["check", case]
    assert result.returncode == 1, result
    result.assert_no_traceback()
    assert result.error_lines == check.error_lines
    assert result.stdout == ""


# --- bad flags -----------------------------------------------------------------------------

BAD_FLAGS = {
    "unknown flag": (
        ("check", "-c", "{example}", "--colour"),
        "canary-proxy: error: unrecognized arguments: --colour",
    ),
    "unknown top-level flag": (
        ("--colour", "check", "-c", "{example}"),
        "canary-proxy: error: unrecognized arguments: --colour",
    ),
    "missing -c": (
        ("check",),
        "canary-proxy check: error: the following arguments are required: -c/--config",
    ),
    "missing subcommand": ((), "canary-proxy: error: the following arguments are required"),
    "unknown subcommand": (("serve",), "canary-proxy: error: argument COMMAND: invalid choice"),
    "assign without keys": (
        ("assign", "-c", "{example}", "--route", "chat"),
        "canary-proxy assign: error: the following arguments are required: KEY",
    ),
    "assign unknown route": (
        ("assign", "-c", "{example}", "--route", "chatt", "alice"),
        "canary-proxy: error: no route named 'chatt' in {example} (routes: chat, embeddings)",
    ),
    "assign weight over 100": (
        ("assign", "-c", "{example}", "--route", "chat", "--weight", "101", "alice"),
        "canary-proxy assign: error: argument --weight: must be a percent from 0 to 100",
    ),
    "assign weight with three decimals": (
        ("assign", "-c", "{example}", "--route", "chat", "--weight", "5.123", "alice"),
        "canary-proxy assign: error: argument --weight: must be a percent from 0 to 100 "
        "with at most two decimals, got 5.123",
    ),
    "assign weight not a number": (
        ("assign", "-c", "{example}", "--route", "chat", "--weight", "ten", "alice"),
        "canary-proxy assign: error: argument --weight: not a number: 'ten'",
    ),
    "simulate trace and scenario": (
        (
            "simulate",
            "-c",
            "{example}",
            "--route",
            "chat",
            "--trace",
            "t.jsonl",
            "--scenario",
            "iid",
        ),
        "canary-proxy simulate: error: argument --scenario: not allowed with argument --trace",
    ),
    "simulate unknown scenario": (
        ("simulate", "-c", "{example}", "--route", "chat", "--scenario", "weekend"),
        "canary-proxy simulate: error: argument --scenario: invalid choice: 'weekend'",
    ),
    "run zero workers": (
        ("run", "-c", "{example}", "--workers", "0"),
        "canary-proxy run: error: argument --workers: must be at least 1, got 0",
    ),
    "fake-backend error rate 2": (
        ("fake-backend", "--error-rate", "2"),
        "canary-proxy: error: --error-rate must be between 0 and 1, got 2.0",
    ),
    "fake-backend port 70000": (
        ("fake-backend", "--port", "70000"),
        "canary-proxy: error: --port must be between 0 and 65535, got 70000",
    ),
    "fake-backend negative latency": (
        ("fake-backend", "--latency", "-1"),
        "canary-proxy: error: --latency must be a finite number >= 0, got -1.0",
    ),
    "fake-backend unknown log level": (
        ("fake-backend", "--log-level", "loud"),
        "canary-proxy fake-backend: error: argument --log-level: invalid choice: 'loud' "
        "(choose from 'debug', 'info', 'warning', 'error')",
    ),
}


@pytest.fixture(scope="module")
def bad_flag_results() -> dict[str, CliResult]:
    argvs = [tuple(word.format(example=EXAMPLE) for word in argv) for argv, _ in BAD_FLAGS.values()]
    return dict(zip(BAD_FLAGS, run_many(argvs), strict=True))


@pytest.mark.timeout(BATCH_TIMEOUT_S)
@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_a_bad_flag_is_one_line_and_exit_1(
    case: str, bad_flag_results: dict[str, CliResult]
) -> None:
    result = bad_flag_results[case]
    expected = BAD_FLAGS[case][1].format(example=EXAMPLE)
    assert result.returncode == 1, result
    assert result.stdout == ""
    result.assert_no_traceback()
    assert len(result.error_lines) == 1, result.stderr
    assert result.error_lines[0].startswith(expected), (result.error_lines[0], expected)


# --- simulate --------------------------------------------------------------------------------

ROLLOUT = ROOT / "config" / "rollout.yaml"
SCENARIOS = ("iid", "heavy-users", "bursts", "diurnal", "shared-incident", "cancels", "step-change")


@pytest.fixture(scope="module")
def scenario_results() -> dict[str, CliResult]:
    flags = ("--runs", "2", "--hours", "0.2", "--rps", "20", "--seed", "3", "--json")
    argvs = [
        ("simulate", "-c", str(ROLLOUT), "--route", "chat", "--scenario", name, *flags)
        for name in SCENARIOS
    ]
    return dict(zip(SCENARIOS, run_many(argvs), strict=True))


def assert_shares(result: CliResult, runs: int) -> list[dict[str, Any]]:
    """`simulate --json`: the shares of each outcome and every run, and nothing else."""
    assert result.returncode == 0, result
    document = json.loads(result.stdout)
    assert set(document) == {"runs", "promoted", "rolled_back", "running"}
    assert len(document["runs"]) == runs
    for run in document["runs"]:
        assert set(run) == {"outcome", "seconds", "canary_requests", "max_weight"}
        assert run["outcome"] in {"promoted", "rolled_back", "held", "running"}
    outcomes = [run["outcome"] for run in document["runs"]]
    assert document["promoted"] == pytest.approx(outcomes.count("promoted") / runs)
    assert document["rolled_back"] == pytest.approx(outcomes.count("rolled_back") / runs)
    total = document["promoted"] + document["rolled_back"] + document["running"]
    assert total == pytest.approx(1.0)
    return list(document["runs"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_simulate_runs_every_built_in_scenario(
    scenario: str, scenario_results: dict[str, CliResult]
) -> None:
    runs = assert_shares(scenario_results[scenario], 2)
    for run in runs:
        assert run["max_weight"] >= 1.0  # config/rollout.yaml starts at 1%
        assert 0 < run["seconds"] <= 0.2 * 3600


def write_trace(path: Path, canary_status: int, *, seconds: int = 1200, rps: int = 20) -> Path:
    """A trace of `seconds` at `rps` from 2,000 users: stable answers 200 (1% 500s),
    the canary `canary_status`; a few requests stream, a few were cancelled."""
    rng = random.Random(4)
    lines = []
    for n in range(seconds * rps):
        stable: dict[str, object] = {
            "status": 500 if rng.random() < 0.01 else 200,
            "latency": round(rng.lognormvariate(0, 0.4), 3),
        }
        if n % 3 == 0:
            stable |= {"ttft": 0.1, "output_tokens": 40, "cancelled": n % 300 == 0}
        canary = dict(stable, status=canary_status)
        lines.append(
            json.dumps(
                {
                    "t": n / rps,
                    "user": f"user-{rng.randrange(2000)}",
                    "stable": stable,
                    "canary": canary,
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.timeout(150)
def test_simulate_replays_a_trace_through_the_judge(tmp_path: Path) -> None:
    failing = write_trace(tmp_path / "failing.jsonl", 503)
    healthy = write_trace(tmp_path / "healthy.jsonl", 200)
    base = ("simulate", "-c", str(ROLLOUT), "--route", "chat", "--runs", "3")
    bad, good, text = run_many(
        [
            (*base, "--trace", str(failing), "--json"),
            (*base, "--trace", str(healthy), "--json"),
            (*base, "--trace", str(failing)),
        ]
    )
    # Each run is another salt: other users are the canary's first ones, and a canary
    # that fails everything is rolled back in every one, long before the trace ends.
    for run in assert_shares(bad, 3):
        assert run["outcome"] == "rolled_back"
        assert run["seconds"] < 1200
        assert run["max_weight"] == 1.0
    assert {run["outcome"] for run in assert_shares(good, 3)} <= {"running", "promoted"}
    assert text.returncode == 0, text
    assert f"trace {failing}: 24000 requests from " in text.stdout
    assert "3 runs, the salt varied from run to run" in text.stdout
    assert re.search(r"canary-proxy\s+0\.0%\s+100\.0%", text.stdout), text.stdout


def test_simulate_names_every_bad_line_of_a_trace(tmp_path: Path) -> None:
    trace = tmp_path / "bad.jsonl"
    good = {
        "t": 0,
        "user": "u",
        "stable": {"status": 200, "latency": 0.1},
        "canary": {"status": 200, "latency": 0.1},
    }
    trace.write_text(
        "\n".join(
            [
                json.dumps(good),
                json.dumps(good | {"stable": {"status": 99, "latency": 0.1}}),
                json.dumps(good | {"canary": {"status": 200, "latency": -1}}),
                "not json",
                json.dumps(good | {"weight": 5}),
            ]
        )
        + "\n"
    )
    result = run_one("simulate", "-c", str(ROLLOUT), "--route", "chat", "--trace", str(trace))
    assert result.returncode == 1
    result.assert_no_traceback()
    assert result.error_lines[:2] == [
        f"{trace}:2: stable.status must be an HTTP status (100-599)",
        f"{trace}:3: canary.latency must be a number of seconds, at least 0",
    ]
    assert result.error_lines[2].startswith(f"{trace}:4: ")
    assert result.error_lines[3] == (
        f"{trace}:5: unknown key 'weight' (keys: t, user, stable, canary)"
    )


def test_simulate_refuses_a_missing_or_empty_trace_in_one_line(tmp_path: Path) -> None:
    missing, empty = tmp_path / "missing.jsonl", tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    base = ("simulate", "-c", str(ROLLOUT), "--route", "chat", "--trace")
    absent, blank = run_many([(*base, str(missing)), (*base, str(empty))])
    for result in (absent, blank):
        assert result.returncode == 1
        result.assert_no_traceback()
        assert result.stdout == ""
    assert absent.error_lines == [
        f"canary-proxy: error: cannot read the trace {missing}: No such file or directory"
    ]
    assert blank.error_lines == [f"{empty}: no requests in the trace"]


# --- assign ----------------------------------------------------------------------------------

KEY_ALPHABET = string.ascii_letters + string.digits + "-_.@:/+=é"


def random_keys(count: int, seed: int) -> list[str]:
    """User keys as a proxy would read them; none starts with "-" (it would be a flag)."""
    rng = random.Random(seed)
    keys = {
        rng.choice(string.ascii_letters) + "".join(rng.choices(KEY_ALPHABET, k=rng.randint(0, 40)))
        for _ in range(count)
    }
    return sorted(keys)


def edge_keys(salt: str, weight: float) -> list[str]:
    """Keys in the last canary bucket and the first stable bucket at `weight`."""
    threshold = round(weight * 100)
    wanted = {bucket for bucket in (threshold - 1, threshold) if 0 <= bucket < 10000}
    found: dict[int, str] = {}
    for index in itertools.count():
        key = f"edge-{index}"
        bucket = mmh3.hash(f"{salt}:{key}", 0, signed=False) % 10000
        if bucket in wanted:
            found.setdefault(bucket, key)
            if len(found) == len(wanted):
                return [found[bucket] for bucket in sorted(found)]
    raise AssertionError("unreachable")


def expected_assignment(salt: str, key: str, weight: float) -> tuple[int, str, float]:
    """SPEC §4, computed here with mmh3 directly: bucket, variant, canary from weight."""
    bucket = mmh3.hash(f"{salt}:{key}", 0, signed=False) % 10000
    variant = "canary" if bucket < round(weight * 100) else "stable"
    return bucket, variant, (bucket + 1) / 100


ASSIGN_CASES = {
    # name: (route, --weight flag or None, salt, effective weight)
    "config weight and salt": ("chat", None, "chat-2026-11", 5.0),
    "weight flag overrides the config": ("chat", "37.25", "chat-2026-11", 37.25),
    "default salt is the route name": ("embeddings", None, "embeddings", 0.0),
}
TABLE_ROW = re.compile(
    r"^(?P<key>\S+)\s+(?P<bucket>\d+)\s+(?P<variant>stable|canary)\s+(?P<from>[\d.]+)%$"
)


@pytest.fixture(scope="module")
def assign_results() -> dict[tuple[str, bool], tuple[list[str], CliResult]]:
    """(case, json) -> the keys asked about and the result."""
    jobs: dict[tuple[str, bool], tuple[str, ...]] = {}
    keys_of: dict[str, list[str]] = {}
    for seed, (name, (route, weight, salt, effective)) in enumerate(ASSIGN_CASES.items()):
        keys_of[name] = random_keys(200, seed) + edge_keys(salt, effective)
        flags = ("--weight", weight) if weight is not None else ()
        for as_json in (False, True):
            json_flag = ("--json",) if as_json else ()
            jobs[name, as_json] = (
                *("assign", "-c", str(EXAMPLE), "--route", route, *flags, *json_flag),
                *keys_of[name],
            )
    results = run_many(list(jobs.values()))
    return {job: (keys_of[job[0]], result) for job, result in zip(jobs, results, strict=True)}


@pytest.mark.timeout(BATCH_TIMEOUT_S)
@pytest.mark.parametrize("case", list(ASSIGN_CASES))
def test_assign_table_matches_the_spec_formula(
    case: str, assign_results: dict[tuple[str, bool], tuple[list[str], CliResult]]
) -> None:
    route, _, salt, weight = ASSIGN_CASES[case]
    keys, result = assign_results[case, False]
    assert result.returncode == 0, result
    assert result.stderr == ""
    header, blank, columns, *rows = result.stdout.splitlines()
    assert header.startswith(f"route {route}: ")
    assert f"weight {weight:g}%, salt {salt!r}" in header
    assert blank == ""
    assert columns.split() == ["key", "bucket", "variant", "canary", "from", "weight"]
    assert len(rows) == len(keys)
    for key, row in zip(keys, rows, strict=True):
        match = TABLE_ROW.match(row)
        assert match is not None, row
        bucket, variant, canary_from = expected_assignment(salt, key, weight)
        assert match["key"] == key
        assert int(match["bucket"]) == bucket, key
        assert match["variant"] == variant, key
        assert float(match["from"]) == canary_from, key


@pytest.mark.timeout(BATCH_TIMEOUT_S)
@pytest.mark.parametrize("case", list(ASSIGN_CASES))
def test_assign_json_matches_the_spec_formula(
    case: str, assign_results: dict[tuple[str, bool], tuple[list[str], CliResult]]
) -> None:
    route, _, salt, weight = ASSIGN_CASES[case]
    keys, result = assign_results[case, True]
    assert result.returncode == 0, result
    assert result.stderr == ""
    document = json.loads(result.stdout)
    assert document["route"] == route
    assert document["weight"] == weight
    assert [row["key"] for row in document["keys"]] == keys
    for row in document["keys"]:
        bucket, variant, canary_from = expected_assignment(salt, row["key"], weight)
        assert row == {
            "key": row["key"],
            "bucket": bucket,
            "variant": variant,
            "canary_from_weight": canary_from,
        }
        # "canary from weight" is exactly the lowest weight that puts the key in the canary.
        assert expected_assignment(salt, row["key"], canary_from)[1] == "canary"
        assert expected_assignment(salt, row["key"], canary_from - 0.01)[1] == "stable"


# --- long-running commands: run and fake-backend --------------------------------------------

LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


@dataclass
class Child:
    """A long-running `canary-proxy` child whose stderr or stdout announces it listens."""

    process: asyncio.subprocess.Process
    early_output: str = ""

    async def wait_listening(self, stream: asyncio.StreamReader, timeout_s: float = 10) -> int:
        lines: list[str] = []
        async with asyncio.timeout(timeout_s):
            while line := (await stream.readline()).decode():
                lines.append(line)
                if match := LISTENING.search(line):
                    self.early_output = "".join(lines)
                    return int(match[1])
        self.early_output = "".join(lines)
        raise AssertionError(f"it never said it listens: {self.early_output!r}")

    async def terminate(self) -> tuple[int, str, str]:
        """SIGTERM, then the exit status and the rest of stdout and stderr."""
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(STOP_WITHIN_S):
            out, err = await self.process.communicate()
        assert self.process.returncode is not None
        return self.process.returncode, out.decode(), err.decode()

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.communicate()


async def start_child(*argv: str, cwd: Path = ROOT) -> Child:
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        cwd=cwd,
    )
    return Child(process)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.timeout(30)
async def test_run_serves_requests_and_exits_0_on_sigterm(
    backends: Backends, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        proxy_yaml(backends.stable.url, backends.canary.url, route="override_header: x-canary")
    )
    child = await start_child("run", "-c", str(path), cwd=tmp_path)  # its state files go there
    try:
        assert child.process.stderr is not None
        port = await child.wait_listening(child.process.stderr)
        assert "1 route)" in child.early_output
        served: dict[str, tuple[str, str]] = {}
        async with aiohttp.ClientSession() as session:
            for force, variant in (("never", "stable"), ("always", "canary")):
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"x-user-id": "alice", "x-canary": force},
                ) as response:
                    assert response.status == 200, await response.text()
                    body = await response.json()
                    served[variant] = (response.headers["x-canary-variant"], body["model"])
            # SIGTERM with an idle keep-alive connection still open, as a real client leaves it.
            returncode, out, err = await child.terminate()
        assert served == {
            "stable": ("stable", backends.stable.model),
            "canary": ("canary", backends.canary.model),
        }
        assert returncode == 0, (out, err)
        assert "Traceback" not in child.early_output + out + err
        assert "stopping" in err
    finally:
        await child.kill()


@pytest.mark.timeout(30)
def test_run_on_a_busy_port_is_one_cannot_listen_line_and_exit_1(
    busy_port: int, tmp_path: Path
) -> None:
    path = tmp_path / "busy.yaml"
    path.write_text(proxy_yaml(listen=f"127.0.0.1:{busy_port}"))
    result = run_one("run", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 1, result
    result.assert_no_traceback()
    assert len(result.error_lines) == 1, result.stderr
    assert result.error_lines[0].startswith(
        f"canary-proxy: error: cannot listen on 127.0.0.1:{busy_port}: "
    ), result.stderr
    assert "address already in use" in result.error_lines[0].lower()


@pytest.mark.timeout(30)
async def test_fake_backend_serves_its_model_and_exits_0_on_sigterm() -> None:
    port = closed_port()
    child = await start_child("fake-backend", "--port", str(port), "--model", "cli-test-model")
    try:
        assert child.process.stdout is not None
        assert await child.wait_listening(child.process.stdout) == port
        assert "model=cli-test-model" in child.early_output
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/v1/models") as response,
        ):
            assert response.status == 200
            models = await response.json()
        assert [model["id"] for model in models["data"]] == ["cli-test-model"]
        returncode, out, err = await child.terminate()
        assert returncode == 0, (out, err)
        assert "Traceback" not in out + err
    finally:
        await child.kill()


@pytest.mark.timeout(30)
def test_fake_backend_on_a_busy_port_is_one_line_and_exit_1(busy_port: int) -> None:
    result = run_one("fake-backend", "--port", str(busy_port))
    assert result.returncode == 1, result
    result.assert_no_traceback()
    assert len(result.error_lines) == 1, result.stderr
    assert result.error_lines[0].startswith(
        f"canary-proxy: error: cannot listen on 127.0.0.1:{busy_port}: "
    )
