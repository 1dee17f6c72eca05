from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.harness import Cluster

# Property tests run on a shared 2-core machine: no per-example deadline and no
# "too slow" health check (a loaded machine is no bug). In CI (CI=true) the
# examples are derandomized, so a run is repeatable: the suite's verdict is the
# code's, not the seed's; locally each run tries new examples.
settings.register_profile(
    "flynnp2p",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=os.environ.get("CI") == "true",
)
settings.load_profile("flynnp2p")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.kill_all()
