"""The one error tree: every public exception of flynnp2p is a FlynnError, and
the API answers each with its ``status`` through the one handler of the app.

The tree is read from the code (every exception class defined in a flynnp2p
module), so an error type added outside the tree fails here unless it is one
of the private control-flow exceptions that `flynnp2p.errors` names.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest
from quart import Blueprint

import flynnp2p
from flynnp2p.api.app import create_app
from flynnp2p.coord.client import CoordError
from flynnp2p.errors import ClusterError, FlynnError, InsufficientStorage, UserError
from flynnp2p.gossip.codec import LocalProtocolError, RemoteProtocolError, SerfError
from flynnp2p.gossip.rpc import SerfAuthError, SerfCommandError, SerfConnectionError
from flynnp2p.state.errors import (
    RecordError,
    SchemaVersionError,
    StaleReplicaError,
    StateError,
    StoreError,
    StoreFullError,
)
from flynnp2p.token import ClusterToken

# Control flow inside one component, never raised to a caller of it (see the
# docstring of flynnp2p.errors, which names each of them and says why).
OUTSIDE_THE_TREE = {
    "flynnp2p.host.prepare.StartFailed",
    "flynnp2p.host.health.HealthTimeout",
    "flynnp2p.router.proxy._Refused",
    "flynnp2p.router.proxy._ClientGone",
    "flynnp2p.router.proxy._UpstreamFailed",
    "flynnp2p.router.http1.HeadersTooLarge",
    "flynnp2p.router.sock.ConnectError",
    "flynnp2p.build.githttp.CgiError",
    "flynnp2p.state.transport.PeerRefused",
    "flynnp2p.leader.Deposed",
}


def exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(flynnp2p.__path__, "flynnp2p."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_exception_of_flynnp2p_is_in_the_tree_or_named_as_outside_it() -> None:
    classes = exception_classes()
    assert "flynnp2p.state.errors.StoreFullError" in classes  # the walk found the modules
    outside = {name for name, cls in classes.items() if not issubclass(cls, FlynnError)}
    assert outside == OUTSIDE_THE_TREE


def test_the_other_roots_are_branches_of_the_one_tree() -> None:
    assert issubclass(StateError, FlynnError) and issubclass(SerfError, ClusterError)
    assert issubclass(CoordError, ClusterError)
    assert issubclass(RecordError, ValueError)  # validation stays a ValueError too
    assert not issubclass(RecordError, UserError)  # a peer's bad delta is no user's mistake
    assert issubclass(StoreFullError, StoreError)


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (RecordError("app.name", "expected a name"), 400, "bad_request"),
        (SchemaVersionError("app", "schema 9"), 400, "bad_request"),
        (StoreFullError("disk full"), InsufficientStorage.status, InsufficientStorage.code),
        (StoreError("corrupt"), 500, "internal"),
        (StaleReplicaError("reset"), 500, "internal"),
        (SerfConnectionError("serf is down"), 503, "unavailable"),
        (SerfCommandError("tags", "nope"), 503, "unavailable"),
        (SerfAuthError("auth", "bad key"), 503, "unavailable"),
        (RemoteProtocolError("garbage"), 503, "unavailable"),
        (LocalProtocolError("a bug"), 500, "internal"),
    ],
)
def test_status_and_code(exc: FlynnError, status: int, code: str) -> None:
    assert (exc.status, exc.code) == (status, code)
    assert exc.message == str(exc)


def test_errors_stays_a_leaf_module() -> None:
    code = "import sys, flynnp2p.errors; print(sorted(m for m in sys.modules if m.startswith('flynnp2p')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['flynnp2p', 'flynnp2p.errors']"


# -- the API answers each with its status -----------------------------------------

TOKEN = ClusterToken.generate()
USER = {"Authorization": f"Bearer {TOKEN.api_key}"}


@dataclass
class Node:
    token: ClusterToken = TOKEN
    ready: bool = True

    def status(self) -> dict[str, Any]:
        return {}

    def members(self) -> list[dict[str, Any]]:
        return []


RAISED: dict[str, Exception] = {
    "record": RecordError("release.processes.web.memory_mb", "expected 1-65536, got 0"),
    "full": StoreFullError("/data/state/state.sqlite3: the disk is full"),
    "store": StoreError("/data/state is in use by another flynnp2p process"),
    "serf": SerfConnectionError("connection to serf at 127.0.0.1:7373 lost"),
    "bug": LocalProtocolError("stop of seq 3, which is not an open stream"),
}


async def answer(kind: str) -> tuple[int, Any]:
    app = create_app(Node())
    bp = Blueprint("raiser", __name__)

    async def raiser() -> None:
        raise RAISED[kind]

    bp.add_url_rule("/v1/raise", "raise", raiser, methods=["GET"])
    app.register_blueprint(bp)
    resp = await app.test_client().get("/v1/raise", headers=USER)
    return resp.status_code, json.loads(await resp.get_data())


async def test_a_record_error_is_a_400_naming_the_field() -> None:
    assert await answer("record") == (400, {"error": {
        "code": "bad_request",
        "message": "release.processes.web.memory_mb: expected 1-65536, got 0",
    }})  # fmt: skip


async def test_a_full_store_is_a_507() -> None:
    status, body = await answer("full")
    assert status == 507 and body["error"]["code"] == "insufficient_storage"


async def test_serf_unavailable_is_a_503() -> None:
    assert await answer("serf") == (503, {"error": {
        "code": "unavailable", "message": "connection to serf at 127.0.0.1:7373 lost",
    }})  # fmt: skip


@pytest.mark.parametrize("kind", ["store", "bug"])
async def test_a_500_in_the_tree_names_no_internals(kind: str) -> None:
    assert await answer(kind) == (500, {"error": {
        "code": "internal", "message": "internal error (see the node's log)",
    }})  # fmt: skip
