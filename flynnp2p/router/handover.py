"""What the agent and its router workers say to each other (pure).

Theory of operation
-------------------
The agent and each worker share one Unix socketpair carrying msgpack maps,
each with a ``"t"`` (its type). A message may carry file descriptors
(SCM_RIGHTS, at most `MAX_FDS` in one): its ``"fds"`` is how many, and the
receiver takes that many from the descriptors received so far, in order.

The agent holds every listening socket (HTTP, HTTPS, one per TCP route) and
hands each worker its own descriptor of the same socket: a worker that dies
takes no listener with it, so connections wait in the kernel's listen queue
until a worker accepts them (the agent's supervisor, `flynnp2p.router.workers`,
says why one shared socket rather than one per worker).

The agent sends ``init`` (the HTTP and HTTPS listeners' descriptors and ports,
the proxy config, the sticky key, the table and certificates), then ``tcp``
messages for the TCP route listeners (``close``: ports to stop accepting on;
``open``: ports whose descriptors it carries, in order; `tcp_handover` computes
them from what that worker was last sent), a ``table`` or ``certs`` message on
every change, and ``status`` requests. The worker answers ``ready``, sends
``status`` replies, a ``counters`` report every few tenths of a second, and the
router's ``log`` lines for apps' logs. Values cross as plain lists and maps, so
a message is a snapshot, never a reference to the agent's objects.

The certificates travel as PEM, the default one included: a worker never holds
the cluster CA's key (`HandedCertStore` is a `CertStore` whose default
certificate is the PEM it was handed).

Counters (requests by status class, router errors, retries, log codes, TLS
handshake failures, log lines written/dropped/lost) outlive the worker that
counted them: the supervisor keeps each worker's latest report (a ``counters``
report or a ``status`` reply), adds a dead worker's to its ``retired`` totals
(`add_counters`), and `merge_status` shows retired + every worker's latest.
What a worker counted after its last report when it was killed is lost (a
fraction of a second); latency windows are not kept: a new worker's start empty.

`merge_status` is the one place the workers' answers become the node's:
counters summed, in-flight counts summed, passive-health marks and latency
windows pooled, per-worker liveness listed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from flynnp2p.coord.ca import Pem
from flynnp2p.router.proxy import ProxyConfig
from flynnp2p.router.stats import WINDOW, AppStats, Stats
from flynnp2p.router.table import Backend, RouteSpec, RouteTable, backends_status
from flynnp2p.router.tls import CertStore, StoredCert

Message = dict[str, Any]


# -- the table -------------------------------------------------------------------------


def encode_table(table: RouteTable) -> Message:
    return {
        "routes": [asdict(r) for r in table.routes],
        "backends": _services(table.backends),
        "lost": sorted(table.lost),
        "skipped": _services(table.skipped),
        "silent": sorted(table.silent),
    }


def _services(by_service: Mapping[tuple[str, str], Sequence[Backend]]) -> list[list[Any]]:
    return [[a, t, [[b.job_id, b.address] for b in bs]] for (a, t), bs in by_service.items()]


def _backends(m: Sequence[Sequence[Any]]) -> dict[tuple[str, str], list[Backend]]:
    return {(a, t): [Backend(j, addr) for j, addr in bs] for a, t, bs in m}


def decode_table(m: Mapping[str, Any]) -> RouteTable:
    return RouteTable.build(
        [RouteSpec(**r) for r in m["routes"]],
        _backends(m["backends"]),
        m.get("lost", ()),
        _backends(m.get("skipped", ())),
        m.get("silent", ()),
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


# -- listeners ------------------------------------------------------------------------

MAX_FDS = 128  # descriptors in one message (the kernel takes at most 253 in one sendmsg)

T = TypeVar("T")


def tcp_handover(sent: Mapping[int, T], now: Mapping[int, T]) -> tuple[list[int], list[int]]:
    """The ``close`` and ``open`` ports that bring a worker from the TCP listeners it
    was sent to `now`'s. Listeners are compared by identity: a port whose route went
    and came back has a new socket, which the worker must take instead of the old."""
    close = sorted(p for p, held in sent.items() if now.get(p) is not held)
    opened = sorted(p for p, held in now.items() if sent.get(p) is not held)
    return close, opened


def batches(ports: Sequence[int], size: int = MAX_FDS) -> list[list[int]]:
    return [list(ports[i : i + size]) for i in range(0, len(ports), size)]


# -- status ----------------------------------------------------------------------------

LOG_COUNTERS = ("written", "dropped", "write_errors")


def counters(stats: Stats, tls_failures: int, log: Mapping[str, int]) -> Message:
    """What a worker has counted since it started (see the module doc)."""
    return {
        "apps": {
            name: [list(s.by_class), s.router_errors, s.retries, dict(s.codes)]
            for name, s in stats.apps.items()
        },
        "tls_failures": tls_failures,
        "log": {k: log.get(k, 0) for k in LOG_COUNTERS},
    }


def no_counters() -> Message:
    return counters(Stats(), 0, {})


def add_counters(a: Mapping[str, Any], b: Mapping[str, Any]) -> Message:
    """`a` + `b` (a new map: neither is changed)."""
    apps: dict[str, list[Any]] = {}
    for side in (a["apps"], b["apps"]):
        for name, (by_class, errors, retries, codes) in side.items():
            have = apps.get(name)
            if have is None:
                apps[name] = [list(by_class), errors, retries, dict(codes)]
            else:
                have[0] = [x + y for x, y in zip(have[0], by_class, strict=True)]
                have[1] += errors
                have[2] += retries
                _add(have[3], codes)
    log = {k: a["log"].get(k, 0) + b["log"].get(k, 0) for k in LOG_COUNTERS}
    return {"apps": apps, "tls_failures": a["tls_failures"] + b["tls_failures"], "log": log}


def latencies(stats: Stats) -> Message:
    return {name: list(s.latencies) for name, s in stats.apps.items()}


@dataclass
class WorkerView:
    """The supervisor's view of one worker slot, for `merge_status`."""

    slot: int
    pid: int | None
    restarts: int
    status: Mapping[str, Any] | None  # its answer now; None: it did not answer
    counters: Mapping[str, Any] | None = None  # its latest report (answer or not)


def merge_status(
    views: Sequence[WorkerView],
    table: RouteTable,
    tls: Mapping[str, object],
    listeners: Mapping[str, Any],
    *,
    tcp_errors: Mapping[int, str] | None = None,
    retired: Mapping[str, Any] | None = None,
) -> dict[str, object]:
    """The node's router status: the agent's own view (`listeners`, `tcp_errors`:
    the agent binds them), its workers' answers, and the counters of every worker
    that ever ran (`retired`: those that died; see the module doc)."""
    answers = [v.status for v in views if v.status is not None]
    total = retired or no_counters()
    for v in views:
        if v.counters is not None:
            total = add_counters(total, v.counters)
    stats = Stats()
    window = WINDOW * max(1, len(answers))  # every worker's window
    for name, (by_class, errors, retries, codes) in total["apps"].items():
        stats.apps[name] = AppStats(by_class=list(by_class), router_errors=errors, retries=retries,
                                    codes=dict(codes), latencies=deque(maxlen=window))  # fmt: skip
    in_flight: dict[str, int] = {}
    skipped: dict[str, float] = {}
    pool: dict[str, int] = {}
    queued = connections = 0
    for st in answers:
        connections += st["connections"]
        queued += st["log"].get("queued", 0)
        _add(in_flight, st["balancer"]["in_flight"])
        for a, left in st["balancer"]["skipped"].items():
            skipped[a] = max(left, skipped.get(a, 0.0))
        _add(pool, st["pool"])
        for name, lat in st["latencies"].items():
            s = stats.apps.get(name) or stats.apps.setdefault(name, AppStats(latencies=deque(maxlen=window)))
            s.latencies.extend(lat)
    return {
        "listeners": dict(listeners),
        "tls": {**tls, "handshake_failures": total["tls_failures"]},
        "tcp_errors": {str(p): e for p, e in sorted((tcp_errors or {}).items())},
        "connections": connections,
            "routes": len(table.routes),
            **backends_status(table),
        "balancer": {
            "in_flight": dict(sorted(in_flight.items())),
            "skipped": dict(sorted(skipped.items())),
        },
        "pool": dict(sorted(pool.items())),
        "apps": stats.as_dict(),
        "log": {**total["log"], "queued": queued},
        "workers": [
            {"slot": v.slot, "pid": v.pid, "restarts": v.restarts, "answered": v.status is not None}
            for v in views
        ],
    }


def _add(into: dict[str, int], counts: Mapping[str, int]) -> None:
    for k, n in counts.items():
        into[k] = into.get(k, 0) + n
