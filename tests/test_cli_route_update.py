"""`flynnp2p route update ID …` against a real API server (tests.test_cli_apps' fixtures)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from tests.certs import make_cert
from tests.test_cli_apps import as_json, cli, server_url

__all__ = ["cli", "server_url"]  # the fixtures


def test_route_update(cli: Any, tmp_path: Path) -> None:
    cli("create", "updated")
    code, out, _ = cli("route", "-a", "updated", "add", "http", "up.example.com/api", "--json")
    rid = as_json(out)["route"]["id"]
    code, out, err = cli("route", "-a", "updated", "update", rid, "--sticky", "--https-only", "-t", "worker",
                         "--path", "/v2")  # fmt: skip
    assert code == 0, err
    assert out.strip() == f"updated route {rid}: http up.example.com/v2 -> worker sticky https_only"
    code, out, _ = cli("route", "-a", "updated", "update", rid, "--no-sticky", "--json")
    route = as_json(out)["route"]
    assert (route["sticky"], route["https_only"], route["path"]) == (False, True, "/v2")
    code, out, _ = cli("route", "-a", "updated")
    row = next(line.split() for line in out.splitlines() if "up.example.com" in line)
    assert row[-3:] == ["-", "yes", "cluster"] and row[3] == "worker"
    # A certificate (the test cluster's clock starts at 2023-11-14).
    cert, key = make_cert(
        "up.example.com", days=(-1, 3650), at=dt.datetime.fromtimestamp(1_700_000_000, dt.UTC)
    )
    (tmp_path / "c.pem").write_text(cert)
    (tmp_path / "k.pem").write_text(key)
    code, out, err = cli("route", "-a", "updated", "update", rid, "--cert", str(tmp_path / "c.pem"),
                         "--key", str(tmp_path / "k.pem"))  # fmt: skip
    assert code == 0 and out.strip().endswith("own certificate"), err
    # Refused before or by the API, one line each.
    code, _, err = cli("route", "-a", "updated", "update", rid)
    assert code != 0 and "nothing to change" in err
    code, _, err = cli("route", "-a", "updated", "update", rid, "--cert", str(tmp_path / "c.pem"))
    assert code != 0 and "--cert and --key come together" in err
    code, out, _ = cli("route", "-a", "updated", "add", "tcp", "7002", "--json")
    tcp = as_json(out)["route"]["id"]
    code, _, err = cli("route", "-a", "updated", "update", tcp, "--sticky")
    assert code == 1 and "tcp routes are neither https_only nor sticky" in err
    code, _, err = cli("route", "-a", "updated", "update", "f" * 32, "--sticky")
    assert code == 1 and "has no route" in err
