"""A router worker process: the data plane out of the agent's process.

    python -m flynnp2p.router.worker FD

FD is the worker's end of a socketpair to the agent (`flynnp2p.router.workers`,
messages in `flynnp2p.router.handover`). The worker reads ``init``, runs a
`Router` whose listeners are bound with SO_REUSEPORT (the kernel spreads new
connections over the workers), answers ``ready`` with the ports it bound (or
``error``: the agent reports a busy port as it would for its own), then applies
every ``table`` and ``certs`` message and answers ``status`` requests; the
router's lines for apps' logs go back to the agent, which owns the logs.

The worker lives as long as its socketpair: when the agent closes it, or dies
(even by SIGKILL), the worker reads EOF and exits; the agent also had the kernel
SIGKILL it when its parent goes (``PR_SET_PDEATHSIG``, set before exec by the
supervisor's spawning thread, which lives as long as the supervisor). It ignores SIGINT
(a Ctrl-C in the agent's terminal reaches the whole process group: the agent
stops its workers in order).
"""

from __future__ import annotations

import errno
import signal
import socket
import sys
from collections.abc import Sequence

import trio

from flynnp2p.host.logs import LogLine
from flynnp2p.router.applog import RouterLog
from flynnp2p.router.handover import (
    decode_config,
    decode_table,
    handed_cert_store,
    raw_stats,
    update_handed,
)
from flynnp2p.router.lane import BURST_SECONDS
from flynnp2p.router.service import Router
from flynnp2p.router.workers import Channel
from flynnp2p.watch import Watched


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


def worker_status(router: Router) -> dict[str, object]:
    return {**router.status(), "raw_stats": raw_stats(router.shared.stats)}


async def serve(channel: Channel) -> None:
    init = await channel.receive()
    assert init is not None and init["t"] == "init", init
    table = Watched(decode_table(init["table"]))
    certs = handed_cert_store(init["certs"]) if init["https_port"] is not None else None
    router = Router(
        table, address=init["address"], http_port=init["http_port"], config=decode_config(init["config"]),
        log=RouterLog(_ToAgent(channel)), https_port=init["https_port"], certs=certs,
        sticky_key=init["sticky_key"], reuse_port=True,
    )  # fmt: skip
    router.shared.lane_burst = BURST_SECONDS  # a process of its own: the lane may wait (lane.py)
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(router.run)
        except OSError as exc:
            await channel.send({"t": "error", "failed": router.failed, "errno": exc.errno or errno.EIO,
                                "message": exc.strerror or str(exc)})  # fmt: skip
            return
        await channel.send(
            {"t": "ready", "http": router.bound_port, "https": router.bound_https_port}
        )
        while (msg := await channel.receive()) is not None:
            kind = msg["t"]
            if kind == "table":
                table.set(decode_table(msg["table"]))
            elif kind == "certs" and certs is not None:
                update_handed(certs, msg["certs"])
            elif kind == "status":
                await channel.send({"t": "status", "id": msg["id"], "body": worker_status(router)})
        nursery.cancel_scope.cancel()  # the agent closed its end, or died


def main(argv: Sequence[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))

    async def run() -> None:
        async with Channel(trio.SocketStream(trio.socket.from_stdlib_socket(sock))) as channel:
            await serve(channel)

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
