"""The baseline: a plain aiohttp reverse proxy, written as a typical developer would.

It owns nothing but the comparison point for `run.py`: one catch-all route, one
`ClientSession` made at start-up, the request body read whole, the response streamed
chunk by chunk, hop-by-hop headers dropped both ways. No routing, no canary, no limits.

    python baseline_proxy.py --port 8081 --upstream http://127.0.0.1:8000 [--uvloop]
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer"}
    | {"trailers", "transfer-encoding", "upgrade"}
)
# Host and Content-Length are recomputed by aiohttp's client for the upstream request.
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length"}

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def without(headers: CIMultiDictProxy[str], names: frozenset[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in names)


async def proxy(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    async with request.app[SESSION].request(
        request.method,
        request.app[UPSTREAM] + request.path_qs,
        headers=without(request.headers, NOT_FORWARDED),
        data=body,
        allow_redirects=False,
    ) as upstream:
        out = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=without(upstream.headers, HOP_BY_HOP),
        )
        await out.prepare(request)
        async for chunk in upstream.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


async def client_session(app: web.Application) -> AsyncIterator[None]:
    # limit=0: aiohttp's default pool of 100 connections would queue streams 101..500.
    # total=None: the default 5-minute cap would cut long generations.
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
    )
    yield
    await app[SESSION].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://host:port")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(client_session)
    app.router.add_route("*", "/{tail:.*}", proxy)
    loop = None
    if args.uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, loop=loop, print=None)


if __name__ == "__main__":
    main()
