"""The app commands of the CLI against a real API served on 127.0.0.1 (port 0).

The server (the real app and blueprint over a `StateService` with a `MemoryStore`)
runs in its own thread with its own trio loop, for the whole module; each test
uses its own app names.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import queue
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from flynnp2p.api.server import ApiServer
from flynnp2p.cli.main import main
from tests.certs import make_cert
from tests.test_api_apps import TOKEN, Clock, Ctx, make_app, start_service


def serve(started: queue.Queue[str], stop: threading.Event) -> None:
    async def run() -> None:
        async with trio.open_nursery() as nursery:
            service = await start_service(nursery)
            server = ApiServer(make_app(Ctx(service, Clock())), "127.0.0.1", 0)
            sockets = server.bind()
            port = sockets.insecure_sockets[0].getsockname()[1]
            await nursery.start(server.run, sockets)
            started.put(f"http://127.0.0.1:{port}")
            await trio.to_thread.run_sync(stop.wait)
            nursery.cancel_scope.cancel()

    trio.run(run)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    started: queue.Queue[str] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(started, stop))
    thread.start()
    try:
        yield started.get(timeout=10)
    finally:
        stop.set()
        thread.join(timeout=10)


@pytest.fixture
def cli(
    server_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Any:
    monkeypatch.setenv("FLYNNP2P_URL", server_url)
    monkeypatch.setenv("FLYNNP2P_TOKEN", TOKEN.encode())
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)  # not a git checkout: no app is inferred

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def as_json(out: str) -> Any:
    return json.loads(out)


def test_create_list_info(cli: Any) -> None:
    code, out, _ = cli("create", "shop")
    assert code == 0
    assert "created app shop" in out and "http://shop.flynnp2p.localhost" in out
    assert "release add -a shop --slug" in out
    code, out, _ = cli("apps")
    assert code == 0 and out.splitlines()[0].split() == ["NAME", "ID", "CREATED"]
    assert any(line.startswith("shop ") for line in out.splitlines())
    code, out, _ = cli("apps", "--json")
    assert "shop" in [a["name"] for a in as_json(out)["apps"]]
    code, out, _ = cli("info", "-a", "shop")
    assert code == 0 and "name:      shop" in out and "route:     http shop.flynnp2p.localhost" in out
    code, out, _ = cli("info", "-a", "shop", "--json")
    assert as_json(out)["app"]["name"] == "shop"


def test_create_generates_a_name_and_refuses_a_taken_one(cli: Any) -> None:
    code, out, _ = cli("create", "--json")
    assert code == 0
    name = as_json(out)["app"]["name"]
    code, out, err = cli("create", name)
    assert code == 1 and out == ""
    assert err.startswith("flynnp2p: error: ") and "409" in err and "already exists" in err
    assert len(err.splitlines()) == 1


def test_bad_input_is_one_line_without_traceback(cli: Any) -> None:
    code, _, err = cli("create", "Bad_Name")
    assert code == 1 and "name: expected" in err and "Traceback" not in err
    code, _, err = cli("info", "-a", "missing-app")
    assert code == 1 and "no app named 'missing-app'" in err


def test_no_app_and_no_git_remote(cli: Any) -> None:
    code, _, err = cli("info")
    assert code == 2 and "no app: pass -a APP" in err


def test_the_app_comes_from_the_flynnp2p_git_remote(cli: Any, tmp_path: Path) -> None:
    cli("create", "from-git")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(
        ["git", "-C", str(tmp_path), "remote", "add", "flynnp2p", "http://n1:7100/git/from-git.git"],
        check=True,
    )
    code, out, _ = cli("info", "--json")
    assert code == 0 and as_json(out)["app"]["name"] == "from-git"
    code, out, _ = cli("info", "-a", "shop-missing")  # -a wins over the remote
    assert code == 1


def test_env_set_get_unset(cli: Any) -> None:
    cli("create", "envapp")
    # (-n: this API server runs no leader duties, so no deploy would finish)
    code, out, _ = cli("env", "-a", "envapp", "set", "-n", "A=1", "B=x=y")
    assert code == 0 and out.startswith("set A, B (new release ")
    code, out, _ = cli("env", "-a", "envapp")
    assert out.splitlines() == ["A=1", "B=x=y"]
    code, out, _ = cli("env", "get", "-a", "envapp", "B")
    assert code == 0 and out == "x=y\n"
    code, out, _ = cli("env", "-a", "envapp", "unset", "-n", "A")
    assert code == 0
    code, out, _ = cli("env", "-a", "envapp", "--json")
    assert as_json(out)["env"] == {"B": "x=y"}
    code, _, err = cli("env", "-a", "envapp", "get", "A")
    assert code == 1 and "A is not set" in err
    code, _, err = cli("env", "-a", "envapp", "set", "NOEQUALS")
    assert code == 2 and "NAME=VALUE" in err


def test_releases_and_scale(cli: Any, server_url: str) -> None:
    cli("create", "scaled")
    code, out, err = cli("scale", "-a", "scaled", "web=1")
    assert code == 1 and "create a release first" in err
    # A release with processes, as a build would make it.
    r = httpx.post(
        f"{server_url}/v1/apps/scaled/releases",
        json={"processes": {"web": {"command": "serve"}, "worker": {"command": "work"}}},
        headers={"Authorization": f"Bearer {TOKEN.api_key}"},
    )
    assert r.status_code == 201
    rid = r.json()["release"]["id"]
    code, out, _ = cli("release", "-a", "scaled")
    assert code == 0 and re.search(rf"^\* v1 +{rid} ", out, re.M) and "web,worker" in out
    code, out, _ = cli("release", "-a", "scaled", "show", rid)
    assert "process:   web: serve" in out and "version:   v1" in out
    code, out, _ = cli("scale", "-a", "scaled", "-n", "web=2")
    assert code == 0 and out.splitlines() == ["TYPE  COUNT  TAGS", "web   2      -", "", f"release: {rid}"]
    code, out, _ = cli("scale", "-a", "scaled", "-n", "worker=1", "--json")
    assert as_json(out)["formation"]["processes"] == {"web": 2, "worker": 1}  # merged
    code, _, err = cli("scale", "-a", "scaled", "clock=1")
    assert code == 1 and "web, worker" in err
    code, _, err = cli("scale", "-a", "scaled", "web=-1")
    assert code == 2 and "TYPE=COUNT" in err


def test_routes(cli: Any) -> None:
    cli("create", "routed")
    code, out, _ = cli("route", "-a", "routed", "add", "http", "routed.example.com/api")
    assert code == 0 and "http routed.example.com/api" in out
    code, out, _ = cli("route", "add", "-a", "routed", "tcp", "7001", "--json")
    route_id = as_json(out)["route"]["id"]
    code, _, err = cli("route", "-a", "routed", "add", "tcp", "7001")
    assert code == 1 and "409" in err and "tcp port 7001" in err
    code, out, _ = cli("route", "-a", "routed")
    assert ":7001" in out and "routed.example.com/api" in out
    code, out, _ = cli("route", "-a", "routed", "remove", route_id)
    assert code == 0
    code, out, _ = cli("route", "-a", "routed", "--json")
    assert route_id not in [r["id"] for r in as_json(out)["routes"]]


def test_route_options_tcp_without_a_port_and_certificates(cli: Any, tmp_path: Any) -> None:
    cli("create", "secured")
    code, out, _ = cli("route", "-a", "secured", "add", "tcp", "--json")
    assert code == 0 and 3000 <= as_json(out)["route"]["port"] <= 3500
    # The test cluster's clock starts at 2023-11-14 (tests.test_api_apps.Clock).
    cert, key = make_cert("secure.example.com", days=(-1, 3650), at=dt.datetime.fromtimestamp(1_700_000_000, dt.UTC))
    (tmp_path / "c.pem").write_text(cert)
    (tmp_path / "k.pem").write_text(key)
    code, out, _ = cli(
        "route", "-a", "secured", "add", "http", "secure.example.com", "--cert", str(tmp_path / "c.pem"),
        "--key", str(tmp_path / "k.pem"), "--https-only", "--sticky", "--json",
    )  # fmt: skip
    made = as_json(out)["route"]
    assert code == 0 and made["https_only"] and made["sticky"] and made["certificate_id"]
    code, out, _ = cli("route", "-a", "secured")
    row = next(line.split() for line in out.splitlines() if "secure.example.com" in line)
    assert out.split("\n")[0].split()[-3:] == ["STICKY", "HTTPS_ONLY", "CERT"] and row[-3:] == ["yes", "yes", "own"]
    code, _, err = cli("route", "-a", "secured", "add", "http", "x.example.com", "--cert", str(tmp_path / "c.pem"))
    assert code != 0 and "--cert and --key come together" in err
    code, _, err = cli(
        "route", "-a", "secured", "add", "http", "other.example.com", "--cert", str(tmp_path / "c.pem"),
        "--key", str(tmp_path / "k.pem"),
    )  # fmt: skip
    assert code == 1 and "cert: is for secure.example.com, not for other.example.com" in err
    code, _, err = cli("route", "-a", "secured", "add", "http", "y.example.com", "--cert", "/nonexistent", "--key", "/x")
    assert code != 0 and "--cert /nonexistent: cannot read it" in err


def test_delete_asks_for_the_name(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cli("create", "doomed")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal
    code, _, err = cli("delete", "-a", "doomed")
    assert code == 2 and "pass -y" in err

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Tty("wrong\n"))
    code, _, err = cli("delete", "-a", "doomed")
    assert code == 2 and "nothing deleted" in err
    monkeypatch.setattr("sys.stdin", Tty("doomed\n"))
    code, out, _ = cli("delete", "-a", "doomed")
    assert code == 0 and "deleted app doomed" in out
    code, _, _ = cli("info", "-a", "doomed")
    assert code == 1


def test_delete_with_yes(cli: Any) -> None:
    cli("create", "quick")
    code, out, _ = cli("delete", "-a", "quick", "-y")
    assert code == 0 and "deleted app quick (1 route(s))" in out


def test_an_api_key_beginning_with_a_dash_is_taken_as_the_tokens_value() -> None:
    from flynnp2p.cli.main import build_parser, joined_secrets

    key = "-" + "A1_b" * 10 + "xyz"  # 43 characters, as base64url keys are
    argv = ["cluster", "add", "k", "--url", "http://127.0.0.1:1", "--token", key]
    with pytest.raises(SystemExit):  # what argparse alone makes of it
        build_parser().parse_args(argv)
    args = build_parser().parse_args(joined_secrets(argv))
    assert args.token == key and args.url == "http://127.0.0.1:1"
    assert joined_secrets(["--token", "--url"]) == ["--token", "--url"]  # an option stays one
