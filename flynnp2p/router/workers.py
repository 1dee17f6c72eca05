"""Router worker processes, supervised by the agent (``--router-workers N``).

Theory of operation
-------------------
A saturated router shares its trio loop with the API, the state service and
serf's event stream when it runs in the agent's process: every request it
proxies delays theirs (``scripts/bench/router_api.py`` measures it). With N > 0
workers the data plane runs in N processes (`flynnp2p.router.worker`), while
the agent keeps everything else: the replicated state, the table built from it
(`flynnp2p.router.feed`), the certificates, the apps' logs, the counters of
workers that died and ``/v1/router/status``.

**The agent holds the listening sockets.** It binds HTTP, HTTPS and one
listener per TCP route of the table (binding again, every `CERT_POLL_S`, a port
it could not bind) and hands every worker a descriptor of each (SCM_RIGHTS over
the worker's socketpair: `Channel`, messages in `flynnp2p.router.handover`).
A listener lives as long as the agent holds it, not as long as a worker does:
when a worker dies, new connections wait in the kernel's listen queue (1024)
until its replacement accepts them, instead of being refused while no process
listens. A route added while no worker runs is bound by the agent at once and
handed to the next worker; a removed one is closed, and never handed.

All workers accept from the same socket (one listen queue per port), not from
sockets of their own in a SO_REUSEPORT group: the kernel hashes each new
connection to one socket of a group, so a dead worker's socket would hold its
share of new connections until a replacement came (through the back-off of a
worker that keeps dying), and closing a group's socket resets what waits in it.
With one queue, the live workers take everything while one is replaced. The
agent's listeners do set SO_REUSEPORT, so that a port can be bound again while
a worker still holds a socket the agent just closed (a TCP route removed and
added again), or an agent restarted after a SIGKILL binds while its old workers
are still dying.

`RouterWorkers` has the in-process `Router`'s interface for the agent (``run``,
``failed``, ``current_status``). Per slot, one task keeps one worker alive:

1. spawn it (from one long-lived thread, so the parent-death signal that the
   child asks for before exec stays tied to the agent: `flynnp2p.host.spawn`),
   with its end of a socketpair; its stdout and stderr go to the agent's log;
2. send ``init`` (the HTTP and HTTPS listeners, proxy config, sticky key,
   table, certificates) and wait for ``ready``;
3. hand over the TCP route listeners, push the table and the certificates
   whenever they change (`Watched`: a worker never misses the latest, it may
   skip intermediate ones; descriptors are duplicated when a message is built,
   so a listener the agent closes meanwhile is never sent as another file),
   relay the worker's log lines to the log hub, keep its latest counters, match
   its status replies to requests;
4. when the worker dies (its socket reads EOF), reap it, add its latest
   counters to the retired totals, and start another: at once if it had lived
   `HEALTHY_AFTER_S`, else after a back-off (`backoff_s`, doubling to
   `BACKOFF_MAX_S` while it keeps dying young).

Stopping (the agent's nursery cancelled): each slot closes its socket, so its
worker reads EOF and exits, waits a grace period, then SIGKILLs it; then the
agent closes its listeners. A worker whose agent was SIGKILLed reads EOF too,
and the kernel's parent-death signal covers a worker too wedged to read.
Workers stay in the agent's process group.

`current_status` asks every live worker at once (bounded by
`STATUS_TIMEOUT_S`) and merges the answers with the agent's own view
(`flynnp2p.router.handover.merge_status`).
"""

from __future__ import annotations

import array
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from flynnp2p.errors import ClusterError
from flynnp2p.host.logs import LogLine
from flynnp2p.host.spawn import Child, Spawner, line_batches, set_pdeathsig
from flynnp2p.router.applog import LineWriter
from flynnp2p.router.handover import (
    MAX_FDS,
    Message,
    WorkerView,
    add_counters,
    batches,
    encode_certs,
    encode_config,
    encode_table,
    merge_status,
    no_counters,
    tcp_handover,
)
from flynnp2p.router.proxy import ProxyConfig
from flynnp2p.router.service import listen_socket
from flynnp2p.router.table import RouteTable
from flynnp2p.router.tls import CertStore
from flynnp2p.watch import Watched

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
STATUS_TIMEOUT_S = 1.0
STOP_GRACE_S = 2.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 5.0
HEALTHY_AFTER_S = 10.0  # a worker that lived this long is replaced without back-off
CERT_POLL_S = 0.25  # certificates change with the table; this catches a change alone
RECV_SIZE = 65536


class Channel:
    """msgpack maps over a Unix stream socket, each with the descriptors it carries
    (``"fds"``, see `flynnp2p.router.handover`); one reader, any number of senders."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._unpacker = msgpack.Unpacker(raw=False)
        self._fds: deque[int] = deque()  # received, not yet taken by a message
        self._lock = trio.Lock()

    async def send(self, msg: Message, fds: Sequence[int] = ()) -> None:
        """Send `msg` with `fds` (the caller keeps its own descriptors); raises
        `trio.BrokenResourceError` when the other end is gone."""
        assert len(fds) <= MAX_FDS
        if fds:
            msg = {**msg, "fds": len(fds)}
        data = memoryview(msgpack.packb(msg, use_bin_type=True))
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        async with self._lock:
            try:
                sent = await self.sock.sendmsg([data], ancillary)  # the fds go with the first byte
                while sent < len(data):
                    sent += await self.sock.send(data[sent:])
            except OSError as exc:
                raise trio.BrokenResourceError(f"the other end is gone: {exc}") from exc

    async def receive(self) -> Message | None:
        """The next message, its ``"fds"`` the descriptors it carried (now the
        caller's); None at EOF (or a broken connection)."""
        while True:
            try:
                msg: Message = next(self._unpacker)
            except StopIteration:
                pass
            else:
                if n := msg.get("fds"):
                    assert len(self._fds) >= n, "descriptors lost in transit"
                    msg["fds"] = [self._fds.popleft() for _ in range(n)]
                return msg
            try:
                data, ancillary, _, _ = await self.sock.recvmsg(
                    RECV_SIZE, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
                )
            except (OSError, trio.ClosedResourceError):
                return None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self._fds.extend(fds)
            if not data:
                return None
            self._unpacker.feed(data)

    async def aclose(self) -> None:
        self.sock.close()
        while self._fds:
            os.close(self._fds.popleft())
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@dataclass(eq=False)
class _Held:
    """A listening socket the agent holds (compared by identity: see `tcp_handover`)."""

    sock: socket.socket


Inputs = tuple[RouteTable, Message | None, Mapping[int, _Held]]


@dataclass
class _Slot:
    index: int
    pid: int | None = None
    restarts: int = 0
    channel: Channel | None = None
    counters: Message | None = None  # its worker's latest report
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
        backoff_s: float = BACKOFF_MIN_S,
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
        self.backoff_s = backoff_s
        self.slots = [_Slot(i) for i in range(count)]
        self.bound_port: int | None = None
        self.bound_https_port: int | None = None
        self.failed = "http"  # which listener a bind error is about
        self.retired: Message = no_counters()  # what workers that died had counted
        self.tcp_errors: dict[int, str] = {}  # TCP route ports the agent could not bind
        self._listening: tuple[socket.socket, socket.socket | None] | None = None
        self._tcp: dict[int, _Held] = {}
        self._spawner = Spawner()
        self._ids = itertools.count(1)
        self._inputs: Watched[Inputs] = Watched((table.value, self._certs(), {}))

    def _certs(self) -> Message | None:
        return encode_certs(self.certs) if self.certs is not None else None

    # -- the agent's listeners -----------------------------------------------------------

    def _bind(self) -> tuple[socket.socket, socket.socket | None]:
        """The HTTP and HTTPS listeners; a port that cannot be bound raises OSError
        (`failed` says which), as it does for the in-process router."""
        self.failed = "http"
        http = listen_socket(self.address, self.http_port, reuse_port=True)
        try:
            self.bound_port = self.http_port = http.getsockname()[1]
            if self.https_port is None:
                return http, None
            self.failed = "https"
            https = listen_socket(self.address, self.https_port, reuse_port=True)
            self.bound_https_port = self.https_port = https.getsockname()[1]
            return http, https
        except BaseException:
            http.close()
            raise

    def _bind_tcp(self, wanted: frozenset[int]) -> None:
        """Hold a listener for every TCP route port of the table, and no other."""
        for port in sorted(set(self._tcp) - wanted):
            self._tcp.pop(port).sock.close()  # (workers close theirs when told)
        self.tcp_errors = {p: e for p, e in self.tcp_errors.items() if p in wanted}
        for port in sorted(wanted - set(self._tcp)):
            try:
                self._tcp[port] = _Held(listen_socket(self.address, port, reuse_port=True))
            except OSError as e:
                self.tcp_errors[port] = str(e)
            else:
                self.tcp_errors.pop(port, None)

    def _refresh(self) -> None:
        """The inputs every worker follows, from the table now (and the listeners it needs)."""
        table = self.table.value
        self._bind_tcp(table.tcp_ports)
        self._inputs.set((table, self._certs(), dict(self._tcp)))

    def _close_listeners(self) -> None:
        for held in self._tcp.values():
            held.sock.close()
        self._tcp.clear()
        for sock in self._listening or ():
            if sock is not None:
                sock.close()
        self._listening = None

    # -- running -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        self._listening = self._bind()  # OSError: raised bare, as the in-process router does
        try:
            version = self.table.version
            self._refresh()
            self._spawner.start()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_inputs, version)
                    for slot in self.slots:
                        await nursery.start(self._keep, slot)
                    assert self.bound_port is not None
                    task_status.started(self.bound_port)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._spawner.close)
        finally:
            self._close_listeners()

    async def _watch_inputs(self, version: int) -> None:
        while True:
            with trio.move_on_after(CERT_POLL_S):
                version, _ = await self.table.wait_change(version)
            self._refresh()

    async def _keep(
        self, slot: _Slot, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        born = time.monotonic()
        await self._life(slot, task_status.started)
        backoff = self.backoff_s
        while True:
            slot.restarts += 1
            if time.monotonic() - born < HEALTHY_AFTER_S:  # dying young: back off
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            else:  # a healthy worker crashed: its connections are queueing, replace it now
                backoff = self.backoff_s
            born = time.monotonic()
            try:
                await self._life(slot, lambda: None)
            except (ClusterError, OSError) as exc:
                log.warning("router worker %d could not start: %s", slot.index, exc)

    def _init(self, table: RouteTable, certs: Message | None) -> Message:
        return {
            "t": "init", "address": self.address, "http_port": self.bound_port,
            "https_port": self.bound_https_port, "config": encode_config(self.config),
            "sticky_key": self.sticky_key, "table": encode_table(table), "certs": certs,
        }  # fmt: skip

    async def _life(self, slot: _Slot, started: Callable[[], None]) -> None:
        """One worker, from spawn to reaped. `started` is called once it serves."""
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
        channel = Channel(trio.socket.from_stdlib_socket(ours))
        failed: ClusterError | None = None
        async with trio.open_nursery() as output:
            output.start_soon(self._relay_output, slot, proc.stdout)
            output.start_soon(self._relay_output, slot, proc.stderr)
            try:
                await self._serve(slot, channel, started)
            except ClusterError as exc:
                failed = exc  # raised below, bare (not in the nursery's group)
            finally:
                with trio.CancelScope(shield=True):
                    await self._reap(slot, channel, proc)
                output.cancel_scope.deadline = trio.current_time() + 1.0  # its output's last lines
        if failed is not None:
            raise failed

    async def _serve(self, slot: _Slot, channel: Channel, started: Callable[[], None]) -> None:
        version, (table, certs, _) = self._inputs.version, self._inputs.value
        assert self._listening is not None
        http, https = self._listening  # (open until every slot is done)
        reply = None
        with contextlib.suppress(trio.BrokenResourceError):
            await channel.send(self._init(table, certs),
                               [s.fileno() for s in (http, https) if s is not None])  # fmt: skip
            with trio.move_on_after(START_TIMEOUT_S):
                reply = await channel.receive()
        if reply is None or reply.get("t") != "ready":
            raise ClusterError(f"router worker {slot.index} (pid {slot.pid}) did not start")
        slot.channel = channel
        started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._push, channel, version, table, certs)
                await self._read(slot, channel)
                nursery.cancel_scope.cancel()
        finally:
            slot.channel = None
            if slot.counters is not None:  # what it counted outlives it
                self.retired = add_counters(self.retired, slot.counters)
                slot.counters = None
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
        """From what ``init`` carried on: the TCP listeners, then every newer table,
        listener change and certificates. A worker that is gone ends it quietly:
        `_read` sees its EOF."""
        sent_tcp: Mapping[int, _Held] = {}
        with contextlib.suppress(trio.BrokenResourceError):
            while True:
                version, (table, certs, tcp) = self._inputs.version, self._inputs.value
                close, opened = tcp_handover(sent_tcp, tcp)
                # Duplicated now, with nothing awaited since the snapshot: every one is open.
                dups = [os.dup(tcp[p].sock.fileno()) for p in opened]
                try:
                    if table != sent_table:  # before the listeners, so a new port has its route
                        await channel.send({"t": "table", "table": encode_table(table)})
                        sent_table = table
                    if close or opened:
                        for n, ports in enumerate(batches(opened) or [[]]):
                            fds = dups[n * MAX_FDS : n * MAX_FDS + len(ports)]
                            await channel.send({"t": "tcp", "close": close if n == 0 else [], "open": ports}, fds)
                        sent_tcp = tcp
                finally:
                    for fd in dups:
                        os.close(fd)
                if certs != sent_certs:
                    await channel.send({"t": "certs", "certs": certs})
                    sent_certs = certs
                await self._inputs.wait_change(version)

    async def _read(self, slot: _Slot, channel: Channel) -> None:
        while (msg := await channel.receive()) is not None:
            kind = msg.get("t")
            if kind == "log":
                lines = [LogLine(ts, stream, text) for ts, stream, text in msg["lines"]]
                try:
                    await self.log_writer.write(msg["app"], msg["job"], lines)
                except OSError as exc:
                    log.warning("router lines for %s lost: %s", msg["app"], exc)
            elif kind == "counters":
                slot.counters = msg["body"]
            elif kind == "status":
                slot.counters = msg["body"]["counters"]
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
        answers: dict[int, dict[str, Any] | None] = {}

        async def ask(slot: _Slot) -> None:
            answers[slot.index] = await self._ask(slot)

        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(ask, slot)
        # Counters from the slots now, with the retired totals now (nothing awaited
        # between): a worker that died meanwhile is counted once, in `retired`.
        views = [WorkerView(s.index, s.pid, s.restarts, answers.get(s.index), s.counters)
                 for s in self.slots]  # fmt: skip
        tls: dict[str, object] = dict(self.certs.status()) if self.certs is not None else {}
        listeners = {"http": self.bound_port, "https": self.bound_https_port, "tcp": sorted(self._tcp)}
        return merge_status(views, self.table.value, tls, listeners,
                            tcp_errors=self.tcp_errors, retired=self.retired)  # fmt: skip
