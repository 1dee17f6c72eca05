from __future__ import annotations

import random
import socket
from collections.abc import Iterator

import pytest

from flynnp2p.errors import ClusterError, ConfigError
from flynnp2p.host.ports import PortAllocator, _random_order


class PortBlock:
    """``n`` consecutive ports, each bound on 0.0.0.0 by a socket this test holds.

    Holding every port of the range keeps other processes out of it; a test frees
    the ports it wants the allocator to find.
    """

    def __init__(self, n: int) -> None:
        rng = random.Random()
        for _ in range(200):
            # Below the allocator's default range and the kernel's ephemeral range.
            self.lo = rng.randrange(10000, 20000 - n)
            self.hi = self.lo + n - 1
            self._socks: dict[int, socket.socket] = {}
            try:
                for port in range(self.lo, self.hi + 1):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    self._socks[port] = sock
                    sock.bind(("0.0.0.0", port))
                return
            except OSError:
                self.close()
        raise RuntimeError(f"found no {n} consecutive free ports")

    def free(self, *ports: int) -> None:
        for port in ports:
            self._socks.pop(port).close()

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()


@pytest.fixture
def block5() -> Iterator[PortBlock]:
    block = PortBlock(5)
    try:
        yield block
    finally:
        block.close()


def test_allocates_the_only_free_port_in_range(block5: PortBlock) -> None:
    free = block5.lo + 2
    block5.free(free)
    alloc = PortAllocator(block5.lo, block5.hi)
    assert alloc.allocate("job-a") == free
    assert alloc.held() == {"job-a": free}


def test_allocating_again_for_the_same_job_returns_its_port(block5: PortBlock) -> None:
    block5.free(block5.lo, block5.lo + 1)
    alloc = PortAllocator(block5.lo, block5.hi, rng=random.Random(7))
    port = alloc.allocate("job-a")
    assert alloc.allocate("job-a") == port
    assert alloc.held() == {"job-a": port}


def test_a_port_held_by_another_job_is_not_handed_out_though_bindable(
    block5: PortBlock,
) -> None:
    block5.free(block5.hi)
    alloc = PortAllocator(block5.lo, block5.hi)
    assert alloc.allocate("job-a") == block5.hi
    with pytest.raises(ClusterError, match=f"no free TCP port in {block5.lo}-{block5.hi}"):
        alloc.allocate("job-b")
    alloc.release("job-a")
    assert alloc.allocate("job-b") == block5.hi
    assert alloc.held() == {"job-b": block5.hi}


def test_every_port_of_the_range_is_used_before_running_out(block5: PortBlock) -> None:
    ports = list(range(block5.lo, block5.hi + 1))
    block5.free(*ports)
    alloc = PortAllocator(block5.lo, block5.hi, bind_addrs=("127.0.0.1",))
    got = [alloc.allocate(f"job-{i}") for i in range(5)]
    assert sorted(got) == ports
    with pytest.raises(ClusterError) as info:
        alloc.allocate("job-5")
    assert info.value.status == 503
    assert "5 held by jobs on this host" in info.value.message


def test_exhausted_when_other_processes_hold_every_port(block5: PortBlock) -> None:
    alloc = PortAllocator(block5.lo, block5.hi)
    with pytest.raises(ClusterError, match="0 held by jobs on this host"):
        alloc.allocate("job-a")
    assert alloc.held() == {}


def test_a_port_bound_on_one_address_is_busy_for_the_wildcard(block5: PortBlock) -> None:
    block5.free(block5.lo)
    with socket.socket() as loopback_only:
        loopback_only.bind(("127.0.0.1", block5.lo))
        with pytest.raises(ClusterError):
            PortAllocator(block5.lo, block5.hi).allocate("job-a")


def test_every_bind_address_must_be_free(block5: PortBlock) -> None:
    block5.free(block5.lo)
    with socket.socket() as other:
        other.bind(("127.0.0.2", block5.lo))
        alloc = PortAllocator(block5.lo, block5.hi, bind_addrs=("127.0.0.1", "127.0.0.2"))
        with pytest.raises(ClusterError):
            alloc.allocate("job-a")
    assert alloc.allocate("job-a") == block5.lo


def test_reserve_keeps_the_port_of_a_readopted_job(block5: PortBlock) -> None:
    p0, p1 = block5.lo, block5.lo + 1
    block5.free(p0, p1)
    alloc = PortAllocator(block5.lo, block5.hi)
    alloc.reserve("old", p0)
    assert alloc.allocate("new") == p1
    assert alloc.allocate("old") == p0
    assert alloc.held() == {"old": p0, "new": p1}


def test_reserve_needs_no_free_port_and_may_lie_outside_the_range(block5: PortBlock) -> None:
    alloc = PortAllocator(block5.lo, block5.hi)
    alloc.reserve("old", block5.lo)  # bound by the test: the job's own socket
    alloc.reserve("older", 8080)
    assert alloc.held() == {"old": block5.lo, "older": 8080}


def test_reserve_refuses_a_port_held_by_another_job() -> None:
    alloc = PortAllocator(20000, 20010)
    alloc.reserve("a", 20005)
    alloc.reserve("a", 20005)  # idempotent
    with pytest.raises(ClusterError, match="port 20005 is already held by job a"):
        alloc.reserve("b", 20005)
    assert alloc.held() == {"a": 20005}


def test_reserve_moves_a_job_to_its_recorded_port() -> None:
    alloc = PortAllocator(20000, 20010)
    alloc.reserve("a", 20001)
    alloc.reserve("a", 20002)
    alloc.reserve("b", 20001)  # a no longer holds it
    assert alloc.held() == {"a": 20002, "b": 20001}


def test_release_is_idempotent() -> None:
    alloc = PortAllocator(20000, 20010)
    alloc.reserve("a", 20001)
    alloc.release("a")
    alloc.release("a")
    alloc.release("never-held")
    assert alloc.held() == {}


def test_held_is_a_copy() -> None:
    alloc = PortAllocator(20000, 20010)
    alloc.reserve("a", 20001)
    alloc.held()["b"] = 20002
    assert alloc.held() == {"a": 20001}


def test_an_address_this_machine_cannot_bind_is_a_config_error() -> None:
    alloc = PortAllocator(20000, 20010, bind_addrs=("192.0.2.1",))  # TEST-NET-1
    with pytest.raises(ConfigError, match=r"cannot bind TCP port \d+ on 192\.0\.2\.1"):
        alloc.allocate("job-a")


@pytest.mark.parametrize(
    ("lo", "hi", "addrs"),
    [(0, 10, ("0.0.0.0",)), (10, 9, ("0.0.0.0",)), (1, 65536, ("0.0.0.0",)), (1, 2, ())],
)
def test_bad_arguments_are_refused(lo: int, hi: int, addrs: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        PortAllocator(lo, hi, bind_addrs=addrs)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 7, 12, 97, 100, 1000])
def test_random_order_visits_every_port_exactly_once(n: int) -> None:
    for seed in range(20):
        order = list(_random_order(5000, 5000 + n - 1, random.Random(seed)))
        assert sorted(order) == list(range(5000, 5000 + n))


def test_random_order_depends_on_the_rng() -> None:
    orders = {tuple(_random_order(1, 1000, random.Random(seed)))[:5] for seed in range(10)}
    assert len(orders) == 10
    first = list(_random_order(1, 1000, random.Random(3)))
    assert first == list(_random_order(1, 1000, random.Random(3)))
