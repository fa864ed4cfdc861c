"""One worker of `canary-proxy run --workers N`, started by `proxy.server.supervisor`.

    python -m proxy.server.worker CONFIG --index I --listen-fd F --admin-fd G [--no-watch]

It serves the public socket and the private admin socket its supervisor bound and
handed down, exactly as `run` serves alone, and meets the other workers in the state
store. It stops (draining, as on SIGTERM) when its supervisor is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Final

from proxy.telemetry.logs import configure

__all__ = ["main"]

_PARENT_CHECK_S: Final = 1.0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m proxy.server.worker")
    parser.add_argument("config")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--admin-fd", type=int, required=True)
    parser.add_argument("--no-watch", action="store_true")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    from proxy.config import load_config
    from proxy.server.app import serve

    config = load_config(args.config)
    sockets = (socket.socket(fileno=args.listen_fd), socket.socket(fileno=args.admin_fd))
    parent = os.getppid()

    async def orphaned() -> None:
        # A supervisor killed outright cannot stop its workers: they notice and drain.
        while os.getppid() == parent:  # noqa: ASYNC110  (no event tells of a parent's death)
            await asyncio.sleep(_PARENT_CHECK_S)
        logging.getLogger("proxy.server.worker").warning("the supervisor is gone: stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    watchdog = asyncio.get_running_loop().create_task(orphaned())
    try:
        await serve(config, watch=not args.no_watch, worker=args.index, sockets=sockets)
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog


def main(argv: Sequence[str] | None = None) -> int:
    import uvloop

    args = _parse(argv)
    configure(args.log_level, worker=args.index)  # the config's log_format once it is read
    try:
        uvloop.run(_serve(args))
    except KeyboardInterrupt:
        pass
    except (RuntimeError, OSError) as exc:  # the supervisor reports it and stops
        logging.getLogger("proxy.server.worker").error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
