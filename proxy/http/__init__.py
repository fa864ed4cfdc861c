"""The request path: a client's request in, a backend's answer out, streamed.

- **inbound** (`proxy.http.inbound`): the public port's server, hardened for the edge.
- **forwarding** (`proxy.http.forwarding`): one request end to end: route, assign,
  send, fall back, relay, record.
- **body**, **headers** (`proxy.http.*`): the request body read at most once; which
  headers cross the proxy.
- **http1**, **pool**, **upstreams**, **deadlines** (`proxy.http.*`): HTTP/1.1 to the
  backends, kept-alive connection pools, and their timeouts.
- **relay** (`proxy.http.relay`): a backend's answer to the client as it arrives.
- **tunnel** (`proxy.http.tunnel`): an upgraded connection (a WebSocket session) after
  its 101, bytes both ways until either side ends it.
- **serverlog** (`proxy.http.serverlog`): bad HTTP and clients gone mid-exchange on the
  admin ports, one log line each instead of aiohttp's tracebacks.
"""
