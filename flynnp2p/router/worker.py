"""A router worker process: the data plane out of the agent's process.

    python -m flynnp2p.router.worker FD

FD is the worker's end of a socketpair to the agent (`flynnp2p.router.workers`,
messages in `flynnp2p.router.handover`). The worker reads ``init``, which
carries the HTTP (and HTTPS) listening sockets the agent holds, runs a `Router`
on them (it binds nothing: its listeners are the agent's, shared with every
other worker), answers ``ready``, then applies every ``tcp`` (TCP route
listeners to stop or start serving, in order), ``table`` and ``certs`` message
and answers ``status`` requests. It reports its counters every `COUNTERS_EVERY_S`
when they changed, so the agent keeps them when the worker dies; the router's
lines for apps' logs go back to the agent, which owns the logs.

The worker lives as long as its socketpair: when the agent closes it, or dies
(even by SIGKILL), the worker reads EOF and exits; the agent also had the kernel
SIGKILL it when its parent goes (``PR_SET_PDEATHSIG``, set before exec by the
supervisor's spawning thread, which lives as long as the supervisor). It ignores SIGINT
(a Ctrl-C in the agent's terminal reaches the whole process group: the agent
stops its workers in order).
"""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Sequence

import trio

from flynnp2p.host.logs import LogLine
from flynnp2p.router.applog import RouterLog
from flynnp2p.router.handover import (
    Message,
    counters,
    decode_config,
    decode_table,
    handed_cert_store,
    latencies,
    update_handed,
)
from flynnp2p.router.service import HandedListeners, Router, TcpChange
from flynnp2p.router.workers import Channel
from flynnp2p.watch import Watched

COUNTERS_EVERY_S = 0.25
TCP_CHANGES = 64  # queued for the router before the reader waits


class _ToAgent:
    """The worker's `applog.LineWriter`: lines go to the agent's log hub."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    async def write(self, app: str, job_id: str, lines: Sequence[LogLine]) -> None:
        await self.channel.send(
            {
                "t": "log",
                "app": app,
                "job": job_id,
                "lines": [[ln.ts_ms, ln.stream, ln.text] for ln in lines],
            }
        )


def worker_counters(router: Router) -> Message:
    return counters(router.shared.stats, router.tls_failures, router.shared.log.status())


def worker_status(router: Router) -> dict[str, object]:
    return {**router.status(), "counters": worker_counters(router),
            "latencies": latencies(router.shared.stats)}  # fmt: skip


def _listener(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)  # (the agent's socket is: this is the worker's view of it)
    return sock


async def _report(channel: Channel, router: Router) -> None:
    last: Message | None = None
    while True:
        await trio.sleep(COUNTERS_EVERY_S)
        now = worker_counters(router)
        if now != last:
            await channel.send({"t": "counters", "body": now})
            last = now


async def serve(channel: Channel) -> None:
    init = await channel.receive()
    assert init is not None and init["t"] == "init", init
    fds = init["fds"]
    table = Watched(decode_table(init["table"]))
    https = init["https_port"] is not None
    certs = handed_cert_store(init["certs"]) if https else None
    tcp_send, tcp_receive = trio.open_memory_channel[TcpChange](TCP_CHANGES)
    handed = HandedListeners(_listener(fds[0]), _listener(fds[1]) if https else None, tcp_receive)
    router = Router(
        table, address=init["address"], http_port=init["http_port"], config=decode_config(init["config"]),
        log=RouterLog(_ToAgent(channel)), https_port=init["https_port"], certs=certs,
        sticky_key=init["sticky_key"], handed=handed,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        await channel.send({"t": "ready"})
        nursery.start_soon(_report, channel, router)
        while (msg := await channel.receive()) is not None:
            kind = msg["t"]
            if kind == "table":
                table.set(decode_table(msg["table"]))
            elif kind == "tcp":
                opened = dict(zip(msg["open"], map(_listener, msg.get("fds", [])), strict=True))
                await tcp_send.send(TcpChange(msg["close"], opened))
            elif kind == "certs" and certs is not None:
                update_handed(certs, msg["certs"])
            elif kind == "status":
                await channel.send({"t": "status", "id": msg["id"], "body": worker_status(router)})
        nursery.cancel_scope.cancel()  # the agent closed its end, or died


def main(argv: Sequence[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))

    async def run() -> None:
        async with Channel(trio.socket.from_stdlib_socket(sock)) as channel:
            try:
                await serve(channel)
            except* trio.BrokenResourceError:  # the agent is gone
                pass

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
