"""`canary-proxy demo`: the first thing a new user runs, in both of its endings."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.demo import default_config_path
from tests.harness import closed_port


def demo_config(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """The shipped demo config with every port moved to a free one."""
    text = default_config_path().read_text()
    ports = {old: closed_port() for old in ("18080", "19090", "18001", "18002")}
    for old, new in ports.items():
        text = text.replace(f":{old}", f":{new}")
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    return path, ports


def run_demo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "demo", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=cwd,
    )


def test_config_demo_yaml_is_the_packaged_demo_config() -> None:
    repository_copy = Path(__file__).parent.parent / "config" / "demo.yaml"
    assert repository_copy.read_text() == default_config_path().read_text()


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("flags", "outcome", "action"),
    [
        ((), "rolled back", "rolled back after"),
        (("--healthy-canary",), "promoted", "promoted to 100%"),
    ],
    ids=["faulty-canary", "healthy-canary"],
)
def test_demo_ends_with_the_expected_outcome(
    tmp_path: Path, flags: tuple[str, ...], outcome: str, action: str
) -> None:
    config, _ = demo_config(tmp_path)
    result = run_demo("-c", str(config), *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"outcome: the canary was {outcome}" in out
    assert action in out
    # Live progress: a bar and both variants' numbers, more than once.
    progress = re.findall(r"^\[[#.]{24}\] +\d+\.\d% \w+ +\| stable +\d+ req .*\| canary", out, re.M)
    assert len(progress) >= 2
    assert "users moved from the canary back to stable while the weight rose: 0" in out
    assert "Traceback" not in result.stderr
    # The rollout state went to a temporary directory, not where the demo ran.
    assert not list(tmp_path.glob("*.db*"))


@pytest.mark.timeout(60)
def test_demo_refuses_a_busy_port_in_one_line(tmp_path: Path) -> None:
    config, ports = demo_config(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports["18001"]))
        busy.listen()
        result = run_demo("-c", str(config), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"port {ports['18001']} on 127.0.0.1 is already in use" in lines[0]
