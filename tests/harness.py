"""Real multi-agent clusters for tests: every agent a subprocess with its own
loopback address (127.0.10.x, …), data dir and real serf.

Agents run in their own process group, so ``kill`` takes the agent and its serf
together; every agent is killed at teardown even when the test fails.  Waits are
predicates polled against a deadline, never bare sleeps.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import trio

from flynnp2p.token import ClusterToken

T = TypeVar("T")

# Each test session takes its own block of loopback addresses (by pid), so two
# suites on one machine, or agents left by a crashed run, never cross-talk.
_BLOCK = 10 + os.getpid() % 200
_addresses = (f"127.{_BLOCK}.{b}.{c}" for b in itertools.count(10) for c in range(2, 250))


def next_addr() -> str:
    return next(_addresses)


async def wait_for(
    predicate: Callable[[], Awaitable[T | None]] | Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> T:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout``."""
    last: Any = None
    with trio.move_on_after(timeout):
        while True:
            result = predicate()
            if isinstance(result, Awaitable):
                result = await result
            last = result
            if result:
                return result  # type: ignore[return-value]
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class AgentProc:
    def __init__(
        self, root: Path, name: str, addr: str, token: ClusterToken, gid: int | None = None
    ) -> None:
        self.gid = gid  # run with this group (partition tests match on it with iptables' owner)
        self.name = name
        self.addr = addr
        self.token = token
        self.data_dir = root / name
        self.log_path = root / f"{name}.log"
        self.api_port = 7100
        self.gossip_port = 7946
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}
        self.backend = "process"
        # Run the agent from this directory and pass --data-dir relative to it (as
        # an operator typing `--data-dir rel/n1` would); None: the absolute path.
        self.cwd: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.api_port}"

    @property
    def gossip(self) -> str:
        return f"{self.addr}:{self.gossip_port}"

    def command(self, peers: Iterable[str] = (), extra: Iterable[str] = (), token: bool = True) -> list[str]:
        data_dir = os.path.relpath(self.data_dir, self.cwd) if self.cwd else str(self.data_dir)
        cmd = [sys.executable, "-m", "flynnp2p", "join", "--name", self.name, "--addr", self.addr,
               "--data-dir", data_dir]
        if token:
            cmd += ["--token", self.token.encode()]
        extra = list(extra)
        if "--backend" not in extra:
            extra += ["--backend", self.backend]
        return cmd + extra + list(peers)

    def start(self, peers: Iterable[str] = (), extra: Iterable[str] = (), token: bool = True) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(peers, extra, token),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
                env={**os.environ, "FLYNNP2P_LOG": "info", "FLYNNP2P_STOP_GRACE_S": "3", **self.env},
                group=self.gid,
                cwd=self.cwd,
            )

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def wait_ready(self, timeout: float = 20.0) -> None:
        async def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent {self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                async with httpx.AsyncClient(timeout=1.0) as c:
                    return (await c.get(f"{self.url}/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(healthy, timeout, f"agent {self.name} to be ready", interval=0.05)

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        """An API client; ``token=""`` sends no Authorization header at all."""
        bearer = token if token is not None else self.token.api_key
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=5.0)

    async def status(self) -> dict[str, Any] | None:
        try:
            async with self.client() as c:
                r = await c.get("/v1/status")
                return r.json() if r.status_code == 200 else None
        except httpx.TransportError:
            return None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, *, jobs: bool = True) -> None:
        """Signal the agent's whole process group (agent and its serf); with `jobs`,
        also SIGKILL the job process groups it started (as a host failure would)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=20)
        if jobs:
            self.kill_jobs()

    def job_groups(self) -> dict[str, int]:
        """Job id -> process group id of the jobs this node's agents started and that live."""
        out = {}
        pids = self.data_dir / "jobs" / "pids"
        for path in pids.glob("*") if pids.is_dir() else []:
            with contextlib.suppress(OSError, ValueError, IndexError):  # (being written: empty)
                pgid = int(path.read_text().split()[0])
                os.killpg(pgid, 0)
                out[path.name] = pgid
        return out

    def kill_jobs(self, timeout: float = 10.0) -> None:
        """SIGKILL the jobs' process groups and return once none of their processes
        lives (a dead process has closed its sockets: the kill is over, not sent)."""
        groups = set(self.job_groups().values())
        for pgid in groups:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while groups and live_in_groups(groups) and time.monotonic() < deadline:
            time.sleep(0.005)

    def stop(self, timeout: float = 20) -> int:
        """Graceful stop: SIGTERM to the agent alone, which leaves and stops serf."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = ClusterToken.generate()
        self.agents: list[AgentProc] = []
        self.env: dict[str, str] = {}  # extra environment for agents started from now on
        self.backend = "process"  # --backend of agents added from now on

    def add(
        self, name: str | None = None, token: ClusterToken | None = None, gid: int | None = None
    ) -> AgentProc:
        agent = AgentProc(
            self.root, name or f"n{len(self.agents) + 1}", next_addr(), token or self.token, gid
        )
        agent.env = dict(self.env)
        agent.backend = self.backend
        self.agents.append(agent)
        return agent

    async def start(
        self, n: int, timeout: float = 20.0, own_gids: bool = False
    ) -> list[AgentProc]:
        """Start ``n`` agents with one token, each joining the first.

        ``own_gids``: each agent runs with its own group id (root only), so that
        ``tests.partition`` can cut its traffic by owner."""
        new = [self.add(gid=20000 + len(self.agents) if own_gids else None) for _ in range(n)]
        seed = self.agents[0]
        if seed in new:
            seed.start()
            await seed.wait_ready(timeout)
        for agent in new:
            if agent is not seed:
                agent.start(peers=[seed.gossip])
        for agent in new:
            await agent.wait_ready(timeout)
        await self.wait_coord(timeout=30)
        return new

    async def wait_coord(self, timeout: float = 30.0) -> None:
        """etcd settled: as many voters as there can be (up to 5) among the running
        scheduler agents, and every running agent sees the same leader."""
        running = [a for a in self.agents if a.running]

        async def settled() -> bool:
            statuses = [await a.status() for a in running]
            if any(s is None for s in statuses):
                return False
            roles = [s["components"]["coord"]["role"] for s in statuses if s]
            leaders = {s["leader"]["name"] for s in statuses if s}
            schedulers = sum("scheduler" in s["node"]["roles"] for s in statuses if s)
            return roles.count("voter") >= min(schedulers, 5) and len(leaders) == 1 and None not in leaders

        await wait_for(settled, timeout, "etcd to settle (voters and one leader)", interval=0.2)

    async def wait_converged(
        self, agents: list[AgentProc], alive: int, timeout: float = 15.0
    ) -> dict[str, dict[str, Any]]:
        """Every agent sees ``alive`` alive members and the same leader."""

        async def converged() -> dict[str, dict[str, Any]] | None:
            statuses = {a.name: await a.status() for a in agents}
            if any(s is None for s in statuses.values()):
                return None
            leaders = {s["leader"]["name"] for s in statuses.values() if s}
            counts = {sum(m["status"] == "alive" for m in s["members"]) for s in statuses.values() if s}
            if counts == {alive} and len(leaders) == 1 and None not in leaders:
                return statuses  # type: ignore[return-value]
            return None

        return await wait_for(converged, timeout, f"{len(agents)} agents to converge on {alive} alive")

    def kill_all(self) -> None:
        for agent in self.agents:
            agent.kill()


def live_in_groups(groups: set[int]) -> bool:
    """Whether a process that has not exited (a zombie has) is in one of `groups`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) in groups:
                return True
    return False


def gone_or_zombie(pid: int) -> bool:
    """The process has exited (a zombie counts: this sandbox's pid 1 reaps nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
