"""The ``serf agent`` child process: its config, its start, its supervision.

Theory of operation
-------------------
The node's agent owns exactly one serf process.  ``SerfAgent.run`` writes the
serf config (0600: it holds the gossip key and the RPC auth key), starts
``serf agent -config-file …`` and reports ready (``task_status.started``) only
once serf's RPC port accepts connections.  If serf exits while the node runs,
the supervisor starts it again with backoff (1 s, 2 s, 4 s … capped at 30 s,
reset after 60 s of uptime); the RPC client reconnects by itself.

Serf's RPC port
---------------
``rpc_port=0`` (what the agent uses) means "any free port, kept for serf":
``run`` binds a socket to a free loopback port with ``SO_REUSEADDR`` and holds
it, not listening, for as long as it runs, and hands the port back through
``task_status.started``.  Serf (Go sets ``SO_REUSEADDR`` on its listeners) can
bind and listen on it beside the held socket; nothing else can bind it (without
``SO_REUSEADDR`` it is in use, and the kernel never picks it for ``bind(0)``).
So the port cannot be taken between choosing it and serf's start, nor while a
dead serf waits to be restarted -- as it could when the port was chosen by
binding and closing a socket.  (Serf accepts ``-rpc-addr=127.0.0.1:0`` but
prints ``RPC addr: '127.0.0.1:0'`` and nothing else would tell which port it
took; when its port is taken it exits 1 within milliseconds, "Error starting
RPC listener: ... bind: address already in use".)

Serf is started through a thread (trio spawns children that way), so the kernel's
parent-death signal cannot tie serf to the agent.  Instead serf's pid is kept in
``serf.pid``: a restarted agent (or the test harness) stops a serf left over
from an agent that was killed.  On cancellation serf is stopped bounded and
shielded: SIGINT (graceful leave) when asked to leave, else SIGTERM; then
SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from flynnp2p.children import find_binary, kill_stale, spawn, stop
from flynnp2p.errors import ConfigError

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 15.0
STOP_GRACE_S = 8.0


@dataclass(frozen=True)
class SerfSettings:
    node_name: str
    bind_addr: str
    bind_port: int
    rpc_addr: str
    rpc_port: int
    rpc_auth: str
    encrypt_key_b64: str
    data_dir: Path
    tags: Mapping[str, str] = field(default_factory=dict)
    binary: str = "serf"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "serf.json"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "serf.pid"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "serf.log"

    def config(self) -> dict[str, object]:
        return {
            "node_name": self.node_name,
            "bind": f"{self.bind_addr}:{self.bind_port}",
            "advertise": f"{self.bind_addr}:{self.bind_port}",
            "rpc_addr": f"{self.rpc_addr}:{self.rpc_port}",
            "rpc_auth": self.rpc_auth,
            "encrypt_key": self.encrypt_key_b64,
            "snapshot_path": str(self.data_dir / "serf.snapshot"),
            # FACTS.md: the "local" profile lost events and query answers here.
            "profile": "lan",
            "log_level": "warn",
            "tags": dict(self.tags),
            # SIGTERM/SIGKILL = failed (peers keep us in the electorate); only an
            # explicit leave (SIGINT) removes the node.
            "leave_on_terminate": False,
            "skip_leave_on_interrupt": False,
            "reconnect_interval": "5s",
        }


@contextlib.contextmanager
def reserve_port(addr: str) -> Iterator[int]:
    """A TCP port on ``addr`` held for a listener that sets ``SO_REUSEADDR`` (serf's
    RPC) until the block ends; see "Serf's RPC port" above."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind((addr, 0))
        yield int(held.getsockname()[1])


def find_serf(binary: str) -> str:
    return find_binary(binary, "serf", "serf")


def stop_stale_serf(pid_path: Path, config_path: Path) -> None:
    """Kill a serf left running by an agent that died without stopping it."""
    kill_stale(pid_path, b"serf", config_path)


def _port_error(text: str, settings: SerfSettings) -> str | None:
    if "address already in use" in text.lower():
        if f":{settings.rpc_port}" in text:
            return f"serf RPC port {settings.rpc_addr}:{settings.rpc_port} is already in use"
        return (
            f"gossip port {settings.bind_addr}:{settings.bind_port} is already in use "
            "(another agent on this address? choose --gossip-port or --addr)"
        )
    if "cannot assign requested address" in text.lower():
        return f"address {settings.bind_addr} is not an address of this host (--addr)"
    return None


class SerfAgent:
    """Runs and supervises the serf child process."""

    def __init__(self, settings: SerfSettings) -> None:
        self.settings = settings
        self.restarts = 0
        self.running = False
        self.leave_on_stop = False
        self.last_error: str | None = None

    def write_config(self) -> None:
        path = self.settings.config_path
        tmp = path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(self.settings.config(), f)
            os.replace(tmp, path)
        except OSError as exc:  # a full disk, a read-only data dir
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ConfigError(f"cannot write serf's config {path}: {exc.strerror or exc}") from None

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Run serf until cancelled; ready (with serf's RPC port) once it answers."""
        binary = find_serf(self.settings.binary)
        stop_stale_serf(self.settings.pid_path, self.settings.config_path)
        asked = self.settings
        with contextlib.ExitStack() as held:
            if asked.rpc_port == 0:
                port = held.enter_context(reserve_port(asked.rpc_addr))
                self.settings = replace(asked, rpc_port=port)
            try:
                await self._supervise(binary, task_status)
            finally:
                self.settings = asked  # the port is not held any more

    async def _supervise(self, binary: str, task_status: trio.TaskStatus[int]) -> None:
        self.write_config()
        backoff = 1.0
        first = True
        while True:
            started_at = trio.current_time()
            if first:
                await self._run_once(binary, task_status)
                first = False
            else:
                try:
                    await self._run_once(binary, trio.TASK_STATUS_IGNORED)
                except ConfigError as exc:  # e.g. the port is taken for a moment
                    self.last_error = exc.message
            self.restarts += 1
            if trio.current_time() - started_at > 60:
                backoff = 1.0
            log.warning("serf exited (%s); restarting in %.0f s", self.last_error, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _run_once(self, binary: str, task_status: trio.TaskStatus[int]) -> None:
        s = self.settings
        proc = await spawn(
            [binary, "agent", f"-config-file={s.config_path}"], s.log_path, s.pid_path
        )
        try:
            await self._wait_ready(proc)
            self.running = True
            task_status.started(s.rpc_port)
            await proc.wait()
            self.running = False
            self.last_error = f"exit status {proc.returncode}"
        finally:
            self.running = False
            with trio.CancelScope(shield=True):
                await self._stop(proc)

    async def _wait_ready(self, proc: trio.Process) -> None:
        s = self.settings
        with trio.move_on_after(STARTUP_TIMEOUT_S):
            while proc.returncode is None:
                try:
                    stream = await trio.open_tcp_stream(s.rpc_addr, s.rpc_port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                return
            raise ConfigError(self._startup_failure(proc.returncode))
        raise ConfigError(f"serf did not open its RPC port within {STARTUP_TIMEOUT_S:.0f} s")

    def _startup_failure(self, code: int | None) -> str:
        try:
            tail = self.settings.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            tail = ""
        reason = _port_error(tail, self.settings)
        if reason:
            return reason
        last = [line for line in tail.splitlines() if line.strip()][-1:] or [f"status {code}"]
        return f"serf failed to start: {last[0].strip()}"

    async def _stop(self, proc: trio.Process) -> None:
        sig = signal.SIGINT if self.leave_on_stop else signal.SIGTERM
        await stop(proc, sig, STOP_GRACE_S, self.settings.pid_path)
