"""Cut traffic between two groups of agents with iptables (root only).

Serf sends UDP from its bound address but dials TCP from 127.0.0.1, so
addresses alone cannot tell who sent a packet on loopback.  Each agent of a
partition test runs with its own group id (``Cluster.start(own_gids=True)``):
the mangle table marks what one side's processes send to the other side's
addresses, and INPUT drops marked packets.  Dropping in OUTPUT would not do:
the sender would get EPERM at once, and memberlist treats a failed send as its
own problem, not as a dead peer.  The test process (root, its own group) still
reaches every node's API.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from types import TracebackType

from tests.harness import AgentProc

# Unique per test process: two suites on one machine must not share chains or marks.
_ids = itertools.count(0x10000 + (os.getpid() % 60000) * 64)


def _ipt(*args: str, check: bool = True) -> None:
    subprocess.run(["iptables", "-w", *args], check=check, capture_output=True)


class Partition:
    def __init__(self, side_a: list[AgentProc], side_b: list[AgentProc]) -> None:
        assert all(a.gid is not None for a in side_a + side_b), "start agents with own_gids=True"
        self.side_a, self.side_b = side_a, side_b
        self.mark = next(_ids)
        self.chain = f"F2P_PART_{self.mark:x}"

    def __enter__(self) -> Partition:
        _ipt("-t", "mangle", "-N", self.chain)
        for src, dst in ((self.side_a, self.side_b), (self.side_b, self.side_a)):
            for a in src:
                for b in dst:
                    _ipt("-t", "mangle", "-A", self.chain, "-m", "owner", "--gid-owner", str(a.gid),
                         "-d", b.addr, "-j", "MARK", "--set-mark", str(self.mark))
        _ipt("-t", "mangle", "-I", "OUTPUT", "-j", self.chain)
        _ipt("-I", "INPUT", "-m", "mark", "--mark", str(self.mark), "-j", "DROP")
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        _ipt("-D", "INPUT", "-m", "mark", "--mark", str(self.mark), "-j", "DROP", check=False)
        _ipt("-t", "mangle", "-D", "OUTPUT", "-j", self.chain, check=False)
        _ipt("-t", "mangle", "-F", self.chain, check=False)
        _ipt("-t", "mangle", "-X", self.chain, check=False)
