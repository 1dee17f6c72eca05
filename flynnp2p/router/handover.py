"""What the agent and its router workers say to each other (pure).

Theory of operation
-------------------
The agent and each worker share one socketpair carrying msgpack maps, each with
a ``"t"`` (its type). The agent sends ``init`` (the listeners, the proxy
config, the sticky key, then the table and certificates), and after that a
``table`` or ``certs`` message on every change, and ``status`` requests; the
worker answers ``ready`` (the ports it bound) or ``error`` (the listener it
could not bind, with its errno), sends ``status`` replies and the router's
``log`` lines for apps' logs. Values cross as plain lists and maps, so a
message is a snapshot, never a reference to the agent's objects.

The certificates travel as PEM, the default one included: a worker never holds
the cluster CA's key (`HandedCertStore` is a `CertStore` whose default
certificate is the PEM it was handed).

`merge_status` is the one place the workers' `Router.status` answers become
the node's: counters and in-flight counts summed, passive-health marks and
latency windows pooled, per-worker liveness listed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from flynnp2p.coord.ca import Pem
from flynnp2p.router.proxy import ProxyConfig
from flynnp2p.router.stats import WINDOW, AppStats, Stats
from flynnp2p.router.table import Backend, RouteSpec, RouteTable
from flynnp2p.router.tls import CertStore, StoredCert

Message = dict[str, Any]


# -- the table -------------------------------------------------------------------------


def encode_table(table: RouteTable) -> Message:
    return {
        "routes": [asdict(r) for r in table.routes],
        "backends": [
            [a, t, [[b.job_id, b.address] for b in bs]] for (a, t), bs in table.backends.items()
        ],
    }


def decode_table(m: Mapping[str, Any]) -> RouteTable:
    return RouteTable.build(
        [RouteSpec(**r) for r in m["routes"]],
        {(a, t): [Backend(j, addr) for j, addr in bs] for a, t, bs in m["backends"]},
    )


def encode_config(cfg: ProxyConfig) -> Message:
    return asdict(cfg)


def decode_config(m: Mapping[str, Any]) -> ProxyConfig:
    return ProxyConfig(**m)


# -- certificates ----------------------------------------------------------------------


def encode_certs(store: CertStore) -> Message:
    return {
        "domain": store.domain,
        "default": [store.default_pem.cert, store.default_pem.key],
        "certs": [[c.id, list(c.domains), c.cert_pem, c.key_pem] for c, _ in store.by_id.values()],
    }


def stored_certs(m: Mapping[str, Any]) -> list[StoredCert]:
    return [StoredCert(cid, tuple(domains), cert, key) for cid, domains, cert, key in m["certs"]]


class _Handed:
    """Stands in for the cluster CA in a worker: 'issues' the PEM it was handed."""

    def __init__(self, pem: Pem) -> None:
        self.pem = pem

    def issue(self, common_name: str, **_: Any) -> Pem:
        return self.pem


def handed_cert_store(m: Mapping[str, Any]) -> CertStore:
    issuer = _Handed(Pem(*m["default"]))
    store = CertStore(issuer, m["domain"])  # type: ignore[arg-type]
    store.update(stored_certs(m))
    return store


def update_handed(store: CertStore, m: Mapping[str, Any]) -> None:
    """A new snapshot of the certificates: the default PEM first, so a domain change
    re-'issues' the one handed over."""
    issuer = store.ca
    assert isinstance(issuer, _Handed)
    pem = Pem(*m["default"])
    if pem != issuer.pem:
        issuer.pem = pem
        store.domain = ""  # so that `update` loads the new default
    store.update(stored_certs(m), domain=m["domain"])


# -- status ----------------------------------------------------------------------------


def raw_stats(stats: Stats) -> Message:
    return {
        name: [s.by_class, s.router_errors, s.retries, s.codes, list(s.latencies)]
        for name, s in stats.apps.items()
    }


@dataclass
class WorkerView:
    """The supervisor's view of one worker slot, for `merge_status`."""

    slot: int
    pid: int | None
    restarts: int
    status: Mapping[str, Any] | None  # its last answer; None: it did not answer


def merge_status(
    views: Sequence[WorkerView],
    table: RouteTable,
    tls: Mapping[str, object],
    now_listeners: Mapping[str, Any],
) -> dict[str, object]:
    """The node's router status from its workers' (see the module doc)."""
    answers = [v.status for v in views if v.status is not None]
    stats = Stats()
    in_flight: dict[str, int] = {}
    skipped: dict[str, float] = {}
    pool: dict[str, int] = {}
    log: dict[str, int] = {}
    tcp: set[int] = set()
    tcp_errors: dict[str, str] = {}
    failures = connections = 0
    for st in answers:
        connections += st["connections"]
        failures += st["tls"]["handshake_failures"]
        tcp.update(st["listeners"]["tcp"])
        tcp_errors.update({str(k): v for k, v in st["tcp_errors"].items()})
        _add(in_flight, st["balancer"]["in_flight"])
        for a, left in st["balancer"]["skipped"].items():
            skipped[a] = max(left, skipped.get(a, 0.0))
        _add(pool, st["pool"])
        _add(log, st["log"])
        for name, (by_class, errors, retries, codes, latencies) in st["raw_stats"].items():
            s = stats.apps.get(name) or stats.apps.setdefault(
                name, AppStats(latencies=deque(maxlen=WINDOW * len(answers)))
            )  # every worker's window
            _merge_app(s, by_class, errors, retries, codes, latencies)
    return {
        "listeners": {**now_listeners, "tcp": sorted(tcp)},
        "tls": {**tls, "handshake_failures": failures},
        "tcp_errors": dict(sorted(tcp_errors.items())),
        "connections": connections,
        "routes": len(table.routes),
        "backends": {
            f"{a}/{t}": [b.address for b in bs] for (a, t), bs in sorted(table.backends.items())
        },
        "balancer": {
            "in_flight": dict(sorted(in_flight.items())),
            "skipped": dict(sorted(skipped.items())),
        },
        "pool": dict(sorted(pool.items())),
        "apps": stats.as_dict(),
        "log": log,
        "workers": [
            {"slot": v.slot, "pid": v.pid, "restarts": v.restarts, "answered": v.status is not None}
            for v in views
        ],
    }


def _add(into: dict[str, int], counts: Mapping[str, int]) -> None:
    for k, n in counts.items():
        into[k] = into.get(k, 0) + n


def _merge_app(
    s: AppStats, by_class: Iterable[int], errors: int, retries: int, codes: Mapping[str, int],
    latencies: Iterable[float],
) -> None:  # fmt: skip
    s.by_class = [a + b for a, b in zip(s.by_class, by_class, strict=True)]
    s.router_errors += errors
    s.retries += retries
    _add(s.codes, codes)
    s.latencies.extend(latencies)
