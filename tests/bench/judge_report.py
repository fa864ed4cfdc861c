"""`make judge-report`: the judge against the issue's targets, beside its baselines, in
every built-in scenario; the tables go into docs/rollouts.md.

For each scenario of `proxy.rollout.traffic` and each policy of `proxy.rollout.simulate`
(this judge, Flagger's threshold rule, Kayenta's Mann-Whitney as Argo runs it, an oracle
SPRT), five canaries are simulated on the route of config/rollout.yaml:

- healthy (as good as stable): the share rolled back is the **false rollbacks**;
- 3% errors against stable's 1%, and 1.4× stable's latency: the share rolled back is
  the **detection**, and its median time the **time to rollback**;
- exactly at a limit (2% errors against 1% + 1% allowed; 1.25× latency against 1.25×
  allowed): the share that ever left the first step is the **wrong step-ups** per step.

Runs are split across `--jobs` processes; run n of every cell draws its traffic from
(seed, n), so the policies meet the same users and events. A run lasts `--hours`, a run
at a limit `--limit-hours` (it never ends by itself).

    python tests/bench/judge_report.py [--runs N] [--jobs J] [--write]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from proxy.config import EnvSecrets, load_config  # noqa: E402
from proxy.rollout.simulate import (  # noqa: E402
    SCENARIOS,
    Policy,
    RunResult,
    Scenario,
    duration,
    simulate,
)

CONFIG = ROOT / "config" / "rollout.yaml"
DOC = ROOT / "docs" / "rollouts.md"
BEGIN = "<!-- judge-report:begin -->"
END = "<!-- judge-report:end -->"

# canary: (its error rate, its latency over stable's); stable's error rate is 1%
CANARIES = {
    "healthy": (0.01, 1.0),
    "errors": (0.03, 1.0),
    "latency": (0.01, 1.4),
    "errors at limit": (0.02, 1.0),
    "latency at limit": (0.01, 1.25),
}
AT_LIMIT = ("errors at limit", "latency at limit")
# The oracle is the yardstick of time to rollback only: at a limit it can tell nothing
# apart and never moves (by construction), and a healthy canary is not what it measures.
ORACLE_CANARIES = ("errors", "latency")
CHUNK = 10  # runs per task


@dataclass(frozen=True, slots=True)
class Task:
    scenario: str
    canary: str
    policy: Policy
    first_run: int
    runs: int


def run_task(task: Task, settings: argparse.Namespace) -> tuple[Task, list[RunResult]]:
    route = load_config(str(CONFIG), secrets=EnvSecrets.IGNORE).route("chat")
    assert route is not None
    errors, ratio = CANARIES[task.canary]
    hours = settings.limit_hours if task.canary in AT_LIMIT else settings.hours
    scenario = Scenario(
        name=task.scenario,
        rps=settings.rps,
        canary_error_rate=errors,
        canary_latency_ratio=ratio,
        duration_s=hours * 3600,
    )
    return task, simulate(route, scenario, task.runs, settings.seed, task.policy, task.first_run)


def _worker(args: tuple[Task, argparse.Namespace]) -> tuple[Task, list[RunResult]]:
    return run_task(*args)


def tasks(settings: argparse.Namespace) -> list[Task]:
    result = []
    for scenario in settings.scenarios:
        for canary in CANARIES:
            for policy in settings.policies:
                if policy is Policy.ORACLE and canary not in ORACLE_CANARIES:
                    continue
                for first in range(0, settings.runs, CHUNK):
                    runs = min(CHUNK, settings.runs - first)
                    result.append(Task(scenario, canary, policy, first, runs))
    # The longest first (the judge's at-limit runs), for an even finish across jobs.
    return sorted(result, key=lambda t: (t.canary not in AT_LIMIT, t.policy is not Policy.JUDGE))


# --- the tables -------------------------------------------------------------------------


Results = dict[tuple[str, str, str], list[RunResult]]  # (scenario, canary, policy) -> runs


def share(runs: Sequence[RunResult] | None, outcome: str) -> float | None:
    if not runs:
        return None
    return sum(r.outcome == outcome for r in runs) / len(runs)


def stepped_up(runs: Sequence[RunResult] | None) -> float | None:
    if not runs:
        return None
    return sum(r.max_weight > 1.0 for r in runs) / len(runs)


def median_rollback(runs: Sequence[RunResult] | None) -> float | None:
    times = [r.seconds for r in runs or () if r.outcome == "rolled_back"]
    return statistics.median(times) if times else None


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def wilson(events: float, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The two-sided 95% Wilson interval of a share."""
    if trials <= 0:
        return 0.0, 1.0
    p = events / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = (
        z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    )
    return max(0.0, centre - half), min(1.0, centre + half)


def interval(value: float, trials: int) -> str:
    """A share with its 95% interval, e.g. "2.0% [0.6–7.0]"."""
    low, high = wilson(value * trials, trials)
    return f"{pct(value)} [{100 * low:.1f}–{100 * high:.1f}]"


def rollback_cell(results: Results, scenario: str, canary: str, policy: str) -> str:
    runs = results.get((scenario, canary, policy))
    mine = median_rollback(runs)
    text = duration(mine)
    oracle = median_rollback(results.get((scenario, canary, Policy.ORACLE.value)))
    if mine is not None and oracle and policy != Policy.ORACLE.value:
        text += f" ({mine / oracle:.2f}×)"
    return text


def scenario_table(results: Results, scenario: str, policies: Sequence[Policy]) -> list[str]:
    lines = [
        "| policy | false rollbacks (healthy) | wrong step-ups: errors / latency at limit "
        "| rolled back: 3% errors / 1.4× latency | median time to rollback: errors / latency "
        "(× oracle) | healthy: promoted (median time) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for policy in policies:
        name = policy.value

        def cell(canary: str) -> list[RunResult] | None:
            return results.get((scenario, canary, name))  # noqa: B023

        healthy = cell("healthy")
        promoted = [r.seconds for r in healthy or () if r.outcome == "promoted"]
        lines.append(
            f"| {name} "
            f"| {pct(share(healthy, 'rolled_back'))} "
            f"| {pct(stepped_up(cell('errors at limit')))} / "
            f"{pct(stepped_up(cell('latency at limit')))} "
            f"| {pct(share(cell('errors'), 'rolled_back'))} / "
            f"{pct(share(cell('latency'), 'rolled_back'))} "
            f"| {rollback_cell(results, scenario, 'errors', name)} / "
            f"{rollback_cell(results, scenario, 'latency', name)} "
            f"| {pct(share(healthy, 'promoted'))} "
            f"({duration(statistics.median(promoted) if promoted else None)}) |"
        )
    return lines


def targets_table(results: Results, scenarios: Sequence[str]) -> list[str]:
    """This judge's numbers against the issue's targets, one row per scenario."""
    judge = Policy.JUDGE.value
    oracle = Policy.ORACLE.value
    lines = [
        "| scenario | false rollbacks ≤ 5% | wrong step-ups ≤ 5% (errors / latency) "
        "| detected ≥ 99% (errors / latency) | time ≤ 1.5× oracle (errors / latency) |",
        "|---|---|---|---|---|",
    ]

    def mark(ok: bool) -> str:
        return "✓" if ok else "✗"

    for scenario in scenarios:
        false = share(results.get((scenario, "healthy", judge)), "rolled_back") or 0.0
        wrong = [stepped_up(results.get((scenario, c, judge))) or 0.0 for c in AT_LIMIT]
        found = [
            share(results.get((scenario, c, judge)), "rolled_back") or 0.0
            for c in ("errors", "latency")
        ]
        ratios = []
        for canary in ("errors", "latency"):
            mine = median_rollback(results.get((scenario, canary, judge)))
            best = median_rollback(results.get((scenario, canary, oracle)))
            ratios.append(mine / best if mine is not None and best else None)
        n = len(results.get((scenario, "healthy", judge)) or ())
        lines.append(
            f"| {scenario} | {interval(false, n)} {mark(false <= 0.05)} "
            f"| {' / '.join(interval(w, n) for w in wrong)} {mark(max(wrong) <= 0.05)} "
            f"| {' / '.join(interval(f, n) for f in found)} {mark(min(found) >= 0.99)} "
            f"| {' / '.join('-' if r is None else f'{r:.2f}×' for r in ratios)} "
            f"{mark(all(r is not None and r <= 1.5 for r in ratios))} |"
        )
    return lines


def block(results: Results, settings: argparse.Namespace, elapsed_s: float) -> str:
    command = (
        f"python tests/bench/judge_report.py --runs {settings.runs} --hours {settings.hours:g} "
        f"--limit-hours {settings.limit_hours:g} --rps {settings.rps:g} --seed {settings.seed} "
        f"--jobs {settings.jobs}"
    )
    lines = [
        BEGIN,
        "",
        f"Run on {datetime.now(UTC):%Y-%m-%d} with `make judge-report` ({command}): "
        f"{settings.runs} runs per canary, scenario and policy, {settings.rps:g} req/s, "
        f"runs of up to {settings.hours:g} h ({settings.limit_hours:g} h at a limit), "
        f"seed {settings.seed}; {elapsed_s / 60:.0f} minutes on {settings.jobs} processes "
        f"({platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs). The route is `config/rollout.yaml`.",
        "",
        "Against the targets (this judge), each share with its 95% interval (Wilson) over "
        f"its {settings.runs} runs:",
        "",
        *targets_table(results, settings.scenarios),
        "",
    ]
    for scenario in settings.scenarios:
        lines += [f"**{scenario}**", "", *scenario_table(results, scenario, settings.policies), ""]
    lines.append(END)
    return "\n".join(lines)


def write(doc: Path, text: str) -> None:
    page = doc.read_text()
    start, end = page.index(BEGIN), page.index(END) + len(END)
    doc.write_text(page[:start] + text + page[end:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--hours", type=float, default=4.0)
    parser.add_argument("--limit-hours", type=float, default=2.0)
    parser.add_argument("--rps", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument(
        "--policies",
        nargs="+",
        type=Policy,
        default=list(Policy),
        choices=list(Policy),
        help="the policies to simulate (default: all)",
    )
    parser.add_argument("--write", action="store_true", help=f"write the tables into {DOC}")
    parser.add_argument("--json", metavar="FILE", help="also save every run's result here")
    settings = parser.parse_args(argv)
    todo = tasks(settings)
    started = time.monotonic()
    results: Results = {}
    with multiprocessing.Pool(settings.jobs) as pool:
        for done, (task, runs) in enumerate(
            pool.imap_unordered(_worker, [(t, settings) for t in todo]), start=1
        ):
            key = (task.scenario, task.canary, task.policy.value)
            results.setdefault(key, []).extend(runs)
            if done % 20 == 0 or done == len(todo):
                minutes = (time.monotonic() - started) / 60
                print(f"{done}/{len(todo)} tasks, {minutes:.1f} min", file=sys.stderr, flush=True)
    elapsed = time.monotonic() - started
    if settings.json:
        Path(settings.json).write_text(
            json.dumps(
                {"|".join(key): [r.to_mapping() for r in runs] for key, runs in results.items()}
            )
        )
    text = block(results, settings, elapsed)
    if settings.write:
        write(DOC, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
