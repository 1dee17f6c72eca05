"""The ``etcd`` child process: its flags, TLS files, one run, a bounded stop.

Peer traffic is TLS with certificates from the cluster CA (mutual: a peer must
present a certificate the CA signed); the client URL is plain HTTP on a
loopback address only.  The etcd data dir lives in the node's data dir, so a
restarted node restarts its member from it (``--initial-cluster`` is then
ignored by etcd).  etcd's pid is kept in ``etcd.pid`` so a restarted agent
kills a member its killed predecessor left behind (as for serf).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import trio

from flynnp2p.children import find_binary, kill_stale, spawn, stop
from flynnp2p.coord.ca import ClusterCA
from flynnp2p.netaddr import url_host

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
# Removed members and members whose cluster is gone exit with these in their log.
REMOVED_MARKERS = ("permanently removed", "has been removed", "member count is unequal",
                   "already been bootstrapped", "cluster ID mismatch")  # fmt: skip


def client_host(addr: str) -> str:
    """etcd's client port listens on loopback only: the node's own address when that
    is a loopback address (one machine, many nodes), else 127.0.0.1."""
    ip = ipaddress.ip_address(addr)
    if ip.is_loopback:
        return url_host(addr)
    return "127.0.0.1"




@dataclass(frozen=True)
class EtcdSettings:
    name: str
    addr: str
    peer_port: int
    client_port: int
    data_dir: Path  # the node's data dir; etcd's own is data_dir/etcd
    cluster_token: str
    binary: str = "etcd"

    @property
    def member_dir(self) -> Path:
        return self.data_dir / "etcd"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "etcd-tls"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "etcd.pid"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "etcd.log"

    @property
    def peer_url(self) -> str:
        return f"https://{url_host(self.addr)}:{self.peer_port}"

    @property
    def client_url(self) -> str:
        return f"http://{client_host(self.addr)}:{self.client_port}"

    @property
    def marker(self) -> Path:
        """Written once the member has been seen in its cluster: a member dir
        without it is what a failed first start left, not a member to restart."""
        return self.data_dir / "etcd.member"

    def has_data(self) -> bool:
        return (self.member_dir / "member").is_dir() and self.marker.exists()

    def mark_joined(self, member_id: int) -> None:
        if not self.marker.exists():
            self.marker.write_text(f"{member_id:x}\n")

    def args(self, binary: str, initial_cluster: str | None, state: str, *, force_new: bool = False) -> list[str]:
        tls = self.tls_dir
        args = [
            binary,
            "--name", self.name,
            "--data-dir", str(self.member_dir),
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--initial-cluster-token", self.cluster_token,
            "--peer-cert-file", str(tls / "peer.crt"),
            "--peer-key-file", str(tls / "peer.key"),
            "--peer-trusted-ca-file", str(tls / "ca.crt"),
            "--peer-client-cert-auth",
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
            "--pre-vote",
            # The strict check refuses any member change for 5 s after the last
            # one; learners do not count for quorum, and the autopilot keeps
            # quorum itself when it removes a voter (etcd still refuses to
            # promote a learner that has not caught up).
            "--strict-reconfig-check=false",
            "--auto-compaction-mode", "revision",
            "--auto-compaction-retention", "1000",
            "--snapshot-count", "5000",
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip
        if initial_cluster is not None:
            args += ["--initial-cluster", initial_cluster, "--initial-cluster-state", state]
        if force_new:
            args.append("--force-new-cluster")
        return args

    def write_tls(self, ca: ClusterCA, now: dt.datetime) -> None:
        """The CA certificate and this member's peer certificate (key kept across restarts)."""
        tls = self.tls_dir
        tls.mkdir(mode=0o700, exist_ok=True)
        key_path = tls / "peer.key"
        key_pem = key_path.read_bytes() if key_path.exists() else None
        # etcd checks a peer's client certificate against the address it
        # connects from; on one machine that is 127.0.0.1, not the node's address.
        ips = tuple(dict.fromkeys((self.addr, "127.0.0.1")))
        pem = ca.issue(self.name, ips=ips, now=now, key_pem=key_pem)
        _write_private(tls / "ca.crt", ca.cert_pem)
        _write_private(tls / "peer.crt", pem.cert)
        _write_private(key_path, pem.key)

    def wipe(self) -> None:
        """Forget this member (it was removed from the cluster, or its cluster is gone)."""
        self.marker.unlink(missing_ok=True)
        shutil.rmtree(self.member_dir, ignore_errors=True)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def find_etcd(binary: str) -> str:
    return find_binary(binary, "etcd", "etcd-server")


def stop_stale(settings: EtcdSettings) -> None:
    """Kill an etcd left running by an agent that died without stopping it."""
    kill_stale(settings.pid_path, b"etcd", settings.member_dir)


def log_tail(settings: EtcdSettings, size: int = 4000) -> str:
    try:
        with open(settings.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def was_removed(tail: str) -> bool:
    return any(marker in tail for marker in REMOVED_MARKERS)


async def run_member(
    settings: EtcdSettings,
    args: list[str],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run etcd once until it exits (its exit status) or until cancelled (then it is
    stopped: SIGTERM, a grace period, SIGKILL, shielded)."""
    proc = await spawn(args, settings.log_path, settings.pid_path)
    try:
        task_status.started(proc.pid)
        return await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            await stop(proc, signal.SIGTERM, STOP_GRACE_S, settings.pid_path)
