"""Webhooks told of every rollout decision: queued, retried, never in anyone's way.

A route's `notify:` lists webhooks; each decision the controller makes for the route
(a step, a pause, a rollback, an operator's action) is POSTed to each of them as JSON,
`generic` (every field of the decision) or `slack` (an incoming webhook's message).

Rules:
1. `notify()` never waits and never raises: it puts the message on its webhook's
   bounded queue (`QUEUE_SIZE`), or, when that is full, drops it, counts it
   (`dropped`) and logs a warning. Neither the request path nor the controller ever
   waits for a receiver.
2. Each webhook has a sender task of its own: its messages go out in order, and a
   slow or dead receiver delays only its own.
3. An attempt fails on a connection error, a timeout (`timeout` per attempt), or a
   status other than 2xx. A 408, 429 or 5xx and every network failure is tried again
   after `backoff`, doubled each time, up to `retries` more times; another 4xx is not
   (the receiver refuses the message itself).
4. A message that is not delivered is dead-lettered: one WARNING line saying where,
   why, after how many attempts, and the JSON body, so that it can be sent by hand.
5. Only the process that made a decision sends it (the controller stores it first):
   one message per decision in a fleet of workers or replicas.
6. On shutdown what is queued gets `DRAIN_S` to go out; what is left is dropped and
   counted.
7. A webhook a reload removes (`keep()`) loses its sender once what it has queued is
   sent: a process that reloads often holds no task for webhooks it no longer has.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Final

import aiohttp

from proxy import __version__
from proxy.config.model import Webhook, WebhookFormat
from proxy.rollout.machine import Decision

__all__ = ["DRAIN_S", "QUEUE_SIZE", "Notifier", "message"]

log = logging.getLogger("proxy.server.notify")

QUEUE_SIZE: Final = 100  # per webhook: decisions come at most every few seconds
DRAIN_S: Final = 2.0
_RETRIED_STATUSES: Final = frozenset({408, 429})

Outcome = Callable[[str, str], None]  # (route, "delivered" | "failed" | "dropped")


# --- the message (pure) ---------------------------------------------------------------


def message(
    route: str, decision: Decision, form: WebhookFormat, config_version: str, source: str
) -> dict[str, object]:
    """The JSON body sent for a decision, in the webhook's format."""
    at = datetime.datetime.fromtimestamp(decision.at, datetime.UTC).isoformat(timespec="seconds")
    if form is WebhookFormat.SLACK:
        return _slack(route, decision, at, config_version)
    return {
        "type": "canary.rollout.decision",
        "route": route,
        "at_iso": at,
        **decision.to_mapping(),
        "text": f"route {route}: {decision.reason}",
        "config_version": config_version,
        "source": source,
        "proxy_version": __version__,
    }


_SLACK_EMOJI: Final = {
    "rollback": ":rotating_light:",
    "promote": ":white_check_mark:",
    "pause": ":double_vertical_bar:",
    "hold": ":double_vertical_bar:",
}


def _slack(route: str, decision: Decision, at: str, config_version: str) -> dict[str, object]:
    emoji = _SLACK_EMOJI.get(decision.action.value, ":arrow_up:")
    title = (
        f"route *{route}*: {decision.action.value} "
        f"({decision.weight_before:g}% → {decision.weight_after:g}%, {decision.status.value})"
    )
    context = f"{at} · by {decision.cause.value} · config {config_version}"
    return {
        "text": f"canary-proxy route {route}: {decision.reason}",
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"{emoji} {title}"}},
            {"type": "section", "text": {"type": "plain_text", "text": decision.reason}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
        ],
    }


# --- sending ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Letter:
    route: str
    body: bytes


class _Channel:
    """One webhook's queue and sender task (rule 2)."""

    def __init__(self, hook: Webhook) -> None:
        self.hook = hook
        self.queue: asyncio.Queue[_Letter] = asyncio.Queue(QUEUE_SIZE)
        self.task: asyncio.Task[None] | None = None
        self.sending = False


class Notifier:
    """The webhooks of every route, for one process. `start()` before `notify()`.

    `outcome(route, result)` is told of each message's end: "delivered", "failed"
    (dead-lettered) or "dropped" (queue full, or left at shutdown).
    """

    def __init__(self, outcome: Outcome | None = None) -> None:
        self._outcome = outcome or (lambda route, result: None)
        self._channels: dict[Webhook, _Channel] = {}
        self._wanted: frozenset[Webhook] | None = None  # None: every webhook (no keep() yet)
        self._session: aiohttp.ClientSession | None = None
        self.counts: dict[str, int] = {"delivered": 0, "failed": 0, "dropped": 0}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(headers={"User-Agent": f"canary-proxy/{__version__}"})

    def notify(
        self,
        route: str,
        hooks: tuple[Webhook, ...],
        decision: Decision,
        config_version: str,
        source: str,
    ) -> None:
        """Queue the decision for each webhook; never waits (rule 1)."""
        if self._session is None:
            return
        for hook in hooks:
            body = message(route, decision, hook.format, config_version, source)
            letter = _Letter(route, json.dumps(body).encode())
            channel = self._channel(hook)
            try:
                channel.queue.put_nowait(letter)
            except asyncio.QueueFull:
                self._count(route, "dropped")
                log.warning(
                    "route %s: webhook %s is %d messages behind: a decision was dropped (%s)",
                    route,
                    hook.shown,
                    QUEUE_SIZE,
                    decision.reason,
                )

    def keep(self, hooks: Collection[Webhook]) -> None:
        """The webhooks of the config in force: the others' senders end (rule 7)."""
        self._wanted = frozenset(hooks)
        for hook, channel in list(self._channels.items()):
            if hook not in self._wanted and not channel.sending and channel.queue.empty():
                self._retire(channel)

    @property
    def senders(self) -> int:
        """How many webhooks have a sender task now."""
        return len(self._channels)

    def _retire(self, channel: _Channel) -> None:
        if self._channels.get(channel.hook) is channel:
            del self._channels[channel.hook]
        if channel.task is not None and channel.task is not asyncio.current_task():
            channel.task.cancel()

    async def stop(self, drain_s: float = DRAIN_S) -> None:
        """Give what is queued `drain_s` to go out, then drop the rest (rule 6)."""
        channels = list(self._channels.values())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_s):
                for channel in channels:
                    await channel.queue.join()
        for channel in channels:
            if channel.task is not None:
                channel.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await channel.task
            while not channel.queue.empty():
                self._count(channel.queue.get_nowait().route, "dropped")
        self._channels.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _channel(self, hook: Webhook) -> _Channel:
        channel = self._channels.get(hook)
        if channel is None:
            channel = self._channels[hook] = _Channel(hook)
            channel.task = asyncio.get_running_loop().create_task(
                self._send_all(channel), name=f"webhook {hook.shown}"
            )
        return channel

    def _count(self, route: str, result: str) -> None:
        self.counts[result] += 1
        self._outcome(route, result)

    async def _send_all(self, channel: _Channel) -> None:
        while True:
            letter = await channel.queue.get()
            channel.sending = True
            try:
                await self._send(channel.hook, letter)
            finally:
                channel.sending = False
                channel.queue.task_done()
            wanted = self._wanted
            if wanted is not None and channel.hook not in wanted and channel.queue.empty():
                self._retire(channel)  # removed by a reload while it was sending
                return

    async def _send(self, hook: Webhook, letter: _Letter) -> None:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=hook.timeout_s)
        attempts, error = 0, ""
        for attempt in range(hook.retries + 1):
            if attempt:
                await asyncio.sleep(hook.backoff_s * 2 ** (attempt - 1))
            attempts += 1
            try:
                async with self._session.post(
                    hook.url,
                    data=letter.body,
                    headers={"Content-Type": "application/json"},
                    timeout=timeout,
                    allow_redirects=False,
                ) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = f"{exc.__class__.__name__}: {exc}".rstrip(": ")
                continue
            if 200 <= status < 300:
                self._count(letter.route, "delivered")
                return
            error = f"HTTP {status}"
            if status < 500 and status not in _RETRIED_STATUSES:
                break  # refused for what it is: sending it again changes nothing
        self._count(letter.route, "failed")
        log.warning(
            "route %s: webhook %s not delivered after %d attempt%s (%s); dead letter: %s",
            letter.route,
            hook.shown,
            attempts,
            "" if attempts == 1 else "s",
            error,
            letter.body.decode(),
        )
