"""Host ports for jobs: one TCP port per job, from a fixed range, free when handed out.

Theory of operation
-------------------
A ``PortAllocator`` remembers which port it gave to which job (``held``). A port is
handed to a new job only if no other job of this allocator holds it *and* a TCP
socket can bind it right now on every one of ``bind_addrs``, which catches ports
used by processes this allocator does not know about (another agent on the same
machine, a job from before a crash, a system service). The test socket is bound
without ``SO_REUSEADDR``, so a port with connections lingering in TIME_WAIT counts
as busy (a job that binds without that option would fail there too).

The test bind is closed at once, so another process can still take the port before
the job binds it; the job then fails at boot like any job that crashes there. The
allocator only makes that unlikely: ports are tried in a random order (a random
start and a random stride coprime with the range size, which visits every port of
the range exactly once without building a list of it), so agents sharing a machine
rarely race for the same one. ``ClusterError`` is raised only after every port in the
range was tried.

``reserve`` records the port of a job re-adopted after an agent restart without the
bind test (its own process is bound to it). Asking again for a job that holds a port
returns that port; ``release`` forgets the job.

The allocator is plain synchronous state, owned by one task (the host's job
supervisor); binds are fast local syscalls, so it is called from trio directly. An
address in ``bind_addrs`` that cannot be bound at all (not on this machine) is a
``ConfigError``, not a busy port.
"""

from __future__ import annotations

import errno
import math
import random
import socket
from collections.abc import Iterator, Sequence

from flynnp2p.errors import ClusterError, ConfigError

DEFAULT_LO = 20000
DEFAULT_HI = 29999
_BUSY = frozenset({errno.EADDRINUSE, errno.EACCES})  # EACCES: a privileged port


class PortAllocator:
    """Hands out TCP ports in ``[lo, hi]`` to jobs, one port per job id."""

    def __init__(
        self,
        lo: int = DEFAULT_LO,
        hi: int = DEFAULT_HI,
        bind_addrs: Sequence[str] = ("0.0.0.0",),
        *,
        rng: random.Random | None = None,
    ) -> None:
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"port range must satisfy 1 <= lo <= hi <= 65535, got {lo}-{hi}")
        if not bind_addrs:
            raise ValueError("bind_addrs must name at least one address")
        self.lo = lo
        self.hi = hi
        self.bind_addrs = tuple(bind_addrs)
        self._rng = rng if rng is not None else random.Random()
        self._by_job: dict[str, int] = {}
        self._jobs_by_port: dict[int, str] = {}

    def allocate(self, job_id: str) -> int:
        """The port of ``job_id``: the one it holds, else a free one now held for it."""
        if job_id in self._by_job:
            return self._by_job[job_id]
        for port in _random_order(self.lo, self.hi, self._rng):
            if port not in self._jobs_by_port and self._bindable(port):
                self._hold(job_id, port)
                return port
        raise ClusterError(
            f"no free TCP port in {self.lo}-{self.hi} on {', '.join(self.bind_addrs)} "
            f"for job {job_id}: {len(self._jobs_by_port)} held by jobs on this host, "
            "the rest in use by other processes"
        )

    def reserve(self, job_id: str, port: int) -> None:
        """Record that ``job_id`` (re-adopted, already running) holds ``port``.

        The port may lie outside ``[lo, hi]`` (the range may have changed since the
        job started). Raises ``ClusterError`` if another job holds it.
        """
        other = self._jobs_by_port.get(port)
        if other is not None and other != job_id:
            raise ClusterError(f"port {port} is already held by job {other}, not {job_id}")
        self.release(job_id)
        self._hold(job_id, port)

    def release(self, job_id: str) -> None:
        """Forget ``job_id``'s port, if it holds one."""
        port = self._by_job.pop(job_id, None)
        if port is not None:
            del self._jobs_by_port[port]

    def held(self) -> dict[str, int]:
        """A copy of job id → port for every job holding a port."""
        return dict(self._by_job)

    def _hold(self, job_id: str, port: int) -> None:
        self._by_job[job_id] = port
        self._jobs_by_port[port] = job_id

    def _bindable(self, port: int) -> bool:
        for addr in self.bind_addrs:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.bind((addr, port))
            except OSError as exc:
                if exc.errno in _BUSY:
                    return False
                # Not a busy port but an address this machine cannot bind at all.
                raise ConfigError(f"cannot bind TCP port {port} on {addr}: {exc.strerror}") from exc
        return True


def _random_order(lo: int, hi: int, rng: random.Random) -> Iterator[int]:
    """Every port in ``[lo, hi]`` exactly once, from a random start with a random stride."""
    n = hi - lo + 1
    start = rng.randrange(n)
    step = 1
    if n > 2:
        step = rng.randrange(1, n)
        while math.gcd(step, n) != 1:
            step = rng.randrange(1, n)
    for i in range(n):
        yield lo + (start + i * step) % n
