"""README.md, run as a newcomer runs it: every `canary-proxy` command and every sample output.

The README is the first thing a user tries, so it is executed, in order, in a scratch
directory holding a copy of `config/`:

- a ```console block is a list of `$ canary-proxy ...` commands, each followed by the
  output it prints (stdout and stderr together). A command ending in `&` is started in
  the background and waited for until it says it is listening; the rest run to their end.
- a ```yaml block right after `<!-- file: NAME -->` is written to NAME first.
- `<!-- exit: N -->` before a console block: its commands exit with N (otherwise 0).
- a ```python block is run (it may talk to the servers started above); a ```text block
  right after it is what it prints.
- a ```sh block may not hold a `canary-proxy` command: it would go untested.

Outputs are compared by shape: numbers, 12-digit hashes and timestamps may differ, and
so may the runs of spaces that align columns; a line `...` stands for any lines. The
ports the README uses are swapped for free ones, and this machine's host name reads
`myhost`. The example's secrets are unset, as on a newcomer's machine.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness import eventually_sync

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
COMMAND_TIMEOUT_S = 60.0
START_TIMEOUT_S = 20.0
SHOWN_HOST = "myhost"
SECRETS = ("CANARY_ADMIN_TOKEN", "V1_API_KEY")
# The commands a newcomer needs, each shown at least once.
FIRST_COMMANDS = ("check", "assign", "fake-backend", "run", "status", "simulate")

_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*(file|exit):\s*(\S+)\s*-->$")
_PORT = re.compile(r"(?:127\.0\.0\.1:|--port )(\d{2,5})\b")


@dataclass(frozen=True, slots=True)
class Block:
    lang: str
    text: str
    line: int  # of the opening fence, 1-based
    markers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Step:
    """One thing to do: write a file, run a command, or run a Python snippet."""

    kind: str  # "file" | "command" | "python"
    text: str  # the file's content, the command line, or the code
    expected: tuple[str, ...] | None  # the output shown; None: not compared
    line: int
    name: str = ""  # the file's name
    exit_status: int = 0

    @property
    def id(self) -> str:
        return f"line {self.line}: {self.text.splitlines()[0][:60]}"


def read_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        markers: dict[str, str] = {}
        back = index - 1
        while back >= 0 and (marker := _MARKER.match(lines[back].strip())):
            markers[marker.group(1)] = marker.group(2)
            back -= 1
        end = index + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        blocks.append(Block(match.group(1), "\n".join(lines[index + 1 : end]), index + 1, markers))
        index = end + 1
    return blocks


def read_steps(blocks: list[Block]) -> list[Step]:
    steps: list[Step] = []
    for position, block in enumerate(blocks):
        if block.lang == "yaml" and "file" in block.markers:
            steps.append(Step("file", block.text + "\n", None, block.line, block.markers["file"]))
        elif block.lang == "console":
            steps.extend(_console_steps(block))
        elif block.lang == "python":
            after = blocks[position + 1] if position + 1 < len(blocks) else None
            shown = after.text.splitlines() if after is not None and after.lang == "text" else None
            steps.append(Step("python", block.text, tuple(shown or ()), block.line))
    return steps


def _console_steps(block: Block) -> list[Step]:
    """A console block's commands, each with the output shown under it (none for `&`)."""
    steps: list[Step] = []
    exit_status = int(block.markers.get("exit", "0"))
    lines = block.text.splitlines()
    starts = [n for n, line in enumerate(lines) if line.startswith("$ ")]
    assert starts[:1] == [0], f"README line {block.line}: output before any command"
    for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        command, output = lines[start][2:].strip(), tuple(lines[start + 1 : end])
        background = command.endswith("&")
        assert not (background and output), f"README line {block.line}: `&` shows no output"
        line = block.line + 1 + start
        steps.append(
            Step("command", command, None if background else output, line, "", exit_status)
        )
    return steps


BLOCKS = read_blocks(README.read_text())
STEPS = read_steps(BLOCKS)
COMMANDS = [step for step in STEPS if step.kind == "command"]


# --- shapes ------------------------------------------------------------------------------

_SHAPES = (
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)?"), "<time>"),
    (re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{12}\b"), "<hash>"),
    (re.compile(r"\d+(?:\.\d+)?"), "<n>"),
)


def shape(line: str) -> str:
    for pattern, token in _SHAPES:
        line = pattern.sub(token, line)
    return " ".join(line.split())


def same_shape(expected: tuple[str, ...], actual: list[str]) -> bool:
    """Whether `actual` has the shape of `expected`, where a line `...` is any lines."""
    want = [line if line.strip() == "..." else shape(line) for line in expected]
    got = [shape(line) for line in actual]

    def match(i: int, j: int) -> bool:
        if i == len(want):
            return j == len(got)
        if want[i].strip() == "...":
            return any(match(i + 1, k) for k in range(j, len(got) + 1))
        return j < len(got) and want[i] == got[j] and match(i + 1, j + 1)

    return match(0, 0)


# --- running it --------------------------------------------------------------------------


@dataclass
class Outcome:
    returncode: int
    output: list[str]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ports() -> dict[str, str]:
    """Every port the README's commands and configs use, to a free one here."""
    texts = [step.text for step in STEPS] + [p.read_text() for p in (ROOT / "config").iterdir()]
    ports = sorted({m.group(1) for text in texts for m in _PORT.finditer(text)})
    return {port: str(_free_port()) for port in ports}


def _swap_ports(text: str, ports: dict[str, str]) -> str:
    return _PORT.sub(lambda m: m.group(0).replace(m.group(1), ports[m.group(1)]), text)


class Newcomer:
    """A scratch directory with the configs, a shell-less way to run commands, and the
    servers the README started."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports = _ports()
        shutil.copytree(ROOT / "config", directory / "config")
        for path in (directory / "config").iterdir():
            path.write_text(_swap_ports(path.read_text(), self.ports))
        bin_dir = str(Path(sys.executable).parent)
        self.env = {k: v for k, v in os.environ.items() if k not in SECRETS}
        self.env.update(PATH=bin_dir + os.pathsep + self.env.get("PATH", ""), PYTHONUNBUFFERED="1")
        self.background: list[tuple[subprocess.Popen[bytes], Path]] = []

    def do(self, step: Step) -> Outcome | None:
        if step.kind == "file":
            (self.directory / step.name).write_text(step.text)
            return None
        text = _swap_ports(step.text, self.ports)
        if step.kind == "python":
            return self._run([sys.executable, "-c", text])
        argv = shlex.split(text)
        assert argv[0] == "canary-proxy", f"README line {step.line}: only canary-proxy runs here"
        if argv[-1] == "&":
            self._start(argv[:-1], step)
            return None
        return self._run(argv)

    def _run(self, argv: list[str]) -> Outcome:
        result = subprocess.run(
            argv,
            cwd=self.directory,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
        text = result.stdout.decode().replace(socket.gethostname(), SHOWN_HOST)
        return Outcome(result.returncode, text.rstrip("\n").splitlines())

    def _start(self, argv: list[str], step: Step) -> None:
        log = self.directory / f"background-{len(self.background)}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                argv,
                cwd=self.directory,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        self.background.append((process, log))

        def output() -> str:
            assert process.poll() is None, f"README line {step.line}: {log.read_text()}"
            return log.read_text()

        eventually_sync(
            f"README line {step.line} listening",
            output,
            holds=lambda text: "listening on" in text,
            timeout_s=START_TIMEOUT_S,
        )

    def stop(self) -> None:
        for process, _ in self.background:
            process.terminate()
        for process, log in self.background:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Outcome]]:
    """The README run from top to bottom: each step's outcome, by its position."""
    newcomer = Newcomer(tmp_path_factory.mktemp("readme"))
    results: dict[int, Outcome] = {}
    try:
        for position, step in enumerate(STEPS):
            outcome = newcomer.do(step)
            if outcome is not None:
                results[position] = outcome
        yield results
    finally:
        newcomer.stop()


# --- the tests ---------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "position",
    [n for n, step in enumerate(STEPS) if step.expected is not None],
    ids=[step.id for step in STEPS if step.expected is not None],
)
def test_readme_step_prints_what_the_readme_shows(
    position: int, outcomes: dict[int, Outcome]
) -> None:
    step, outcome = STEPS[position], outcomes[position]
    assert step.expected is not None
    shown = "\n".join(outcome.output)
    assert outcome.returncode == step.exit_status, shown
    assert "Traceback" not in shown
    assert same_shape(step.expected, outcome.output), (
        f"README line {step.line}, `{step.text}` printed:\n{shown}\n\n"
        "which is not the shape the README shows:\n" + "\n".join(step.expected)
    )


@pytest.mark.timeout(10)
def test_the_readme_shows_a_newcomer_every_first_command() -> None:
    shown = {shlex.split(step.text)[1] for step in COMMANDS}
    assert set(FIRST_COMMANDS) <= shown, shown
    assert len([s for s in STEPS if s.expected]) >= len(FIRST_COMMANDS) - 1


@pytest.mark.timeout(10)
def test_no_canary_proxy_command_in_the_readme_escapes_the_test() -> None:
    hidden = [
        f"line {block.line}: {line}"
        for block in BLOCKS
        if block.lang not in ("console", "text")
        for line in block.text.splitlines()
        if line.strip().startswith(("canary-proxy ", "$ canary-proxy "))
    ]
    assert hidden == [], "put these in ```console blocks with their output"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("expected", "actual", "same"),
    [
        (("weight 10%",), ["weight 25%"], True),
        (("weight 10%",), ["weight 10% canary"], False),
        (("a  b",), ["a b"], True),
        (
            ("config 2c4bcf36f3a6 (loaded 2026-12-03T09:00:00+00:00)",),
            ["config abc123def456 (loaded 2027-01-01T00:00:00+00:00)"],
            True,
        ),
        (("first", "...", "last"), ["first", "x", "y", "last"], True),
        (("first", "...", "last"), ["first", "last"], True),
        (("first", "last"), ["first", "middle", "last"], False),
        (("carol canary",), ["carol stable"], False),
    ],
)
def test_shapes(expected: tuple[str, ...], actual: list[str], same: bool) -> None:
    assert same_shape(expected, actual) is same
