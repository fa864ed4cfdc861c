"""canary-proxy: a reverse proxy for LLM endpoints that does progressive delivery.

The primitives, in the order a request meets them:

- **config** (`proxy.config`): YAML parsed and validated whole into a frozen `Config`.
- **routing** (`proxy.routing`, `proxy.keys`): pure functions from a request's parts and
  a `RouteTable` snapshot to a route, a variant (stable or canary) and a bucket.
- **forwarding** (`proxy.forwarding`, `proxy.upstreams`, `proxy.headers`): the only
  code that talks to backends; streams chunk by chunk, never buffers a stream.
- **app** (`proxy.app`): the aiohttp server that ties them together, and its lifecycle.
- **cli** (`proxy.cli`): the `canary-proxy` command.
- **fake backend** (`proxy.fake_backend`): an OpenAI-compatible model server for demos,
  tests and benchmarks.

Data flows one way: config → routing decision → forwarding. A module in the middle
never imports one at the edge (`tests/test_layering.py` holds that line).
"""

__version__ = "0.1.0"
