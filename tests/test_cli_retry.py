"""The CLI client retries a 503 when repeating the request is safe (unit tests).

The network is an `httpx.MockTransport` playing a cluster whose leader changes;
the pauses go to a fake `sleep` that adds them up instead of waiting.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable

import httpx
import pytest

from flynnp2p.cli.client import IDEMPOTENCY_KEY, RETRY_DELAYS_S, ApiClient
from flynnp2p.errors import UNTOUCHED_HEADER, FlynnError
from flynnp2p.token import ClusterToken

TOKEN = ClusterToken.generate()
LEADER_CHANGE = {"error": {"code": "unavailable", "message": "the cluster has no leader right now"}}


class FlakyCluster:
    """Answers the given statuses in turn (then 200 forever), and records requests;
    -503 is a 503 that says the cluster did nothing (`UNTOUCHED_HEADER`)."""

    def __init__(self, statuses: Iterable[int]) -> None:
        self.statuses = list(statuses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status = self.statuses.pop(0) if self.statuses else 200
        if status in (503, -503):
            untouched = {UNTOUCHED_HEADER: "1"} if status < 0 else {}
            return httpx.Response(503, json=LEADER_CHANGE, headers=untouched)
        if status >= 400:
            return httpx.Response(status, json={"error": {"code": "x", "message": f"status {status}"}})
        return httpx.Response(status, json={"ok": True, "attempt": len(self.requests)})


class Waits:
    def __init__(self) -> None:
        self.total = 0.0

    def __call__(self, seconds: float) -> None:
        self.total += seconds


def client(cluster: FlakyCluster, waits: Waits) -> ApiClient:
    return ApiClient(
        "http://127.0.0.1:7100", TOKEN.encode(), transport=httpx.MockTransport(cluster), sleep=waits
    )


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_a_safe_request_outlasts_a_leader_change(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    cluster, waits = FlakyCluster([503, 503, 503]), Waits()
    body = client(cluster, waits).request(method, "/v1/apps/a/formation")
    assert body == {"ok": True, "attempt": 4}
    assert waits.total == sum(RETRY_DELAYS_S[:3])
    assert capsys.readouterr() == ("", "")  # nothing extra on success


def test_a_create_is_retried_with_one_idempotency_key() -> None:
    cluster, waits = FlakyCluster([503, 503]), Waits()
    api = client(cluster, waits)
    assert api.create("/v1/apps", json={"name": "web"}) == {"ok": True, "attempt": 3}
    keys = {r.headers[IDEMPOTENCY_KEY] for r in cluster.requests}
    assert len(cluster.requests) == 3 and len(keys) == 1
    uuid.UUID(keys.pop())  # a uuid
    assert all(json.loads(r.content) == {"name": "web"} for r in cluster.requests)
    assert all(r.method == "POST" and r.url.path == "/v1/apps" for r in cluster.requests)

    api.create("/v1/apps/web/routes", json={"type": "tcp", "port": 5432})
    assert cluster.requests[-1].headers[IDEMPOTENCY_KEY] not in keys  # another create, another key


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_a_write_that_cannot_be_repeated_is_sent_once(method: str) -> None:
    cluster, waits = FlakyCluster([503]), Waits()
    with pytest.raises(FlynnError) as caught:
        client(cluster, waits).request(method, "/v1/apps/a/releases", json={})
    assert caught.value.status == 503 and len(cluster.requests) == 1 and waits.total == 0
    assert IDEMPOTENCY_KEY not in cluster.requests[0].headers


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_a_write_the_cluster_did_nothing_with_is_sent_again(method: str) -> None:
    cluster, waits = FlakyCluster([-503, -503]), Waits()
    assert client(cluster, waits).request(method, "/v1/apps/a/deploy", json={}) == {
        "ok": True, "attempt": 3,
    }  # fmt: skip
    assert waits.total == sum(RETRY_DELAYS_S[:2])
    # ... until a 503 that may come after the write: that one is the answer
    cluster, waits = FlakyCluster([-503, 503]), Waits()
    with pytest.raises(FlynnError) as caught:
        client(cluster, waits).request(method, "/v1/apps/a/deploy", json={})
    assert caught.value.status == 503 and len(cluster.requests) == 2


def test_it_gives_up_after_about_ten_seconds_with_the_last_answer() -> None:
    cluster, waits = FlakyCluster([503] * 100), Waits()
    with pytest.raises(FlynnError) as caught:
        client(cluster, waits).get("/v1/status")
    assert caught.value.status == 503
    assert caught.value.message == "http://127.0.0.1:7100 answered 503: the cluster has no leader right now"
    assert 8.0 <= waits.total <= 11.0
    assert len(cluster.requests) == len(RETRY_DELAYS_S) + 1


@pytest.mark.parametrize("status", [400, 404, 409, 500, 502])
def test_other_errors_are_not_retried(status: int) -> None:
    cluster, waits = FlakyCluster([status]), Waits()
    with pytest.raises(FlynnError) as caught:
        client(cluster, waits).get("/v1/apps/a")
    assert caught.value.status == status and len(cluster.requests) == 1 and waits.total == 0
