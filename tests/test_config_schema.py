"""`canary-proxy schema`: a JSON Schema that every shipped config meets, with the parser's keys.

The schema is what an editor checks a config against, so it must accept every config
the project ships and name exactly the keys the parser accepts; the bad configs below
are refused by both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from proxy.config import ConfigError, parse_config
from proxy.config.parse import BACKEND_KEYS, TOP_KEYS, WEBHOOK_KEYS
from proxy.config.rollout import AUTO_KEYS, STEP_KEYS
from proxy.config.routes import ROUTE_KEYS
from proxy.config.schema import config_schema
from tests.test_deploy import CONFIGMAP_CONFIG, configmap_config_text, shipped_config_files

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = config_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def shipped_configs() -> dict[str, str]:
    texts = {name: path.read_text() for name, path in shipped_config_files().items()}
    texts[CONFIGMAP_CONFIG] = configmap_config_text()
    texts["proxy/demo.yaml"] = (ROOT / "proxy" / "demo.yaml").read_text()
    return texts


def errors_of(text: str) -> list[str]:
    document = yaml.safe_load(text)
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in VALIDATOR.iter_errors(document)
    ]


@pytest.mark.timeout(30)
def test_the_command_prints_a_valid_draft_2020_12_schema() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "schema"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    printed = json.loads(result.stdout)
    assert printed == SCHEMA
    jsonschema.Draft202012Validator.check_schema(printed)


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_every_shipped_config_meets_the_schema(name: str) -> None:
    assert errors_of(shipped_configs()[name]) == []


def properties(*path: str) -> set[str]:
    node: Any = SCHEMA
    for step in path:
        node = node[step]
    return set(node["properties"])


def test_the_schema_names_exactly_the_keys_the_parser_accepts() -> None:
    defs = SCHEMA["$defs"]
    assert properties() == set(TOP_KEYS)
    assert set(defs["Backend"]["properties"]) == set(BACKEND_KEYS)
    assert set(defs["Route"]["properties"]) == set(ROUTE_KEYS)
    assert set(defs["AutoRollout"]["properties"]) == set(AUTO_KEYS)
    assert set(defs["Webhook"]["properties"]) == set(WEBHOOK_KEYS)
    step = defs["AutoRollout"]["properties"]["steps"]["items"]["anyOf"][-1]
    assert set(step["properties"]) == set(STEP_KEYS)
    # Durations are written without the model's `_s`, and keep their defaults.
    assert defs["AutoRollout"]["properties"]["interval"]["default"] == 30
    assert defs["Limits"]["properties"]["keepalive_timeout"]["default"] == 75
    assert SCHEMA["required"] == ["backends", "routes"]
    assert defs["Route"]["required"] == ["name", "stable", "canary"]


GOOD = """\
backends:
  v1: {url: "http://10.0.0.1:8000"}
routes:
  - name: chat
    stable: v1
    canary: v1
"""

BAD = {
    "a typo at the top": (GOOD + "listn: 0.0.0.0:80\n", "Additional properties"),
    "a typo in a route": (GOOD + "    stickey: {salt: x}\n", "Additional properties"),
    "a bad enum": (GOOD + "    sticky: {anonymous: canary}\n", "is not valid"),
    "a bad duration": (GOOD + "shutdown_grace: soon\n", "is not valid"),
    "a string for a count": (GOOD + "limits: {max_concurrency: many}\n", "is not valid"),
    "a weight above 100": (GOOD + "    rollout: {weight: 150}\n", "is not valid"),
    "no routes": ("backends: {v1: {url: 'http://h:1'}}\nroutes: []\n", "should be non-empty"),
    "a step with no weight": (
        GOOD + "    rollout: {auto: {steps: [{pause: 5m}]}}\n",
        "is not valid",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_schema_and_the_parser_both_refuse_a_bad_config(case: str) -> None:
    text, message = BAD[case]
    assert errors_of(GOOD) == []
    errors = errors_of(text)
    assert errors, case
    assert message in errors[0]
    with pytest.raises(ConfigError):
        parse_config(text, environ={})


def test_a_reference_stands_for_any_scalar() -> None:
    text = GOOD + "limits: {max_concurrency: '${MAX}'}\nshutdown_grace: '${GRACE:-5s}'\n"
    assert errors_of(text) == []
