"""Where a request goes: its route, its user key, and stable or canary. Pure; no I/O.

- **keys** (`proxy.routing.keys`): reading a user key out of a request's parts.
- **assignment** (`proxy.routing.assignment`): route matching, cohorts, the sticky
  formula (SPEC §4), and the table of routes built once per config.
- **schedule** (`proxy.routing.schedule`): when a canary may move or serve.
"""
