"""canary-proxy: a reverse proxy for LLM endpoints that does progressive delivery.

The folders, from the bottom layer up; a folder imports only from the layers below it
(and `proxy.errors`), never from above (`tests/test_layering.py` holds that line, and
docs/architecture.md draws the paths through them):

- **config**: YAML parsed and validated whole into a frozen `Config`.
- **apis**: what the LLM APIs say on the wire (usage, finish, a stream's end).
- **routing**: a request's route, user key and variant (stable or canary). Pure.
- **judge**: the canary's numbers against stable's, and a verdict with reasons. Pure.
- **rollout**: a route's rollout state and how events change it; the simulator. Pure.
- **telemetry**: stats, metrics and spans of what requests and decisions did.
- **store**: where rollout state and the fleet's stats live (SQLite, Redis).
- **http**: the request path: the public port, the backends, streaming relay.
- **server**: processes, ports, the admin API, reloads, the controller's I/O.
- **cli**, **demo**: the `canary-proxy` command.
- **fake_backend**: an OpenAI-compatible model server for demos, tests and benchmarks;
  it uses nothing else of the package.

Data flows one way: config → routing decision → forwarding → telemetry → judge and
rollout decision → a new state served.
"""

__version__ = "0.1.0"
