"""The `canary-proxy` command (SPEC §2).

Rules:
1. Every command answers `--help`.
2. A bad flag or a bad config is a one-line error per mistake on stderr (a config
   error names its path) and exit status 1; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from proxy import __version__
from proxy.config import ConfigError, EnvSecrets, load_config, summarize
from proxy.config.model import Config, Route
from proxy.config.schema import config_schema
from proxy.config.summary import format_span
from proxy.fake_backend.options import add_arguments as add_fake_backend_arguments
from proxy.rollout.traffic import SCENARIOS
from proxy.routing.assignment import bucket_of, canary_from_weight, canary_threshold, choose_variant

if TYPE_CHECKING:
    from proxy.rollout.simulate import Outcome, TraceRequest

__all__ = ["main"]

log = logging.getLogger("proxy.cli")

EXIT_ERROR = 1


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit status 1."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _fail(message: str) -> NoReturn:
    print(f"canary-proxy: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_ERROR)


def _os_reason(exc: OSError) -> str:
    """The OS's own words for an error, without the address asyncio repeats in its message."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _load(path: str, secrets: EnvSecrets = EnvSecrets.REQUIRE) -> Config:
    """The config at `path`, or every problem on stderr and exit 1."""
    try:
        return load_config(path, secrets=secrets)
    except ConfigError as error:
        for problem in error.problems:
            prefix = "" if problem.startswith(path) else f"{path}: "
            print(f"{prefix}{problem}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None


def _configure_logging(level: str) -> None:
    from proxy.telemetry.logs import configure

    configure(level)  # text until the config's telemetry.log_format is applied


# --- commands ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    import uvloop

    from proxy.server.app import serve

    config = _load(args.config)
    _configure_logging(args.log_level)
    try:
        if args.workers == 1:
            uvloop.run(serve(config, watch=not args.no_watch))
        else:
            from proxy.server.supervisor import supervise

            asyncio.run(
                supervise(config, args.workers, watch=not args.no_watch, log_level=args.log_level)
            )
    except OSError as exc:
        _fail(f"cannot listen on {config.listen}: {_os_reason(exc)}")
    except RuntimeError as exc:  # the workers of --workers N did not start
        _fail(str(exc))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    # A file is checked as a file (in CI, on a laptop): secrets that exist only where it
    # runs are a warning, unless --env asks for the environment to be checked too.
    config = _load(args.config, EnvSecrets.REQUIRE if args.env else EnvSecrets.WARN)
    print(summarize(config))
    for warning in config.warnings:
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
    print(f"{args.config}: ok")
    return 0


def cmd_schema(_: argparse.Namespace) -> int:
    print(json.dumps(config_schema(), indent=2))
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    config = _load(args.config, EnvSecrets.IGNORE)
    route = config.route(args.route)
    if route is None:
        names = ", ".join(r.name for r in config.routes)
        _fail(f"no route named {args.route!r} in {args.config} (routes: {names})")
    weight = route.rollout.weight if args.weight is None else args.weight
    rows = [_assignment_row(route, key, weight) for key in args.keys]
    if args.json:
        print(json.dumps({"route": route.name, "weight": weight, "keys": rows}, indent=2))
    else:
        print(_assignment_table(route, weight, rows))
    return 0


def _assignment_row(route: Route, key: str, weight: float) -> dict[str, object]:
    bucket = bucket_of(route.sticky.salt, key)
    return {
        "key": key,
        "bucket": bucket,
        "variant": choose_variant(bucket, canary_threshold(weight)).value,
        "canary_from_weight": canary_from_weight(bucket),
    }


def _assignment_table(route: Route, weight: float, rows: list[dict[str, object]]) -> str:
    lines = [
        f"route {route.name}: stable {route.stable}, canary {route.canary}, "
        f"weight {weight:g}%, salt {route.sticky.salt!r}",
        "",
    ]
    width = max([len("key"), *(len(str(row["key"])) for row in rows)])
    lines.append(f"{'key':<{width}}  bucket  variant  canary from weight")
    for row in rows:
        key, bucket, variant, lowest = row.values()
        lines.append(f"{key!s:<{width}}  {bucket:>6}  {variant:<7}  {lowest:g}%")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    url = args.admin.rstrip("/") + "/api/status"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            document = json.loads(response.read())
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        _fail(f"cannot read {url}: {reason}")
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(_status_table(document))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from proxy.judge.report import format_report

    name = urllib.parse.quote(args.route, safe="")
    url = f"{args.admin.rstrip('/')}/api/routes/{name}/report"
    if args.window is not None:
        url += f"?window={args.window:g}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            document = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        # The admin API says why in its JSON body ({"error": ...}), or in plain text.
        body = exc.read().decode("utf-8", "replace")
        try:
            message = str(json.loads(body)["error"])
        except (ValueError, KeyError, TypeError):
            message = body.strip() or str(exc.reason)
        _fail(f"{url}: {message}")
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        _fail(f"cannot read {url}: {reason}")
    print(json.dumps(document, indent=2) if args.json else format_report(document))
    return 0


def _fleet_lines(document: dict[str, Any]) -> list[str]:
    """The state store, and the processes sharing it, when there is one."""
    controller = document.get("controller", {})
    if controller.get("store_up") is None:
        return []
    store = controller.get("state_store", "?")
    lines = []
    if controller["store_up"]:
        lines.append(f"state store {store}: up")
    else:
        lines.append(
            f"state store {store}: DOWN since {controller.get('store_down_since')} "
            f"({controller.get('store_error')}); decisions paused"
        )
    processes = document.get("processes", [])
    if processes:
        leaders = [str(p["source"]) for p in processes if p.get("leader")]
        versions = sorted({str(p.get("fleet_version")) for p in processes})
        lines.append(
            f"{len(processes)} process{'es' if len(processes) != 1 else ''} "
            f"(leader {', '.join(leaders) or 'none yet'}; shared config "
            f"{' and '.join(versions)})"
        )
    if controller.get("held_because"):
        lines.append(f"steps held: {controller['held_because']}")
    return lines


def _status_table(document: dict[str, Any]) -> str:
    config = document["config"]
    lines = [f"config {config['version']} (loaded {config['loaded_at']})"]
    if config.get("last_reload_error"):
        lines.append(f"last reload failed: {config['last_reload_error']}")
    lines.extend(_fleet_lines(document))
    rows = [("route", "stable", "canary", "weight", "status", "step", "last verdict and why")]
    for route in document["routes"]:
        rollout = route.get("rollout", {})
        steps = rollout.get("steps")
        in_shadow = rollout.get("status") == "shadow"
        step = f"{rollout.get('step', -1) + 1}/{len(steps)}" if steps else "-"
        if in_shadow:
            step = "shadow"
        verdict = rollout.get("last_verdict")
        waits = [
            f"{what}, {format_span(rollout[key])} left"
            for key, what in (
                ("pause_left_s", "in shadow" if in_shadow else "pausing at this step"),
                ("cooldown_left_s", "no resume (cooldown)"),
                ("ab_left_s", "A/B test running"),
            )
            if rollout.get(key)
        ]
        shadow = route.get("shadow")
        if in_shadow and shadow:
            sent = shadow["requests"]
            waits.append(
                f"shadow requests {sent['completed']} completed, {sent['failed']} failed, "
                f"{sent['dropped']} dropped"
            )
        if verdict:
            waits.append(f"{verdict['verdict']}: {verdict['reason']}")
        why = "; ".join(waits)
        rows.append(
            (
                route["name"],
                route["stable"],
                route["canary"],
                f"{route['weight']:g}%",
                rollout.get("status", "-"),
                step,
                why or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines.append("")
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:6], widths, strict=True)]
        lines.append("  ".join([*cells, row[6]]).rstrip())
    return "\n".join(lines)


def cmd_simulate(args: argparse.Namespace) -> int:
    from proxy.rollout.simulate import (
        Policy,
        Scenario,
        duration,
        render,
        replay,
        route_heading,
        shares,
        simulate,
        summarize,
    )

    config = _load(args.config, EnvSecrets.IGNORE)
    route = config.route(args.route)
    if route is None:
        names = ", ".join(r.name for r in config.routes)
        _fail(f"no route named {args.route!r} in {args.config} (routes: {names})")
    if route.rollout.ab is not None:
        _fail(f"route {args.route!r} is an A/B test (rollout.ab): nothing ramps to simulate")
    if route.rollout.auto is None:
        _fail(f"route {args.route!r} has no rollout.auto to simulate")
    first_step = route.rollout.auto.steps[0]
    if args.trace is not None:
        requests = _read_trace(args.trace)
        results = replay(route, requests, args.runs)
        if args.json:
            print(json.dumps(shares(results), indent=2))
            return 0
        users = len({request.user for request in requests})
        span = max(r.t for r in requests) - min(r.t for r in requests)
        heading = [
            route_heading(route),
            f"trace {args.trace}: {len(requests)} requests from {users} users over "
            f"{duration(span)}",
            f"{args.runs} runs, the salt varied from run to run",
        ]
        print(render(heading, [summarize(Policy.JUDGE, results, first_step)]))
        return 0
    scenario = Scenario(
        name=args.scenario,
        rps=args.rps,
        stable_error_rate=args.stable_error_rate,
        canary_error_rate=args.canary_error_rate,
        canary_latency_ratio=args.canary_latency_ratio,
        canary_ttft_ratio=args.canary_ttft_ratio,
        stream_share=args.stream_share,
        duration_s=args.hours * 3600,
    )
    if args.json:
        print(
            json.dumps(
                shares(simulate(route, scenario, args.runs, args.seed, Policy.JUDGE)), indent=2
            )
        )
        return 0
    policies = list(Policy) if args.baselines else [Policy.JUDGE]
    summaries = [
        summarize(policy, simulate(route, scenario, args.runs, args.seed, policy), first_step)
        for policy in policies
    ]
    heading = [
        route_heading(route),
        f"scenario {scenario.name}: {scenario.rps:g} req/s; errors "
        f"{100 * scenario.stable_error_rate:g}% stable, {100 * scenario.canary_error_rate:g}% "
        f"canary; canary latency x{scenario.canary_latency_ratio:g}, "
        f"TTFT x{scenario.canary_ttft_ratio:g}",
        f"{args.runs} runs of up to {scenario.duration_s / 3600:g} h, seed {args.seed}",
    ]
    print(render(heading, summaries))
    return 0


_OUTCOME_KEYS = ("status", "latency", "ttft", "output_tokens", "cancelled")


def _read_trace(path: str) -> list[TraceRequest]:
    """A trace file's requests, or every mistake (up to ten) on stderr and exit 1."""

    problems: list[str] = []
    requests: list[TraceRequest] = []
    try:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    requests.append(_trace_request(json.loads(line)))
                except (ValueError, TypeError) as exc:
                    problems.append(f"{path}:{number}: {exc}")
                    if len(problems) >= 10:
                        break
    except OSError as exc:
        _fail(f"cannot read the trace {path}: {_os_reason(exc)}")
    if not problems and not requests:
        problems.append(f"{path}: no requests in the trace")
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        raise SystemExit(EXIT_ERROR)
    return requests


def _trace_request(data: object) -> TraceRequest:
    from proxy.rollout.simulate import TraceRequest

    if not isinstance(data, dict):
        raise ValueError("each line must be a JSON object")
    unknown = sorted(set(data) - {"t", "user", "stable", "canary"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (keys: t, user, stable, canary)")
    t, user = data.get("t"), data.get("user")
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise ValueError("t must be a number of seconds")
    if isinstance(user, bool) or not isinstance(user, str | int) or user == "":
        raise ValueError("user must be a non-empty string (the user's key)")
    return TraceRequest(
        float(t),
        str(user),
        _trace_outcome(data.get("stable"), "stable"),
        _trace_outcome(data.get("canary"), "canary"),
    )


def _trace_outcome(data: object, name: str) -> Outcome:
    from proxy.rollout.simulate import Outcome

    if not isinstance(data, dict):
        raise ValueError(
            f"{name} must be an object {{status, latency, ttft, output_tokens, cancelled}}"
        )
    unknown = sorted(set(data) - set(_OUTCOME_KEYS))
    if unknown:
        raise ValueError(f"{name}: unknown key {unknown[0]!r} (keys: {', '.join(_OUTCOME_KEYS)})")
    status, latency = data.get("status"), data.get("latency")
    ttft, tokens, cancelled = (
        data.get("ttft"),
        data.get("output_tokens"),
        data.get("cancelled", False),
    )
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError(f"{name}.status must be an HTTP status (100-599)")
    if not _seconds(latency):
        raise ValueError(f"{name}.latency must be a number of seconds, at least 0")
    if ttft is not None and not _seconds(ttft):
        raise ValueError(f"{name}.ttft must be a number of seconds, at least 0, or null")
    if tokens is not None and (
        isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0
    ):
        raise ValueError(f"{name}.output_tokens must be a whole number, at least 0, or null")
    if not isinstance(cancelled, bool):
        raise ValueError(f"{name}.cancelled must be true or false")
    assert isinstance(latency, int | float)
    assert ttft is None or isinstance(ttft, int | float)
    return Outcome(status, float(latency), None if ttft is None else float(ttft), tokens, cancelled)


def _seconds(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value >= 0
    )


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def cmd_fake_backend(args: argparse.Namespace) -> int:
    import uvloop

    from proxy.fake_backend import options_from_args, run_forever

    try:
        options = options_from_args(args)
    except ValueError as exc:
        _fail(str(exc))
    try:
        uvloop.run(run_forever(options))
    except OSError as exc:
        _fail(f"cannot listen on {options.host}:{options.port}: {_os_reason(exc)}")
    except KeyboardInterrupt:
        pass
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import uvloop

    from proxy.demo import DemoError, default_config_path, run_demo

    path = (Path(args.config) if args.config else default_config_path()).resolve()
    try:
        return uvloop.run(
            run_demo(
                path,
                healthy_canary=args.healthy_canary,
                users=args.users,
                rps=args.rps,
                timeout_s=args.timeout,
            )
        )
    except DemoError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        return 1


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 100 or round(value, 2) != value:
        raise argparse.ArgumentTypeError(
            f"must be a percent from 0 to 100 with at most two decimals, got {text}"
        )
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# --- parser -----------------------------------------------------------------------------

Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="canary-proxy",
        description="A reverse proxy for LLM endpoints that ramps a canary on evidence.",
    )
    parser.add_argument("--version", action="version", version=f"canary-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    run = commands.add_parser("run", help="serve the proxy")
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="the config file")
    run.add_argument(
        "--workers", type=_positive_int, default=1, metavar="N", help="processes sharing the port"
    )
    run.add_argument(
        "--no-watch",
        action="store_true",
        help="do not reload when the config file changes (SIGHUP and POST /api/reload still do)",
    )
    run.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser("check", help="validate a config and print a summary")
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="the config file")
    check.add_argument(
        "--env",
        action="store_true",
        help="also require every environment variable the config names (as run does); "
        "without it an unset one is a warning",
    )
    check.set_defaults(handler=cmd_check)

    schema = commands.add_parser(
        "schema", help="print the JSON Schema of the config file, for editors and CI"
    )
    schema.set_defaults(handler=cmd_schema)

    status = commands.add_parser("status", help="the rollout table of a running proxy")
    status.add_argument(
        "--admin",
        default="http://127.0.0.1:9090",
        metavar="URL",
        help="the proxy's admin address (default http://127.0.0.1:9090)",
    )
    status.add_argument("--json", action="store_true", help="print the status document as JSON")
    status.add_argument("--timeout", type=float, default=5.0, help=argparse.SUPPRESS)
    status.set_defaults(handler=cmd_status)

    report = commands.add_parser(
        "report",
        help="every signal of a route's canary against stable, with confidence intervals",
    )
    report.add_argument("--route", required=True, metavar="NAME", help="the route to report on")
    report.add_argument(
        "--admin",
        default="http://127.0.0.1:9090",
        metavar="URL",
        help="the proxy's admin address (default http://127.0.0.1:9090)",
    )
    report.add_argument(
        "--window",
        type=float,
        metavar="S",
        help="for a route without an automatic rollout or A/B test: the last S seconds "
        "(default: all the stats held, 15 minutes)",
    )
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    report.set_defaults(handler=cmd_report)

    assign = commands.add_parser(
        "assign",
        help="which variant and bucket each user key gets, and from which weight on it is canary",
    )
    assign.add_argument("-c", "--config", required=True, metavar="FILE", help="the config file")
    assign.add_argument("--route", required=True, metavar="NAME", help="the route")
    assign.add_argument(
        "--weight",
        type=_weight,
        metavar="PERCENT",
        help="ask at this weight instead of the current one",
    )
    assign.add_argument("--json", action="store_true", help="print JSON")
    assign.add_argument(
        "keys", nargs="+", metavar="KEY", help="user keys, as the proxy would read them"
    )
    assign.set_defaults(handler=cmd_assign)

    demo = commands.add_parser(
        "demo", help="run two fake model servers and the proxy, drive traffic, show the split"
    )
    demo.add_argument(
        "-c", "--config", metavar="FILE", help="the config (default: the packaged demo config)"
    )
    demo.add_argument(
        "--healthy-canary", action="store_true", help="a canary as good as stable: a promotion"
    )
    demo.add_argument("--users", type=_positive_int, default=1000, metavar="N", help="default 1000")
    demo.add_argument(
        "--rps",
        type=_positive,
        default=150.0,
        metavar="R",
        help="requests per second (default 150)",
    )
    demo.add_argument(
        "--timeout",
        type=_positive,
        default=180.0,
        metavar="S",
        # A healthy canary must earn each of its three steps by an always-valid test:
        # about a minute on a quiet machine, two or more on a busy one.
        help="give up after S seconds (default 180)",
    )
    demo.set_defaults(handler=cmd_demo)

    sim = commands.add_parser(
        "simulate",
        help="replay synthetic traffic or a request trace through the real judge, many rollouts",
    )
    sim.add_argument("-c", "--config", required=True, metavar="FILE", help="the config file")
    sim.add_argument("--route", required=True, metavar="NAME", help="the route to simulate")
    source = sim.add_mutually_exclusive_group()
    source.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="iid",
        metavar="NAME",
        help=f"built-in synthetic traffic: {', '.join(SCENARIOS)} (default iid)",
    )
    source.add_argument(
        "--trace",
        metavar="FILE",
        help="replay a JSON-lines trace instead: one request a line, "
        '{"t", "user", "stable": OUTCOME, "canary": OUTCOME} (see docs/rollouts.md)',
    )
    sim.add_argument(
        "--rps", type=_positive, default=10.0, metavar="R", help="requests per second (default 10)"
    )
    sim.add_argument(
        "--stable-error-rate", type=_share, default=0.01, metavar="P", help="default 0.01"
    )
    sim.add_argument(
        "--canary-error-rate", type=_share, default=0.01, metavar="Q", help="default 0.01"
    )
    sim.add_argument(
        "--canary-latency-ratio",
        type=_positive,
        default=1.0,
        metavar="X",
        help="canary latency over stable's (default 1)",
    )
    sim.add_argument(
        "--canary-ttft-ratio",
        type=_positive,
        default=1.0,
        metavar="X",
        help="canary time to first token over stable's, beyond its latency's (default 1)",
    )
    sim.add_argument(
        "--stream-share",
        type=_share,
        default=0.5,
        metavar="S",
        help="share of requests that stream (default 0.5)",
    )
    sim.add_argument(
        "--hours",
        type=_positive,
        default=4.0,
        metavar="H",
        help="simulated time per run (default 4)",
    )
    sim.add_argument("--runs", type=_positive_int, default=1000, metavar="N", help="default 1000")
    sim.add_argument("--seed", type=int, default=1, metavar="S", help="default 1")
    sim.add_argument(
        "--baselines",
        action="store_true",
        help="also run Flagger's and Kayenta's rules and an oracle SPRT on the same traffic",
    )
    sim.add_argument(
        "--json",
        action="store_true",
        help='print {"runs", "promoted", "rolled_back", "running"} as JSON (the judge\'s)',
    )
    sim.set_defaults(handler=cmd_simulate)

    fake = commands.add_parser(
        "fake-backend", help="an OpenAI-compatible fake model server for demos and tests"
    )
    add_fake_backend_arguments(fake)
    fake.set_defaults(handler=cmd_fake_backend)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Command = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
