"""The admin port (SPEC §7): health, readiness, metrics and status, apart from the public port.

Rules:
1. It listens on `admin.listen` (loopback by default) and nowhere else; the public
   port never answers these paths (it forwards every path to a backend).
2. `GET` endpoints are open; `POST` endpoints need `Authorization: Bearer <token>`
   when `admin.token_env` is set (compared in constant time). An operator's action
   that does not apply is 409, with `retry_after_s` and `Retry-After` when it will
   (a resume within its cooldown; `?force=true` overrides).
3. The status page reads the same window stats as the rollout judge: those of every
   process that shares the state store (workers and replicas), merged.
4. A client that sends bad HTTP or leaves mid-exchange is one log line, not a
   traceback; a bug in a handler still logs its traceback at ERROR
   (`proxy.http.serverlog`).
5. `GET /api/routes/{name}/report` compares every signal of the route's variants with
   confidence intervals (`proxy.judge.report`): over its rollout since it began (the
   judge's totals and the slices since; to its end for one complete, rolled back or
   promoted), or for a route without one, over the last `?window=` seconds of stats
   (the stats' retention by default).
6. `GET /` is the status page for people: static files of the package
   (`proxy/server/static`: no build step, nothing from another site, a strict
   Content-Security-Policy). It polls `/api/status` and sends an operator's actions
   with the token typed into it, kept in that browser tab only (sessionStorage).
"""

from __future__ import annotations

import datetime
import hmac
import importlib.resources
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from aiohttp import web

from proxy import __version__
from proxy.config.model import AutoRollout, Route, Variant
from proxy.http.serverlog import NetworkErrorLog, one_line_network_errors
from proxy.judge.report import compare, variant_summary
from proxy.judge.stats import VariantStats
from proxy.rollout.machine import (
    MAX_DECISIONS,
    OperatorAction,
    RouteState,
    Status,
    TransitionRefused,
    ab_left_s,
    cooldown_left_s,
)
from proxy.rollout.planner import SHADOW_VARIANTS, pause_left_s
from proxy.routing.assignment import (
    RoutePlan,
    RouteTable,
    bucket_of,
    canary_from_weight,
    choose_variant,
)
from proxy.server.controller import Controller, StoreUnavailable, UnknownRoute
from proxy.server.reload import ReloadOutcome, ReloadResult
from proxy.telemetry.metrics import Gauges, Snapshot
from proxy.telemetry.prometheus import render
from proxy.telemetry.recorder import Recorder

__all__ = ["STATUS_WINDOW_S", "AdminView", "build_admin_app"]

log = logging.getLogger("proxy.server.admin")
Handler = Callable[[web.Request], Awaitable[web.Response]]

STATUS_WINDOW_S: Final = 60.0
_MAX_WINDOW_S: Final = 3600.0
_DECISIONS_SHOWN: Final = 5  # per route in /api/status, unless ?decisions= asks for more
_STATIC: Final = {  # the status page's files (proxy/server/static), by the path served
    "/": ("index.html", "text/html"),
    "/static/status.js": ("status.js", "text/javascript"),
    "/static/status.css": ("status.css", "text/css"),
}
# The page runs its own script and styles only, and talks to this port only.
_PAGE_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class AdminView(Protocol):
    """What the admin port reads of the running proxy."""

    @property
    def table(self) -> RouteTable: ...

    @property
    def telemetry(self) -> Recorder: ...

    @property
    def loaded_at(self) -> float: ...

    @property
    def last_reload_error(self) -> str | None: ...

    @property
    def last_reload_at(self) -> float | None: ...

    @property
    def admin_token(self) -> str | None: ...

    async def reload(self, reason: str) -> ReloadResult: ...

    @property
    def controller(self) -> Controller: ...

    @property
    def ready(self) -> bool: ...

    def now(self) -> float: ...

    def gauges(self) -> Gauges: ...

    def metrics_snapshot(self) -> Snapshot: ...

    def telemetry_status(self) -> dict[str, object]: ...


def build_admin_app(view: AdminView) -> web.Application:
    app = web.Application(
        middlewares=[one_line_network_errors(log)],
        handler_args={"logger": NetworkErrorLog(log)},  # aiohttp's server logs through it
    )
    routes = web.RouteTableDef()
    static = importlib.resources.files("proxy.server") / "static"
    for path, (name, content_type) in _STATIC.items():
        routes.get(path)(_static_file(static.joinpath(name).read_bytes(), content_type))

    @routes.get("/healthz")
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    @routes.get("/readyz")
    async def readyz(_: web.Request) -> web.Response:
        ready = view.ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    @routes.get("/metrics")
    async def metrics(request: web.Request) -> web.Response:
        config = view.table.config
        if not config.telemetry.prometheus:
            raise web.HTTPNotFound(text="telemetry.prometheus is off in the config\n")
        body, content_type = render(view.metrics_snapshot, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    @routes.get("/api/status")
    async def status(request: web.Request) -> web.Response:
        window_s = _window(request.query.get("window"))
        decisions = _decisions(request.query.get("decisions"))
        document = await status_document(view, window_s, decisions)
        return web.json_response(document, dumps=_dumps)

    @routes.post("/api/reload")
    async def reload(request: web.Request) -> web.Response:
        _authorize(request, view.admin_token)
        result = await view.reload("POST /api/reload")
        document = {
            "outcome": result.outcome.value,
            "version": result.version,
            "problems": list(result.problems),
        }
        status = 400 if result.outcome is ReloadOutcome.FAILED else 200
        return web.json_response(document, status=status, dumps=_dumps)

    @routes.get("/api/routes/{name}/report")
    async def report(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        plan = view.table.by_name.get(name)
        if plan is None:
            return _error(404, f"no route named {name!r}")
        default = view.telemetry.stats.retention_s
        window_s = _window(request.query.get("window"), default)
        document = await report_document(view, plan.route, plan.weight, window_s)
        if isinstance(document, str):
            return _error(409, document)
        return web.json_response(document, dumps=_dumps)

    @routes.post("/api/routes/{name}/{action}")
    async def operate(request: web.Request) -> web.Response:
        _authorize(request, view.admin_token)
        name, action_text = request.match_info["name"], request.match_info["action"]
        try:
            action = OperatorAction(action_text)
        except ValueError:
            actions = ", ".join(a.value for a in OperatorAction)
            return _error(404, f"no action {action_text!r} (actions: {actions})")
        force = _flag(request.query.get("force"), "force")
        try:
            state = await view.controller.operate(name, action, force=force)
        except UnknownRoute:
            return _error(404, f"no route named {name!r}")
        except TransitionRefused as exc:
            if exc.retry_after_s is None:
                return _error(409, str(exc))
            # A cooldown: it passes by itself, or the operator forces it.
            return web.json_response(
                {
                    "error": f"{exc} (POST {request.path}?force=true)",
                    "retry_after_s": round(exc.retry_after_s, 1),
                },
                status=409,
                headers={"Retry-After": str(math.ceil(exc.retry_after_s))},
                dumps=_dumps,
            )
        except StoreUnavailable as exc:
            return _error(503, f"the state store is unavailable: {exc}")
        return web.json_response(_route_state(state), dumps=_dumps)

    @routes.get("/api/assign")
    async def assign_key(request: web.Request) -> web.Response:
        name, key = request.query.get("route"), request.query.get("key")
        if name is None or key is None:
            return _error(400, "give route= and key=")
        plan = view.table.by_name.get(name)
        if plan is None:
            return _error(404, f"no route named {name!r}")
        bucket = bucket_of(plan.route.sticky.salt, key)
        return web.json_response(
            {
                "route": name,
                "weight": plan.weight,
                "bucket": bucket,
                "variant": choose_variant(bucket, plan.threshold).value,
                "canary_from_weight": canary_from_weight(bucket),
            },
            dumps=_dumps,
        )

    app.add_routes(routes)
    return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, dumps=_dumps)


def _route_state(state: RouteState, decisions: int = _DECISIONS_SHOWN) -> dict[str, object]:
    """A route's rollout state for the API: its last decisions, newest first."""
    return {
        "status": state.status.value,
        "weight": state.weight,
        "step": state.step,
        "passes": state.passes,
        "failures": state.failures,
        "step_started_at": _iso(state.step_started_at) if state.step_started_at else None,
        "last_verdict": (
            {**state.verdict, "at": _iso(float(state.verdict["at"]))}  # type: ignore[arg-type]
            if state.verdict is not None
            else None
        ),
        "decisions": [
            {**decision.to_mapping(), "at": _iso(decision.at)}
            for decision in reversed(state.decisions[-decisions:])
        ],
    }


async def status_document(
    view: AdminView, window_s: float = STATUS_WINDOW_S, decisions: int = _DECISIONS_SHOWN
) -> dict[str, object]:
    """The `/api/status` document, with each route's last `decisions`."""
    table = view.table
    config = table.config
    telemetry = view.telemetry
    now = view.now()
    routes = []
    controller = view.controller
    first, last = telemetry.stats.slice_of(now - window_s), telemetry.stats.slice_of(now)
    for plan in table.plans:
        route = plan.route
        state = controller.states.get(route.name)
        auto = route.rollout.auto
        routes.append(
            {
                "name": route.name,
                "stable": route.stable,
                "canary": route.canary,
                "weight": plan.weight,
                "rollout": {
                    **(_route_state(state, decisions) if state is not None else {}),
                    "steps": list(auto.steps) if auto is not None else None,
                    "step_pauses_s": list(auto.step_pauses_s) if auto is not None else None,
                    "interval_s": auto.interval_s if auto is not None else None,
                    "next_judgement_in_s": controller.next_judgement_in(route.name),
                    **_waits(state, auto, now),
                },
                "variants": {
                    variant: (await controller.window(route.name, variant, first, last)).summary()
                    for variant in (Variant.STABLE, Variant.CANARY)
                },
                "shadow": await _shadow(view, plan, first, last),
            }
        )
    return {
        "proxy_version": __version__,
        "ready": view.ready,
        "config": {
            "version": config.version,
            "fleet_version": config.fleet_version,
            "source": config.source,
            "loaded_at": _iso(view.loaded_at),
            "last_reload_at": _iso(view.last_reload_at) if view.last_reload_at else None,
            "last_reload_error": view.last_reload_error,
        },
        "telemetry": view.telemetry_status(),
        "controller": {
            "leader": controller.leader,
            "state_store": config.state.store.value,
            "store_up": controller.store_up,
            "store_down_since": (
                _iso(controller.store_down_since) if controller.store_down_since else None
            ),
            "store_error": controller.store_error,
            "held_because": controller.held_because,
        },
        "processes": [
            {**process, "self": process.get("source") == controller.source}
            for process in controller.processes
        ],
        "window_s": window_s,
        "routes": routes,
    }


async def report_document(
    view: AdminView, route: Route, weight: float, window_s: float
) -> dict[str, object] | str:
    """The report of a route (rule 5), or why there is none."""
    controller, stats, now = view.controller, view.telemetry.stats, view.now()
    state = controller.states.get(route.name)
    auto = route.rollout.auto
    canary, stable = VariantStats(), VariantStats()
    until = now
    if auto is not None and state is not None and state.evidence.next_slice > 0:
        evidence = state.evidence
        since, source = state.started_at, "rollout"
        first = evidence.next_slice
        canary.merge(evidence.rollout_canary)
        stable.merge(evidence.rollout_stable)
        decision = state.last_decision
        if state.status in _ENDED and decision is not None:
            # What the judge gathered up to its end: nothing after it is the test's.
            until, first = decision.at, stats.slice_of(now) + 1
    else:
        since, source = now - window_s, "window"
        first = stats.slice_of(since)
    last = stats.slice_of(now)
    if first <= last:
        canary.merge(await controller.window(route.name, Variant.CANARY, first, last))
        stable.merge(await controller.window(route.name, Variant.STABLE, first, last))
    if source == "window":
        span = f"in the last {window_s:g}s"
    elif until < now:
        span = "over the rollout, to its end"
    else:
        span = "since the rollout began"
    if canary.requests == 0 == stable.requests:
        return f"route {route.name!r} has no requests {span}: nothing to compare yet"
    confidence = auto.confidence if auto is not None else 0.95
    percent = f"{100 * confidence:g}%"
    status = state.status.value if state is not None else "manual"
    mode = "manual" if auto is None else "ab" if auto.is_ab else "canary"
    return {
        "route": route.name,
        "mode": mode,
        "status": status,
        "weight": weight,
        "source": source,
        "since": _iso(since),
        "until": _iso(until),
        "seconds": round(until - since, 1),
        "confidence": confidence,
        "headline": (
            f"route {route.name}: canary {route.canary} at {weight:g}% ({status}) against "
            f"stable {route.stable}, {span} ({_iso(since)} to {_iso(until)})"
        ),
        "intervals": (
            f"[low, high]: two-sided {percent} intervals, fixed-sample: valid for one look "
            "(the end of a test), not for a figure watched until it looks good; users "
            "counted by cluster where the stats allow"
        ),
        "variants": {"stable": variant_summary(stable), "canary": variant_summary(canary)},
        "signals": [signal.to_mapping() for signal in compare(canary, stable, confidence)],
    }


# A rollout that ended: its report stops where it did.
_ENDED: Final = (Status.COMPLETE, Status.ROLLED_BACK, Status.PROMOTED)


async def _shadow(
    view: AdminView, plan: RoutePlan, first: int, last: int
) -> dict[str, object] | None:
    """A route's shadow phase: its settings, whether it sends now, what this process's
    shadow requests did, and the pairs of the window (every process's); None without."""
    auto = plan.route.rollout.auto
    if auto is None or auto.shadow is None:
        return None
    shadow, name = auto.shadow, plan.name
    counts = view.telemetry.metrics.shadow
    controller = view.controller
    return {
        "active": plan.shadow > 0,
        "share": shadow.share,
        "duration_s": shadow.duration_s,
        "max_concurrency": shadow.max_concurrency,
        "queue": shadow.queue,
        "requests": {
            outcome: counts.get((name, outcome), 0)
            for outcome in ("dispatched", "dropped", "completed", "failed")
        },
        "pairs": {
            side: (await controller.window(name, variant, first, last)).summary()
            for side, variant in zip(("canary", "stable"), SHADOW_VARIANTS, strict=True)
        },
    }


def _waits(state: RouteState | None, auto: AutoRollout | None, now: float) -> dict[str, object]:
    """What the rollout waits for: a step's pause, a rollback's cooldown (seconds left)."""
    if state is None or auto is None:
        return {"pause_left_s": None, "cooldown_left_s": None, "ab_left_s": None}
    pause, cooldown = pause_left_s(state, auto, now), cooldown_left_s(state, auto, now)
    test = ab_left_s(state, auto, now)
    return {
        "pause_left_s": round(pause, 1) if pause > 0 else None,
        "cooldown_left_s": round(cooldown, 1) if cooldown > 0 else None,
        "ab_left_s": round(test, 1) if test > 0 else None,
    }


def _authorize(request: web.Request, token: str | None) -> None:
    """A mutating call needs `Authorization: Bearer <token>` when the admin has a token."""
    if token is None:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise web.HTTPUnauthorized(
            text='{"error": "this call needs Authorization: Bearer <admin token>"}\n',
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="canary-proxy admin"'},
        )


def _flag(text: str | None, name: str) -> bool:
    if text is None or text.lower() in ("", "false", "0", "no"):
        return False
    if text.lower() in ("true", "1", "yes"):
        return True
    raise web.HTTPBadRequest(text=f"{name} must be true or false, got {text!r}\n")


def _static_file(body: bytes, content_type: str) -> Handler:
    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, headers=_PAGE_HEADERS)

    return serve


def _decisions(text: str | None) -> int:
    if text is None:
        return _DECISIONS_SHOWN
    if not text.isdigit() or not 1 <= int(text) <= MAX_DECISIONS:
        raise web.HTTPBadRequest(text=f"decisions must be a count from 1 to {MAX_DECISIONS}\n")
    return int(text)


def _window(text: str | None, default: float = STATUS_WINDOW_S) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise web.HTTPBadRequest(
            text=f"window must be a number of seconds, got {text!r}\n"
        ) from None
    if not 0 < value <= _MAX_WINDOW_S:
        raise web.HTTPBadRequest(text=f"window must be in (0, {_MAX_WINDOW_S:g}] seconds\n")
    return value


def _iso(epoch_s: float) -> str:
    return datetime.datetime.fromtimestamp(epoch_s, datetime.UTC).isoformat(timespec="seconds")


def _dumps(document: object) -> str:
    return json.dumps(document, indent=2)
