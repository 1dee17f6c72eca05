"""The router bench's iperf3 reading (`scripts/bench/router.py`): a failed run is
reported with iperf3's error and the bench goes on. iperf3 3.12 exits 0 on a
failed ``-J`` run, with an ``error`` and an empty ``end`` (the bench had stopped
once on ``KeyError: 'sum_received'``); the JSON below is what it printed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType


def bench() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "router.py"
    spec = importlib.util.spec_from_file_location("bench_router", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_good_run_is_its_gbits_and_a_failed_one_is_its_error() -> None:
    read = bench().iperf_result
    ok = {"start": {}, "end": {"sum_sent": {"bits_per_second": 9.1e9},
                               "sum_received": {"bits_per_second": 9e9}}}  # fmt: skip
    assert read(0, json.dumps(ok), "") == 9.0
    busy = {"start": {}, "intervals": [], "end": {},
            "error": "the server is busy running a test. try again later"}  # fmt: skip
    assert read(0, json.dumps(busy), "") == (
        "iperf3 exited 0: the server is busy running a test. try again later"
    )
    assert read(0, json.dumps({"start": {}, "end": {}}), "") == (
        "iperf3 exited 0: its report has no end.sum_received"
    )
    assert read(1, "", "iperf3: error - unable to connect to server\n") == (
        "iperf3 exited 1: iperf3: error - unable to connect to server"
    )
