"""Shadow requests: stable's requests sent again to a canary in its shadow phase, in the
background, and recorded in pairs for the judge. Which requests is
`proxy.routing.shadow`'s choice; this module does the sending.

Rules:
1. A shadow request never delays or fails the user's: the request path picks it
   (`pick`: a few comparisons, and the body it reads, as one without a Content-Length
   is read anyway, bounded by `limits.max_body`; a body that is not JSON is not
   shadowed, and the user's request goes on as if shadow were off), and offers it
   once the user's answer is relayed (`offer`: O(1), never waits).
2. Each route has a lane: at most `shadow.max_concurrency` requests in flight, up to
   `shadow.queue` more waiting, and what comes past that is dropped and counted.
3. A canary that answers 429 or 503 is saturated: its lane sends nothing for its
   Retry-After (in seconds), else for 1 s doubling up to 30 s while it goes on; what
   comes meanwhile waits in the queue, or is dropped when it is full.
4. A shadow request is the client's request (method, target, headers as the proxy
   forwards them, body with the canary's model rewrite) sent to the canary's backend
   with `x-canary-shadow: 1`; its answer is read to its end and thrown away. It has
   the backend's timeouts: first byte, then idle between chunks.
5. A pair is recorded (`Recorder.record_pair`) when both ended: stable's answer to the
   user (an answer the user left before is never offered) and the canary's, with its
   status, latency, time to first token (streams) and output tokens; a canary
   request that failed is a canary error of the pair. Outcomes count in
   `canary.shadow.requests`: dispatched, dropped, completed, failed. When both
   answers ended well, the pair is compared as the shadow's checks ask
   (`proxy.judge.pairs`, on the texts of their first `CAPTURE_BYTES`: stable's is kept
   as it is relayed, for shadowed requests only).
6. `close()` cancels what is in flight and drops what waits: shadow requests never
   hold a stopping proxy.
7. When the user's request is traced, its shadow request is a span of the same trace
   (`canary.shadow: true`), a child of the user's server span.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

from aiohttp import web

from proxy.apis.answer import read_facts
from proxy.apis.streams import StreamEnd, api_of, stream_end
from proxy.apis.text import answer_text
from proxy.config.model import BackendApi, Network, Shadow, Variant
from proxy.errors import BadRequestBody
from proxy.http.body import RequestBody
from proxy.http.headers import request_head
from proxy.http.http1 import BackendCut, BackendProtocolError
from proxy.http.pool import ConnectFailed, ConnectTimeout, PoolTimeout
from proxy.http.upstreams import Upstreams
from proxy.judge.pairs import agree, lengths_match
from proxy.routing.assignment import Assignment, RoutePlan
from proxy.routing.keys import is_trusted
from proxy.routing.shadow import chosen, eligible
from proxy.telemetry.recorder import Attempt, Exchange, PairSide, Recorder

__all__ = ["CAPTURE_BYTES", "ShadowDispatcher", "ShadowRequest"]

# Of each answer of a pair, this much is kept to compare them (rule 5).
CAPTURE_BYTES: Final = 16 * 1024

_STREAM_TYPES: Final = (b"text/event-stream", b"application/x-ndjson")
_SATURATED: Final = ("429", "503")  # as error types
_BACKOFF_FIRST_S: Final = 1.0
_BACKOFF_MAX_S: Final = 30.0


class ShadowRequest:
    """A request picked for shadowing: what it takes to send it again, to the canary."""

    __slots__ = (
        "answer",
        "body",
        "deterministic",
        "method",
        "peer",
        "peer_trusted",
        "plan",
        "raw_headers",
        "scheme",
        "target",
        "user",
    )

    def __init__(
        self,
        plan: RoutePlan,
        method: str,
        target: str,
        raw_headers: tuple[tuple[bytes, bytes], ...],
        body: bytes,
        peer: str | None,
        peer_trusted: bool,
        scheme: str,
        user: int | None,
        deterministic: bool,
    ) -> None:
        self.scheme = scheme
        self.deterministic = deterministic  # temperature 0: answers agree only when equal
        self.answer = b""  # stable's answer, its first CAPTURE_BYTES (rule 5)
        self.plan = plan
        self.method = method
        self.target = target
        self.raw_headers = raw_headers
        self.body = body
        self.peer = peer
        self.peer_trusted = peer_trusted
        self.user = user  # the sticky bucket, or None without a key

    def keep(self, chunk: bytes) -> None:
        """Keep stable's answer as it is relayed, up to CAPTURE_BYTES."""
        room = CAPTURE_BYTES - len(self.answer)
        if room > 0:
            self.answer += chunk[:room]


class _Job:
    __slots__ = ("exchange", "request", "request_id", "stable", "upstreams")

    def __init__(
        self,
        request: ShadowRequest,
        stable: PairSide,
        upstreams: Upstreams,
        request_id: str,
        exchange: Exchange | None,
    ) -> None:
        self.request = request
        self.stable = stable
        self.upstreams = upstreams
        self.request_id = request_id
        self.exchange = exchange  # the user's, when it is traced: the shadow's span joins it


class _Answer(NamedTuple):
    """What the canary did with a shadow request."""

    side: PairSide
    body: bytes  # its first CAPTURE_BYTES
    status: int | None
    started: float  # loop time
    retry_after: float | None  # seconds, when a 429 or 503 said


class _Lane:
    """One route's shadow requests (rule 2) and its backoff (rule 3)."""

    __slots__ = ("backoff_s", "in_flight", "queue", "resume_at", "timer")

    def __init__(self) -> None:
        self.in_flight = 0
        self.queue: deque[_Job] = deque()
        self.resume_at = 0.0  # loop time before which nothing is sent (rule 3)
        self.backoff_s = 0.0
        self.timer: asyncio.TimerHandle | None = None


class ShadowDispatcher:
    """The shadow requests of one process."""

    def __init__(self, telemetry: Recorder) -> None:
        self._telemetry = telemetry
        self._lanes: dict[str, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._closed = False

    # --- on the request path ----------------------------------------------------------

    async def pick(
        self,
        request: web.BaseRequest,
        body: RequestBody,
        plan: RoutePlan,
        assignment: Assignment,
        trusted_proxies: Sequence[Network],
    ) -> ShadowRequest | None:
        """The request to send again to the canary, or None when it is not one (rule 1)."""
        if not chosen(assignment, plan.shadow, random.random):
            return None
        shadow = _settings(plan)
        try:
            parsed = await body.json()
        except BadRequestBody:
            return None  # the user's request goes on; only the shadow is skipped
        if not eligible(request.method, request.path, request.headers, parsed, shadow.never_tools):
            return None
        target = request.raw_path
        if not target.startswith("/"):
            target = request.rel_url.raw_path_qs
        return ShadowRequest(
            plan,
            request.method,
            target,
            tuple(request.raw_headers),
            await body.read(),
            request.remote,
            is_trusted(request.remote, trusted_proxies),
            request.scheme,
            assignment.bucket,
            _deterministic(parsed),
        )

    def offer(
        self,
        shadow: ShadowRequest,
        exchange: Exchange,
        attempt: Attempt,
        ended: float,
        upstreams: Upstreams,
        request_id: str,
    ) -> None:
        """Send `shadow` when its lane has room, queue it, or drop it (rules 1-3)."""
        if attempt.cancelled or self._closed:
            return
        stable = PairSide(
            ended - attempt.started, exchange.ttft_s, attempt.error_type, exchange.output_tokens
        )
        route = shadow.plan.name
        lane = self._lanes.get(route)
        if lane is None:
            lane = self._lanes[route] = _Lane()
        settings = _settings(shadow.plan)
        traced = exchange if exchange.trace is not None else None
        job = _Job(shadow, stable, upstreams, request_id, traced)
        if lane.in_flight < settings.max_concurrency and self._loop.time() >= lane.resume_at:
            self._start(route, lane, job)
        elif len(lane.queue) < settings.queue:
            lane.queue.append(job)
            if lane.timer is None and lane.in_flight == 0:
                self._next(route, lane)  # resting with nothing in flight: wake up after it
        else:
            self._telemetry.record_shadow(route, "dropped")

    # --- in the background ------------------------------------------------------------

    def _start(self, route: str, lane: _Lane, job: _Job) -> None:
        lane.in_flight += 1
        self._telemetry.record_shadow(route, "dispatched")
        task = self._loop.create_task(self._run(route, lane, job), name=f"shadow {route}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, route: str, lane: _Lane, job: _Job) -> None:
        telemetry = self._telemetry
        try:
            answer = await _send(job)
            canary = answer.side
            telemetry.record_shadow(route, "failed" if canary.error_type else "completed")
            agreed, matched = _compare(job, canary, answer.body)
            telemetry.record_pair(route, job.stable, canary, job.request.user, agreed, matched)
            if job.exchange is not None:
                backend = job.request.plan.route.backend_of(Variant.CANARY)
                telemetry.shadow_span(
                    job.exchange, backend, canary, answer.status, answer.started, self._loop.time()
                )
            self._saturated(lane, canary.error_type, answer.retry_after)
        finally:
            lane.in_flight -= 1
            self._next(route, lane)

    def _saturated(self, lane: _Lane, error_type: str | None, retry_after: float | None) -> None:
        """Rule 3: back off while the canary says it is saturated; reset once it is not."""
        if error_type not in _SATURATED:
            lane.backoff_s = 0.0
            return
        lane.backoff_s = min(_BACKOFF_MAX_S, max(_BACKOFF_FIRST_S, 2 * lane.backoff_s))
        wait_s = retry_after if retry_after is not None else lane.backoff_s
        lane.resume_at = max(lane.resume_at, self._loop.time() + wait_s)

    def _next(self, route: str, lane: _Lane) -> None:
        """Start what waits in the lane, as far as its room and its backoff allow."""
        if self._closed or not lane.queue:
            return
        now = self._loop.time()
        if now < lane.resume_at:
            if lane.timer is None:
                lane.timer = self._loop.call_at(lane.resume_at, self._resume, route, lane)
            return
        job = lane.queue[0]
        limit = _settings(job.request.plan).max_concurrency
        while lane.queue and lane.in_flight < limit:
            self._start(route, lane, lane.queue.popleft())

    def _resume(self, route: str, lane: _Lane) -> None:
        lane.timer = None
        self._next(route, lane)

    async def close(self) -> None:
        """Rule 6: cancel what is in flight, drop what waits."""
        self._closed = True
        for lane in self._lanes.values():
            lane.queue.clear()
            if lane.timer is not None:
                lane.timer.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _deterministic(body: Mapping[str, Any]) -> bool:
    """A request whose answer should not vary: temperature 0 (Ollama: in its options)."""
    options = body.get("options")
    temperature = body.get("temperature")
    if temperature is None and isinstance(options, Mapping):
        temperature = options.get("temperature")
    return temperature == 0 and not isinstance(temperature, bool)


def _compare(job: _Job, canary: PairSide, answer: bytes) -> tuple[bool | None, bool | None]:
    """Whether the pair's answers agree, and whether their lengths match, as far as the
    shadow's checks ask and both answers ended well (None: not compared)."""
    stable, shadow = job.stable, job.request
    if stable.error_type is not None or canary.error_type is not None:
        return None, None
    checks = _settings(shadow.plan).checks
    agreed = matched = None
    if checks.agreement is not None:
        api = api_of(shadow.target.split("?", 1)[0])
        mine, theirs = answer_text(shadow.answer, api), answer_text(answer, api)
        if mine is not None and theirs is not None:
            agreed = agree(mine, theirs, shadow.deterministic, checks.agreement.similarity)
    if checks.output_length is not None:
        matched = lengths_match(
            stable.output_tokens, canary.output_tokens, checks.output_length.max_ratio
        )
    return agreed, matched


def _settings(plan: RoutePlan) -> Shadow:
    auto = plan.route.rollout.auto
    # A plan shadows only when its route has an automatic rollout with a shadow phase.
    assert auto is not None
    assert auto.shadow is not None
    return auto.shadow


async def _send(job: _Job) -> _Answer:
    """Rule 4: one shadow request, read to its end."""
    shadow = job.request
    route = shadow.plan.route
    pool = job.upstreams[route.backend_of(Variant.CANARY)]
    backend = pool.backend
    body = _canary_body(shadow.body, route.model_rewrite.get(Variant.CANARY))
    head = request_head(
        shadow.method,
        (backend.base_path + shadow.target).encode("utf-8", "surrogateescape"),
        shadow.raw_headers,
        host=pool.host_header,
        peer=shadow.peer,
        peer_trusted=shadow.peer_trusted,
        scheme=shadow.scheme,
        api_key=backend.api_key,
        x_api_key=backend.api is BackendApi.ANTHROPIC,
        request_id=job.request_id,
        content_length=len(body),
        shadow=True,
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    api = api_of(shadow.target.split("?", 1)[0])
    ttft_s: float | None = None
    retry_after: float | None = None
    status: int | None = None
    try:
        connection = await pool.acquire()
    except (ConnectFailed, PoolTimeout) as exc:
        kind = "timeout" if isinstance(exc, ConnectTimeout | PoolTimeout) else "connect_error"
        return _Answer(PairSide(loop.time() - started, None, kind, None), b"", None, started, None)
    try:
        async with asyncio.timeout(backend.timeouts.first_byte_s):
            connection.send(head, body)
            response = await connection.head()
            status = response.status
            first = await connection.read()
        if str(response.status) in _SATURATED:
            retry_after = _retry_after(response.headers)
        stream = response.content_type is not None and response.content_type.startswith(
            _STREAM_TYPES
        )
        if stream:
            ttft_s = loop.time() - started
        earlier, before, last = b"", b"", first
        answer = first[:CAPTURE_BYTES]
        chunk = first
        while chunk:
            async with asyncio.timeout(backend.timeouts.idle_s):
                chunk = await connection.read()
            if chunk:
                earlier, before, last = before, last, chunk
                if len(answer) < CAPTURE_BYTES:
                    answer += chunk[: CAPTURE_BYTES - len(answer)]
        tail = earlier + before + last
    except TimeoutError:
        pool.discard(connection)
        side = PairSide(loop.time() - started, ttft_s, "timeout", None)
        return _Answer(side, b"", status, started, None)
    except (BackendCut, BackendProtocolError, ConnectionError):
        pool.discard(connection)
        side = PairSide(loop.time() - started, ttft_s, "stream_cut", None)
        return _Answer(side, b"", status, started, None)
    except BaseException:
        pool.discard(connection)
        raise
    pool.release(connection)
    latency_s = loop.time() - started
    error_type = str(status) if status >= 500 or status == 429 else None
    if error_type is None and stream:
        end = stream_end(api, tail)
        if end is not StreamEnd.COMPLETE:
            error_type = "stream_error" if end is StreamEnd.FAILED else "stream_cut"
    facts = read_facts(tail, api, first) if tail else None
    tokens = facts.output_tokens if facts is not None else None
    side = PairSide(latency_s, ttft_s, error_type, tokens)
    return _Answer(side, answer, status, started, retry_after)


def _canary_body(body: bytes, model: str | None) -> bytes:
    """The body as the canary gets it: with its model rewrite, when the route has one."""
    if model is None:
        return body
    parsed: Mapping[str, Any] = json.loads(body) if body else {}
    if not isinstance(parsed, dict) or not parsed:
        return body
    return json.dumps({**parsed, "model": model}, separators=(",", ":")).encode()


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    for name, value in headers:
        if name.lower() == b"retry-after":
            try:
                seconds = float(value)
            except ValueError:
                return None
            return min(max(seconds, 0.0), _BACKOFF_MAX_S)
    return None
