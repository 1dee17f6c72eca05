"""The router: HTTP and TCP routes to app jobs anywhere in the cluster.

Pure core: `table` (the immutable `RouteTable` and its lookups), `build`
(`table_from_state`: a `RouteTable` from a state snapshot), `http1` (head
rewriting), `balance` (power of two choices, passive health), `stats`,
`logline` (the router's lines in apps' logs: codes and quoting).
I/O: `sock` (non-blocking sockets on trio's readiness waits), `proxy` (one
HTTP/1.1 client connection), `service` (`Router.run`: listeners, TCP routes,
timeouts), `applog` (`RouterLog`: router lines queued off the request path and
written to the node's `LogHub`).

Wiring, for the agent::

    routes = Watched(table_from_state(state.value))
    router = Router(routes, address=cfg.addr, http_port=cfg.http_port, log=RouterLog(loghub))
    port = await nursery.start(router.run)
    ...  # on every state change: routes.set(table_from_state(new_state))
"""
