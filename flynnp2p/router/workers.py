"""Router worker processes, supervised by the agent (``--router-workers N``).

Theory of operation
-------------------
A saturated router shares its trio loop with the API, the state service and
serf's event stream when it runs in the agent's process: every request it
proxies delays theirs (``scripts/bench/router_api.py`` measures it). With N > 0
workers the data plane runs in N processes (`flynnp2p.router.worker`), each
with its own listeners on the same ports (SO_REUSEPORT: the kernel spreads new
connections over them), while the agent keeps everything else: the replicated
state, the table built from it (`flynnp2p.router.feed`), the certificates, the
apps' logs and ``/v1/router/status``.

`RouterWorkers` has the in-process `Router`'s interface for the agent (``run``,
``failed``, ``current_status``). Per slot, one task keeps one worker alive:

1. spawn it (from one long-lived thread, so the parent-death signal that the
   child asks for before exec stays tied to the agent: `flynnp2p.host.spawn`),
   with its end of a socketpair; its stdout and stderr go to the agent's log;
2. send ``init`` (listeners, proxy config, sticky key, table, certificates) and
   wait for ``ready`` or ``error``. The first worker binds the configured ports
   (0: any free one, which every later worker then binds too); a port the
   first start cannot bind is the agent's configuration error, as it is for
   the in-process router;
3. push the table and the certificates whenever they change (`Watched`: a
   worker never misses the latest, it may skip intermediate ones), relay the
   worker's log lines to the log hub, match its status replies to requests;
4. when the worker dies (its socket reads EOF), reap it and start another
   after a back-off (0.1 s, doubling to 5 s while it keeps dying young).

Stopping (the agent's nursery cancelled): each slot closes its socket, so its
worker reads EOF and exits, waits a grace period, then SIGKILLs it. A worker
whose agent was SIGKILLed reads EOF too, and the kernel's parent-death signal
covers a worker too wedged to read. Workers stay in the agent's process group.

`current_status` asks every live worker at once (bounded by
`STATUS_TIMEOUT_S`) and merges the answers (`flynnp2p.router.handover.merge_status`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from flynnp2p.errors import ClusterError
from flynnp2p.host.logs import LogLine
from flynnp2p.host.spawn import Child, Spawner, line_batches, set_pdeathsig
from flynnp2p.router.applog import LineWriter
from flynnp2p.router.handover import (
    Message,
    WorkerView,
    encode_certs,
    encode_config,
    encode_table,
    merge_status,
)
from flynnp2p.router.proxy import ProxyConfig
from flynnp2p.router.table import RouteTable
from flynnp2p.router.tls import CertStore
from flynnp2p.watch import Watched

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
STATUS_TIMEOUT_S = 1.0
STOP_GRACE_S = 2.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 5.0
HEALTHY_AFTER_S = 10.0  # a worker that lived this long restarts without back-off
CERT_POLL_S = 0.25  # certificates change with the table; this catches a change alone


class Channel:
    """msgpack maps over a stream, one reader and any number of senders."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._unpacker = msgpack.Unpacker(raw=False)
        self._lock = trio.Lock()

    async def send(self, msg: Message) -> None:
        data = msgpack.packb(msg, use_bin_type=True)
        async with self._lock:
            await self.stream.send_all(data)

    async def receive(self) -> Message | None:
        """The next message; None at EOF (or a broken connection)."""
        while True:
            try:
                msg: Message = next(self._unpacker)
                return msg
            except StopIteration:
                pass
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self._unpacker.feed(data)

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@dataclass
class _Slot:
    index: int
    pid: int | None = None
    restarts: int = 0
    channel: Channel | None = None
    pending: dict[int, tuple[trio.Event, list[Message]]] = field(default_factory=dict)


class RouterWorkers:
    """The router as `count` supervised worker processes (see the module doc)."""

    def __init__(
        self,
        count: int,
        table: Watched[RouteTable],
        *,
        address: str,
        http_port: int,
        log_writer: LineWriter,
        sticky_key: bytes,
        https_port: int | None = None,
        certs: CertStore | None = None,
        config: ProxyConfig | None = None,
    ) -> None:
        assert count >= 1
        self.table = table
        self.address = address
        self.http_port = http_port
        self.https_port = https_port if certs is not None else None
        self.certs = certs
        self.config = config or ProxyConfig()
        self.sticky_key = sticky_key
        self.log_writer = log_writer
        self.slots = [_Slot(i) for i in range(count)]
        self.bound_port: int | None = None
        self.bound_https_port: int | None = None
        self.failed = "http"  # which listener a bind error is about
        self._spawner = Spawner()
        self._ids = itertools.count(1)
        self._inputs: Watched[tuple[RouteTable, Message | None]] = Watched(
            (table.value, self._certs())
        )

    def _certs(self) -> Message | None:
        return encode_certs(self.certs) if self.certs is not None else None

    # -- running -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        self._spawner.start()
        failed: OSError | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_inputs)
                try:
                    for slot in self.slots:
                        await nursery.start(self._keep, slot)
                except OSError as exc:  # a busy port: raised bare, as the in-process router does
                    failed = exc
                    nursery.cancel_scope.cancel()
                else:
                    assert self.bound_port is not None
                    task_status.started(self.bound_port)
            if failed is not None:
                raise failed
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._spawner.close)

    async def _watch_inputs(self) -> None:
        version = self.table.version
        while True:
            with trio.move_on_after(CERT_POLL_S):
                version, _ = await self.table.wait_change(version)
            self._inputs.set((self.table.value, self._certs()))

    async def _keep(
        self, slot: _Slot, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self._life(slot, task_status.started, first=True)
        backoff = BACKOFF_MIN_S
        while True:
            slot.restarts += 1
            await trio.sleep(backoff)
            born = time.monotonic()
            try:
                await self._life(slot, lambda: None, first=False)
            except (ClusterError, OSError) as exc:
                log.warning("router worker %d could not start: %s", slot.index, exc)
            young = time.monotonic() - born < HEALTHY_AFTER_S
            backoff = min(backoff * 2, BACKOFF_MAX_S) if young else BACKOFF_MIN_S

    def _init(self, table: RouteTable, certs: Message | None) -> Message:
        return {
            "t": "init", "address": self.address, "http_port": self.http_port,
            "https_port": self.https_port, "config": encode_config(self.config),
            "sticky_key": self.sticky_key, "table": encode_table(table), "certs": certs,
        }  # fmt: skip

    async def _life(self, slot: _Slot, started: Callable[[], None], *, first: bool) -> None:
        """One worker, from spawn to reaped. `started` is called once it serves;
        on a first start, a listener it cannot bind raises OSError."""
        ours, theirs = socket.socketpair()
        try:
            proc = await self._spawner.spawn(
                [sys.executable, "-m", "flynnp2p.router.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, preexec_fn=set_pdeathsig,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        slot.pid = proc.pid
        channel = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        failed: OSError | ClusterError | None = None
        async with trio.open_nursery() as output:
            output.start_soon(self._relay_output, slot, proc.stdout)
            output.start_soon(self._relay_output, slot, proc.stderr)
            try:
                await self._serve(slot, channel, started, first)
            except (OSError, ClusterError) as exc:
                failed = exc  # raised below, bare (not in the nursery's group)
            finally:
                with trio.CancelScope(shield=True):
                    await self._reap(slot, channel, proc)
                output.cancel_scope.deadline = trio.current_time() + 1.0  # its output's last lines
        if failed is not None:
            raise failed

    async def _serve(
        self, slot: _Slot, channel: Channel, started: Callable[[], None], first: bool
    ) -> None:
        version, (table, certs) = self._inputs.version, self._inputs.value
        await channel.send(self._init(table, certs))
        reply = None
        with trio.move_on_after(START_TIMEOUT_S):
            reply = await channel.receive()
        if reply is None or reply.get("t") not in ("ready", "error"):
            raise ClusterError(f"router worker {slot.index} (pid {slot.pid}) did not start")
        if reply["t"] == "error":
            self.failed = reply["failed"]
            raise OSError(reply["errno"], reply["message"])
        if first and slot.index == 0:  # port 0: every later worker binds what the first got
            self.bound_port = self.http_port = reply["http"]
            self.bound_https_port = self.https_port = reply["https"]
        slot.channel = channel
        started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._push, channel, version, table, certs)
                await self._read(slot, channel)
                nursery.cancel_scope.cancel()
        finally:
            slot.channel = None
            for event, _ in slot.pending.values():
                event.set()
        log.warning("router worker %d (pid %s) is gone; starting another", slot.index, slot.pid)

    async def _reap(self, slot: _Slot, channel: Channel, proc: Child) -> None:
        await channel.aclose()  # the worker reads EOF and exits
        with trio.move_on_after(STOP_GRACE_S):
            await proc.wait()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
        slot.pid = None

    async def _relay_output(self, slot: _Slot, stream: trio.lowlevel.FdStream) -> None:
        try:
            async for batch in line_batches(stream):
                for line in batch:
                    log.warning("router worker %d: %s", slot.index, line.decode(errors="replace"))
        finally:
            await stream.aclose()

    async def _push(
        self, channel: Channel, version: int, sent_table: RouteTable, sent_certs: Message | None
    ) -> None:
        """From what ``init`` carried (`version`) on: every newer table and certificates."""
        while True:
            version, (table, certs) = await self._inputs.wait_change(version)
            if table != sent_table:
                await channel.send({"t": "table", "table": encode_table(table)})
                sent_table = table
            if certs != sent_certs:
                await channel.send({"t": "certs", "certs": certs})
                sent_certs = certs

    async def _read(self, slot: _Slot, channel: Channel) -> None:
        while (msg := await channel.receive()) is not None:
            kind = msg.get("t")
            if kind == "log":
                lines = [LogLine(ts, stream, text) for ts, stream, text in msg["lines"]]
                try:
                    await self.log_writer.write(msg["app"], msg["job"], lines)
                except OSError as exc:
                    log.warning("router lines for %s lost: %s", msg["app"], exc)
            elif kind == "status":
                waiter = slot.pending.get(msg["id"])
                if waiter is not None:
                    waiter[1].append(msg["body"])
                    waiter[0].set()

    # -- status --------------------------------------------------------------------------

    async def _ask(self, slot: _Slot) -> dict[str, Any] | None:
        channel = slot.channel
        if channel is None:
            return None
        rid = next(self._ids)
        event, box = slot.pending[rid] = (trio.Event(), [])
        try:
            with trio.move_on_after(STATUS_TIMEOUT_S):
                await channel.send({"t": "status", "id": rid})
                await event.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            slot.pending.pop(rid, None)
        return box[0] if box else None

    async def current_status(self) -> dict[str, object]:
        views: list[WorkerView] = []

        async def ask(slot: _Slot) -> None:
            pid, restarts = slot.pid, slot.restarts
            views.append(WorkerView(slot.index, pid, restarts, await self._ask(slot)))

        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(ask, slot)
        views.sort(key=lambda v: v.slot)
        tls: dict[str, object] = dict(self.certs.status()) if self.certs is not None else {}
        listeners = {"http": self.bound_port, "https": self.bound_https_port}
        return merge_status(views, self.table.value, tls, listeners)
