#!/usr/bin/env python3
"""Deploy benchmark: ``git push`` → the new release answering through the router.

On a 3-node cluster on loopback (real agents, serf, etcd, the git client), for the
Python example (``examples/python``: Flask from PyPI, installed by the python
buildpack with uv):

* **cold**: the first push (to node 1), no build cache anywhere;
* **warm**: a second commit pushed to node 2 (not the node of the last build), so
  its build cache comes from the blobstore (`flynnp2p.build.cache`);
* **warm, same node**: a third commit pushed to node 2 again (its cache is local).

Each is timed from the start of ``git push`` until node 3's router answers with the
new commit's greeting (the push itself waits until web is up). Each commit
changes the app's greeting, so every push builds and deploys a new release.

The **floor**, in the same run: what the warm build cannot avoid, done directly
on this machine: a fresh virtualenv (``python3 -m venv --copies --without-pip``),
``uv pip install -r requirements.txt`` from a copy of the warm build cache (no
download), start ``python app.py``, first answer on loopback.

Also: the slug's size (from the push's output), and the build's peak memory: the
sum of the resident memory of every process of the app's build uid, sampled every
50 ms during the warm push.

Targets (issue 11): warm ≤ 10 s and ≤ 2x the floor. On a shared machine one run
says little (the floor alone varied 1.3-7 s with the load): ``--runs N`` measures N
fresh clusters one after another and prints each figure's median with every run's
value (the ratio is the median of each run's own warm/floor).

    .venv/bin/python scripts/bench/deploy.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from flynnp2p.build.builder import build_uid  # noqa: E402
from tests.harness import AgentProc, Cluster, wait_for  # noqa: E402

EXAMPLE = ROOT / "examples" / "python"
GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
}  # fmt: skip


def url_of(agent: AgentProc) -> str:
    return agent.url.replace("http://", f"http://x:{agent.token.api_key}@") + "/git/bench.git"


def git(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


def rss_of_uid(uid: int) -> int:
    """Sum of VmRSS (bytes) of every process whose real uid is `uid`."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid and "VmRSS" in fields:
            total += int(fields["VmRSS"].split()[0]) * 1024
    return total


async def timed_push(
    tree: Path,
    agent: AgentProc,
    reader: AgentProc,
    marker: str,
    env: dict[str, str],
    sample_uid: int | None = None,
) -> tuple[float, str, int]:
    """(seconds from git push to `reader`'s router answering `marker`, output, peak build RSS)."""
    app_py = tree / "app.py"
    app_py.write_text(re.sub(r'"GREETING", "[^"]*"', f'"GREETING", "{marker}"', app_py.read_text()))
    git("commit", "--quiet", "-am", marker, cwd=tree, env=env)
    peak = 0
    # One client, made before the clock starts: making one costs ~0.1 s (its TLS
    # context), which is the bench's, not the deploy's.
    client = httpx.AsyncClient(timeout=5)
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        if sample_uid is not None:

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, await trio.to_thread.run_sync(rss_of_uid, sample_uid))
                    await trio.sleep(0.05)

            nursery.start_soon(sample)
        # The push's output, each line stamped with when it arrived (where the time goes).
        proc = await trio.lowlevel.open_process(
            ["git", "push", "--progress", url_of(agent), "HEAD:main"], cwd=tree, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stderr is not None
        buf = b""
        stamped: list[str] = []
        async for chunk in proc.stderr:
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            stamped += [
                f"{time.perf_counter() - start:6.2f} {ln.decode(errors='replace')}"
                for ln in lines
                if ln.strip()
            ]
        await proc.wait()
        out = "\n".join(stamped)
        if proc.returncode != 0:
            raise SystemExit(f"git push failed:\n{out}")

        async def answers() -> bool:
            try:
                r = await client.get(
                    f"http://{reader.addr}:8080/", headers={"Host": "bench.flynnp2p.localhost"}
                )
            except httpx.HTTPError:
                return False
            return r.status_code == 200 and marker in r.text

        await wait_for(
            answers, 60, f"the router of {reader.name} to answer {marker}", interval=0.02
        )
        nursery.cancel_scope.cancel()
    took = time.perf_counter() - start
    await client.aclose()
    return took, out, peak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def floor(cache: Path, work: Path) -> float:
    """Fresh venv, install from a copy of the warm cache, start, first answer."""
    from uv import find_uv_bin

    uv_cache = work / "uv-cache"
    shutil.copytree(cache / "uv", uv_cache, symlinks=True)
    app = work / "app"
    shutil.copytree(EXAMPLE, app)
    env = {"PATH": os.environ["PATH"], "HOME": str(work), "UV_CACHE_DIR": str(uv_cache),
           "UV_LINK_MODE": "copy", "UV_NATIVE_TLS": "1"}  # fmt: skip
    port = free_port()
    client = httpx.AsyncClient(timeout=5)  # as in timed_push: made before the clock starts
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "venv", "--copies", "--without-pip", str(app / ".venv")], check=True
    )
    subprocess.run(
        [find_uv_bin(), "pip", "install", "--quiet", "--python", str(app / ".venv/bin/python"),
         "-r", str(app / "requirements.txt")], env=env, check=True,
    )  # fmt: skip
    proc = subprocess.Popen(
        [str(app / ".venv/bin/python"), "app.py"], cwd=app, env={**env, "PORT": str(port)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        async def answers() -> bool:
            try:
                return (await client.get(f"http://127.0.0.1:{port}/")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_for(answers, 30, "the floor's app to answer", interval=0.02)
        return time.perf_counter() - start
    finally:
        await client.aclose()
        proc.terminate()
        proc.wait(10)


def slug_mb(out: str) -> float:
    found = re.findall(r"Compressed slug: ([0-9.]+) MB", out)
    return float(found[-1]) if found else float("nan")


@dataclass
class Run:
    cold: float
    warm: float
    again: float
    floor: float
    restored: bool
    warm_out: str
    peak: int


async def one_run() -> Run:
    """One fresh cluster: the cold push, the warm ones, then the floor."""
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        root = Path(tmp)
        cluster = Cluster(root)
        try:
            n1, n2, n3 = await cluster.start(3)
            await cluster.wait_converged([n1, n2, n3], alive=3, timeout=60)
            async with n1.client() as c:
                r = await c.post("/v1/apps", json={"name": "bench"}, timeout=15)
                assert r.status_code == 201, r.text
                app_id = r.json()["app"]["id"]
            env = {**os.environ, **GIT_ENV, "HOME": str(root)}
            tree = root / "tree"
            shutil.copytree(EXAMPLE, tree)
            git("init", "--quiet", "-b", "main", cwd=tree, env=env)
            git("add", "-A", cwd=tree, env=env)
            git("commit", "--quiet", "-m", "the Python example", cwd=tree, env=env)
            uid = build_uid(app_id) if os.geteuid() == 0 else None

            cold, _, cold_peak = await timed_push(tree, n1, n3, "bench cold", env, uid)
            warm, warm_out, warm_peak = await timed_push(tree, n2, n3, "bench warm", env, uid)
            again, _, _ = await timed_push(tree, n2, n3, "bench warm again", env, uid)
            restored = "Build cache restored from node n1" in warm_out
            cache = n2.data_dir / "builds" / "cache" / app_id
            base = await floor(cache, root / "floor")
        finally:
            cluster.kill_all()
    return Run(cold, warm, again, base, restored, warm_out, max(cold_peak, warm_peak))


def figure(values: list[float], unit: str = " s") -> str:
    """The median, and every run's value when there are several."""
    runs = f"  (runs: {', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else ""
    return f"{statistics.median(values):6.2f}{unit}{runs}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="fresh clusters to measure; medians are printed")
    runs = [await one_run() for _ in range(max(1, parser.parse_args().runs))]
    last = runs[-1]
    print("the warm push, as its lines arrived (s after git push started):")
    print("\n".join("  " + ln for ln in last.warm_out.splitlines() if "remote:" in ln))
    of = {name: [getattr(r, name) for r in runs] for name in ("cold", "warm", "again", "floor")}
    ratio = [r.warm / r.floor for r in runs]
    print(f"cold push -> answering:               {figure(of['cold'])}")
    print(f"warm push, another node -> answering: {figure(of['warm'])}  "
          f"(cache restored from the blobstore: {all(r.restored for r in runs)})")  # fmt: skip
    print(f"warm push, same node -> answering:    {figure(of['again'])}")
    print(f"floor (venv + install from the warm cache + start + first answer): {figure(of['floor'])}")
    print(f"warm / floor: {figure(ratio, 'x')} (target <= 2x); warm <= 10 s: "
          f"{statistics.median(of['warm']) <= 10}")  # fmt: skip
    print(f"cold / warm: {statistics.median(of['cold']) / statistics.median(of['warm']):.2f}x")
    print(f"slug: {slug_mb(last.warm_out):.1f} MB; build peak memory (RSS of the build uid's "
          f"processes): {max(r.peak for r in runs) / 1e6:.0f} MB")  # fmt: skip


if __name__ == "__main__":
    trio.run(main)
