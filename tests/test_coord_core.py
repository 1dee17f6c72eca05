"""The pure and nearly-pure parts of coord: autopilot plans, the cluster CA,
claims and release counters (on the in-memory store), the leader's term
bounded by its own clock (MockClock, exact virtual times)."""

from __future__ import annotations

import datetime as dt
import json
import ssl
import tempfile
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509

from flynnp2p.coord.autopilot import initial_cluster, plan_membership, stale_identities
from flynnp2p.coord.ca import ClusterCA
from flynnp2p.coord.claims import Claims, app_key, owner_value
from flynnp2p.coord.client import KV, CoordError, EtcdMember
from flynnp2p.coord.election import LEADER_KEY, LeaderElection
from flynnp2p.token import ClusterToken
from tests.fake_etcd import MemoryEtcd


def m(mid: int, name: str, learner: bool = False) -> EtcdMember:
    return EtcdMember(mid, name, (f"https://10.0.0.{mid}:2380",), (), learner)


# -- autopilot ------------------------------------------------------------------

PLAN = {"self_name": "a", "voters_wanted": 3, "dead_after_s": 30.0}


@pytest.mark.parametrize(
    ("members", "statuses", "down_for", "expected"),
    [
        # a healthy learner is promoted while voters are missing
        ([m(1, "a"), m(2, "b", True)], {"a": "alive", "b": "alive"}, {}, ("promote", "b")),
        # enough voters: the learner stays a learner
        ([m(1, "a"), m(2, "b"), m(3, "c"), m(4, "d", True)],
         dict.fromkeys("abcd", "alive"), {}, None),
        # a failed learner is not promoted
        ([m(1, "a"), m(2, "b", True)], {"a": "alive", "b": "failed"}, {"b": 5.0}, None),
        # a voter that left is removed
        ([m(1, "a"), m(2, "b"), m(3, "c")], {"a": "alive", "b": "alive", "c": "left"}, {}, ("remove", "c")),
        # a voter failed for less than the timeout stays
        ([m(1, "a"), m(2, "b"), m(3, "c")], {"a": "alive", "b": "alive", "c": "failed"}, {"c": 29.0}, None),
        # ... and is removed once past it
        ([m(1, "a"), m(2, "b"), m(3, "c")], {"a": "alive", "b": "alive", "c": "failed"}, {"c": 31.0},
         ("remove", "c")),
        # never when the voters left alive would not be a majority of those staying
        ([m(1, "a"), m(2, "b"), m(3, "c")], {"a": "alive", "b": "failed", "c": "failed"},
         {"b": 99.0, "c": 99.0}, None),
        # the leader never removes itself
        ([m(1, "a"), m(2, "b"), m(3, "c")], {"a": "left", "b": "alive", "c": "alive"}, {}, None),
        # a member serf does not know yet (just joining) stays ...
        ([m(1, "a"), m(2, "b"), m(3, "c"), m(4, "x", True)], dict.fromkeys("abc", "alive"), {}, None),
        # ... and is removed once unknown for the timeout (learners first)
        ([m(1, "a"), m(2, "b"), m(3, "c"), m(4, "x", True)], dict.fromkeys("abc", "alive"), {"x": 31.0},
         ("remove", "x")),
        # a member added but never started goes after the timeout
        ([m(1, "a"), EtcdMember(9, "", ("https://10.0.0.9:2380",), (), True)], {"a": "alive"},
         {"url:https://10.0.0.9:2380": 31.0}, ("remove", "")),
    ],
)
def test_autopilot_changes_one_thing_at_a_time(
    members: list[EtcdMember], statuses: dict[str, str], down_for: dict[str, float],
    expected: tuple[str, str] | None,
) -> None:  # fmt: skip
    change = plan_membership(members, statuses, down_for, **PLAN)  # type: ignore[arg-type]
    assert (None if change is None else (change.action, change.name)) == expected


def test_initial_cluster_names_the_new_member_and_stale_identities_are_found() -> None:
    members = [m(2, "b"), EtcdMember(7, "", ("https://10.0.0.7:2380",), (), True), m(1, "a")]
    assert initial_cluster(members, 7, "new") == (
        "a=https://10.0.0.1:2380,b=https://10.0.0.2:2380,new=https://10.0.0.7:2380"
    )
    assert stale_identities(members, "b", "https://10.0.0.9:2380") == [members[0]]
    assert stale_identities(members, "z", "https://10.0.0.7:2380") == [members[1]]


# -- the cluster CA -------------------------------------------------------------


def test_every_node_derives_the_same_ca_and_any_copy_verifies_any_leaf() -> None:
    token = ClusterToken.generate()
    one, two = ClusterCA(token.cluster_id, token.admin_secret), ClusterCA(token.cluster_id, token.admin_secret)
    assert one.fingerprint == two.fingerprint
    other = ClusterToken.generate()
    assert ClusterCA(other.cluster_id, other.admin_secret).fingerprint != one.fingerprint
    now = dt.datetime.now(dt.UTC)
    leaf = one.issue("n1", ips=("127.0.0.2",), now=now)
    cert = x509.load_pem_x509_certificate(leaf.cert)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(two.cert_pem))
    # a TLS server with that leaf is trusted by a client that holds the other copy
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "c.pem").write_bytes(leaf.cert)
        (Path(d) / "k.pem").write_bytes(leaf.key)
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(Path(d) / "c.pem", Path(d) / "k.pem")
    client = ssl.create_default_context(cadata=two.cert_pem.decode())
    assert client.get_ca_certs()[0]["subject"] == client.get_ca_certs()[0]["issuer"]


def test_a_leaf_keeps_its_key_when_reissued() -> None:
    token = ClusterToken.generate()
    ca = ClusterCA(token.cluster_id, token.admin_secret)
    now = dt.datetime.now(dt.UTC)
    first = ca.issue("n1", ips=("127.0.0.2",), now=now)
    again = ca.issue("n1", ips=("127.0.0.2",), now=now, key_pem=first.key)
    assert again.key == first.key and again.cert != first.cert


# -- claims and release counters --------------------------------------------------


async def test_a_claim_is_all_or_nothing_and_dropped_only_by_its_owner() -> None:
    claims = Claims(MemoryEtcd())
    mine, theirs = owner_value("a1", "k1", 1), owner_value("a2", None, 2)
    assert await claims.claim([app_key("web"), "f2p/claim/http/web.x/"], mine)
    assert not await claims.claim([app_key("api"), "f2p/claim/http/web.x/"], theirs)
    assert await claims.owner(app_key("api")) is None  # nothing of the failed claim stays
    owner = await claims.owner(app_key("web"))
    assert owner is not None and (owner.app_id, owner.idem) == ("a1", "k1")
    assert not await claims.drop(app_key("web"), theirs)
    await claims.drop_owned_by([app_key("web")], "a2")
    assert await claims.owner(app_key("web")) is not None
    await claims.drop_owned_by([app_key("web")], "a1")
    assert await claims.owner(app_key("web")) is None


async def test_release_numbers_advance_only_from_the_counter_seen() -> None:
    claims = Claims(MemoryEtcd())
    seen = await claims.release_counter("a1")
    assert (seen.number, seen.release_id) == (0, None)
    assert await claims.advance_release("a1", seen, "r1")
    assert not await claims.advance_release("a1", seen, "r-late")  # someone else went first
    now = await claims.release_counter("a1")
    assert (now.number, now.release_id) == (1, "r1")
    assert await claims.advance_release("a1", now, "r2")
    assert (await claims.release_counter("a1")).number == 2


# -- the leader's term, bounded by its own clock ----------------------------------


class LeaseStore:
    """One key and leases, as etcd's election needs them; renewals can be made to hang."""

    def __init__(self) -> None:
        self.kv: KV | None = None
        self.revision = 10
        self.leases: dict[int, int] = {}
        self.hang = False
        self.fail = False
        self.deleted = trio.Event()

    async def get(self, key: str) -> KV | None:
        if self.fail:
            raise CoordError("etcd did not answer in time (no quorum?)")
        return self.kv

    async def create(self, puts: dict[str, bytes | str], lease: int = 0) -> tuple[bool, int]:
        if self.kv is not None:
            return False, self.revision
        self.revision += 1
        value = puts[LEADER_KEY]
        raw = value.encode() if isinstance(value, str) else value
        self.kv = KV(LEADER_KEY, raw, self.revision, self.revision, lease)
        return True, self.revision

    async def grant(self, ttl_s: int) -> tuple[int, int]:
        lease = len(self.leases) + 1
        self.leases[lease] = ttl_s
        return lease, ttl_s

    async def keepalive(self, lease: int) -> int:
        if self.hang:
            await trio.sleep_forever()
        return self.leases.get(lease, 0)

    async def revoke(self, lease: int) -> None:
        self.leases.pop(lease, None)
        if self.kv is not None and self.kv.lease == lease:
            self.kv = None
            self.deleted.set()
            self.deleted = trio.Event()

    async def wait_deleted(self, key: str, from_revision: int) -> None:
        if self.kv is None or self.kv.mod_revision < from_revision - 1:
            return
        await self.deleted.wait()


async def test_a_leader_that_cannot_renew_steps_down_before_its_lease_runs_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = LeaseStore()
    election = LeaderElection(store, "n1", "127.0.0.2:7100", is_voter=lambda: True, ttl_s=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(election.run)
        await election.leadership.wait_change(0)
        start = trio.current_time()
        assert election.leadership.value.is_leader and election.leadership.value.epoch == 11
        assert json.loads(store.kv.value if store.kv else b"{}")["name"] == "n1"
        await trio.sleep(10)  # renewals succeed: still leading
        assert election.leadership.value.is_leader
        store.hang = True
        hung_at = trio.current_time()
        version = election.leadership.version
        await election.leadership.wait_change(version)
        stepped_down = trio.current_time() - hung_at
        assert not election.leadership.value.is_leader
        # The last renewal was sent at most renew_s before the hang; the term ends
        # at that send + TTL - margin: always before the TTL could run out.
        latest = election.ttl_s - election.margin_s
        assert latest - election.renew_s <= stepped_down <= latest + 1e-6, stepped_down
        assert start < hung_at
        nursery.cancel_scope.cancel()


async def test_a_voter_without_quorum_names_no_leader_and_a_lease_gone_ends_the_term(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = LeaseStore()
    election = LeaderElection(store, "n1", "api", is_voter=lambda: True)
    async with trio.open_nursery() as nursery:
        await nursery.start(election.run)
        await election.leadership.wait_change(0)
        store.leases.clear()  # etcd expired it (as after a long pause)
        await election.leadership.wait_change(election.leadership.version)
        assert not election.leadership.value.is_leader
        store.kv, store.fail = None, True
        await trio.sleep(1)
        view = election.view.value
        assert view.name is None and not view.quorum and "no quorum" in view.reason
        nursery.cancel_scope.cancel()


async def test_a_follower_takes_over_as_soon_as_the_leader_key_goes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = LeaseStore()
    await store.create({LEADER_KEY: '{"name": "n0", "api": "x"}'}, 99)
    election = LeaderElection(store, "n1", "api", is_voter=lambda: True, reread_s=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(election.run)
        await trio.sleep(5)
        assert election.view.value.name == "n0" and not election.leadership.value.is_leader
        gone = trio.current_time()
        await store.revoke(99)  # the old leader's lease is revoked (or expired)
        await election.leadership.wait_change(0)
        assert election.leadership.value.is_leader
        assert trio.current_time() - gone < 0.01  # the watch, not the 30 s re-read
        nursery.cancel_scope.cancel()


async def test_a_non_voter_never_campaigns(autojump_clock: trio.testing.MockClock) -> None:
    store = LeaseStore()
    election = LeaderElection(store, "n1", "api", is_voter=lambda: False)
    with trio.move_on_after(5):
        await election.run()
    assert store.kv is None and election.terms == 0


async def test_reconcile_claims_what_the_state_holds_and_drops_what_it_no_longer_does() -> None:
    from flynnp2p.coord.claims import tcp_key
    from flynnp2p.state.merge import Delete
    from flynnp2p.state.records import App, Route
    from tests.states import state_of

    etcd = MemoryEtcd()
    claims = Claims(etcd)
    old = App(id="a-old", name="web", created_at=1)
    dup = App(id="a-dup", name="web", created_at=2)  # the same name twice (old bug's data)
    gone = App(id="a-gone", name="gone", created_at=3)
    route = Route(id="r1", app_id="a-old", type="tcp", created_at=4, port=5432)
    await claims.claim(["f2p/claim/app/gone"], owner_value("a-gone", None, 10))
    await claims.claim(["f2p/claim/app/young"], owner_value("a-young", None, 10))  # not spread yet
    state = state_of(old, dup, gone, route, deleted=(Delete(App.KIND, "a-gone"),))
    await claims.reconcile(state, now_ms=20)
    held = {k: o.app_id for k, o in (await claims.owners()).items() if o}
    assert held == {
        app_key("web"): "a-old",  # the older record keeps the name
        tcp_key(5432): "a-old",
        "f2p/claim/app/young": "a-young",  # its creator may still be spreading it
    }  # and the deleted app's claim is gone
    await claims.reconcile(state, now_ms=10 + 120_001)
    assert "f2p/claim/app/young" not in await claims.owners()  # an orphan past the grace
