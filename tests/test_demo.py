"""`canary-proxy demo`: the first thing a new user runs."""

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
    return path, {old: int(new) for old, new in ports.items()}


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "demo", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_demo_yaml_is_the_packaged_demo_config() -> None:
    repository_copy = Path(__file__).parent.parent / "config" / "demo.yaml"
    assert repository_copy.read_text() == default_config_path().read_text()


@pytest.mark.timeout(90)
def test_demo_shows_every_user_on_one_side(tmp_path: Path) -> None:
    config, _ = demo_config(tmp_path)
    result = run_demo("-c", str(config), "--users", "120", "--requests-per-user", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    stable = re.search(r"^stable\s+(\d+)\s+\S+\s+(\d+)\s+\S+\s+(\d+)", out, re.M)
    canary = re.search(r"^canary\s+(\d+)\s+\S+\s+(\d+)\s+\S+\s+(\d+)", out, re.M)
    assert stable is not None
    assert canary is not None
    users = int(stable.group(1)) + int(canary.group(1))
    requests = int(stable.group(2)) + int(canary.group(2))
    assert users == 120
    assert requests == 360
    assert int(canary.group(1)) > 0
    assert "users seen on both sides: 0 of 120" in out
    assert "users whose side differs from the formula: 0 of 120" in out
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_demo_refuses_a_busy_port_in_one_line(tmp_path: Path) -> None:
    config, ports = demo_config(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports["18001"]))
        busy.listen()
        result = run_demo("-c", str(config))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"port {ports['18001']} on 127.0.0.1 is already in use" in lines[0]
