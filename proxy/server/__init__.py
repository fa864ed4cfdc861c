"""The running proxy: processes, ports, reloads and the rollout controller's I/O.

- **app** (`proxy.server.app`): one proxy process: public and admin servers, lifecycle.
- **admin** (`proxy.server.admin`): the admin port (SPEC §7).
- **reload** (`proxy.server.reload`): noticing a changed config file.
- **controller** (`proxy.server.controller`): the rollout controller: judge, decide,
  store, serve.
- **supervisor**, **worker** (`proxy.server.*`): `run --workers N`.
"""
