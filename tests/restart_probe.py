"""A request loop that tells a refused connection from a request lost in flight,
for the router-worker restart tests and ``scripts/bench/router_restart.py``.

Each request is a new TCP connection (``Connection: close``), so every request
meets the listener: a connection the kernel refuses (nothing listens, or a
listen queue nobody holds) is ``refused``; one that was accepted and then got
no complete 200 (reset, closed early: in flight on a worker that was killed)
is ``failed``; a 200 is ``ok``, anything else ``other``. Each outcome is kept
with its start and end times (``time.monotonic``), so a caller can tell what
happened after a given moment.
"""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass, field

import trio

OUTCOMES = ("ok", "refused", "failed", "other")


@dataclass
class Tally:
    results: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, outcome)

    def count(self, outcome: str, since: float = 0.0) -> int:
        return sum(1 for start, _, o in self.results if o == outcome and start >= since)

    def counts(self, since: float = 0.0) -> dict[str, int]:
        return {o: self.count(o, since) for o in OUTCOMES}

    def first_ok_after(self, t: float) -> float | None:
        """Seconds from `t` to the first 200 of a request started at or after `t`."""
        ends = [end for start, end, o in self.results if o == "ok" and start >= t]
        return min(ends) - t if ends else None


async def request_once(addr: str, port: int, host: str, timeout: float = 10.0) -> str:
    """One request on a new connection; its outcome (see the module doc)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    with sock:
        try:
            with trio.fail_after(timeout):
                await sock.connect((addr, port))
        except ConnectionRefusedError:
            return "refused"
        except (OSError, trio.TooSlowError) as e:
            return "refused" if getattr(e, "errno", None) == errno.ECONNREFUSED else "failed"
        got = b""
        try:
            with trio.fail_after(timeout):
                await sock.send(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                while chunk := await sock.recv(65536):
                    got += chunk
        except (OSError, trio.TooSlowError):
            return "failed"
    head, sep, _ = got.partition(b"\r\n\r\n")
    if not sep:
        return "failed"
    return "ok" if head[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 ") and head[9:13] == b"200 " else "other"


async def hammer(
    addr: str, port: int, host: str, tally: Tally, *, clients: int = 4, pause: float = 0.002
) -> None:
    """`clients` loops of `request_once` until cancelled, every outcome in `tally`."""

    async def loop() -> None:
        while True:
            start = time.monotonic()
            outcome = await request_once(addr, port, host)
            tally.results.append((start, time.monotonic(), outcome))
            await trio.sleep(pause)

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(loop)
