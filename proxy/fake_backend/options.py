"""The fake backend's settings: one frozen record, and the command-line flags that fill it.

A `FakeBackendOptions` is validated on construction, so a bad value never reaches the
server: every problem is a `ValueError` with a one-line message naming the flag
(`--error-rate must be between 0 and 1, got 1.5`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from proxy.fake_backend.apis import FakeApi

__all__ = ["LOG_LEVELS", "FakeBackendOptions", "add_arguments", "options_from_args"]

LOG_LEVELS = ("debug", "info", "warning", "error")
_MAX_PORT = 65535


@dataclass(frozen=True, slots=True)
class FakeBackendOptions:
    """How the fake backend listens and behaves when a request carries no `x-fake-*` hook.

    Attributes:
        host, port: where it listens; port 0 picks a free port (`FakeBackend.start` returns it).
        error_rate: probability in [0, 1] that a generation request is answered 500.
        latency_s: wait before any response head.
        ttft_s: wait before the first token.
        tokens_per_s: token rate; 0 sends tokens back to back.
        model: the model name every answer reports (and the `x-fake-model` header).
        seed: seed of the error draws; None draws from fresh entropy.
        default_tokens: tokens generated when a request gives no `max_tokens`.
        log_level: the level of the log on stderr of `canary-proxy fake-backend`
            (`run_forever`); a server started in-process logs where its host says.
        api: the API it speaks (`proxy.fake_backend`'s endpoints by API).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    error_rate: float = 0.0
    latency_s: float = 0.0
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0
    model: str = "fake-model"
    seed: int | None = None
    default_tokens: int = 16
    log_level: str = "info"
    api: FakeApi = FakeApi.OPENAI

    def __post_init__(self) -> None:
        problem = _first_problem(self)
        if problem is not None:
            raise ValueError(problem)


def _first_problem(options: FakeBackendOptions) -> str | None:
    """The first invalid setting of `options`, as a one-line message, or None."""
    if not 0 <= options.port <= _MAX_PORT:
        return f"--port must be between 0 and {_MAX_PORT}, got {options.port}"
    if not options.host:
        return "--host must not be empty"
    if not (math.isfinite(options.error_rate) and 0.0 <= options.error_rate <= 1.0):
        return f"--error-rate must be between 0 and 1, got {options.error_rate}"
    for flag, value in (
        ("--latency", options.latency_s),
        ("--ttft", options.ttft_s),
        ("--tokens-per-s", options.tokens_per_s),
    ):
        if not (math.isfinite(value) and value >= 0.0):
            return f"{flag} must be a finite number >= 0, got {value}"
    if not options.model:
        return "--model must not be empty"
    if options.default_tokens < 0:
        return f"--tokens must be >= 0, got {options.default_tokens}"
    if options.log_level not in LOG_LEVELS:
        return f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {options.log_level}"
    return None


_DEFAULTS = FakeBackendOptions()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `canary-proxy fake-backend` flags to `parser`; `options_from_args` reads them."""
    parser.add_argument("--host", default=_DEFAULTS.host, help="address to bind (%(default)s)")
    parser.add_argument(
        "--port", type=int, default=_DEFAULTS.port, help="port to bind; 0 picks one (%(default)s)"
    )
    parser.add_argument(
        "--error-rate",
        dest="error_rate",
        type=float,
        default=_DEFAULTS.error_rate,
        help="probability 0-1 that a completion request is answered 500 (%(default)s)",
    )
    parser.add_argument(
        "--latency",
        dest="latency_s",
        type=float,
        default=_DEFAULTS.latency_s,
        metavar="S",
        help="seconds before every response head (%(default)s)",
    )
    parser.add_argument(
        "--ttft",
        dest="ttft_s",
        type=float,
        default=_DEFAULTS.ttft_s,
        metavar="S",
        help="seconds before the first token (%(default)s)",
    )
    parser.add_argument(
        "--tokens-per-s",
        dest="tokens_per_s",
        type=float,
        default=_DEFAULTS.tokens_per_s,
        metavar="N",
        help="token rate; 0 sends tokens back to back (%(default)s)",
    )
    parser.add_argument(
        "--tokens",
        dest="default_tokens",
        type=int,
        default=_DEFAULTS.default_tokens,
        metavar="N",
        help="tokens an answer has when the request sets no token limit (%(default)s)",
    )
    parser.add_argument(
        "--model", default=_DEFAULTS.model, help="model name to report (%(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=_DEFAULTS.seed, help="seed of the injected errors"
    )
    parser.add_argument(
        "--api",
        default=_DEFAULTS.api.value,
        choices=[api.value for api in FakeApi],
        help="the API to speak (default %(default)s): its endpoints, bodies and streams",
    )
    parser.add_argument(
        "--log-level",
        default=_DEFAULTS.log_level,
        choices=LOG_LEVELS,
        help="log level (default %(default)s): a client that leaves before its answer is "
        "whole, or sends bad HTTP, is one line at info",
    )


def options_from_args(ns: argparse.Namespace) -> FakeBackendOptions:
    """The options named by parsed `add_arguments` flags.

    Raises:
        ValueError: a flag's value is out of range (a one-line message naming the flag).
    """
    return FakeBackendOptions(
        host=ns.host,
        port=ns.port,
        error_rate=ns.error_rate,
        latency_s=ns.latency_s,
        ttft_s=ns.ttft_s,
        tokens_per_s=ns.tokens_per_s,
        default_tokens=ns.default_tokens,
        model=ns.model,
        seed=ns.seed,
        log_level=ns.log_level,
        api=FakeApi(ns.api),
    )
