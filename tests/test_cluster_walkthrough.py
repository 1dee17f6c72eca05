"""The README's walk-through on 3 real nodes, with the real CLI and the real git client.

`flynnp2p create` in a work tree of the Python example adds the ``flynnp2p``
remote; ``git push`` builds it (Flask from PyPI) and deploys it; every check goes
through the router of node 3, which neither push reaches. Then: scale, ps, log; a
second push to *another* node (an ordinary fast-forward); ``env set`` (a new
release, deployed); ``release`` and ``rollback -y`` (back to the release before);
``run`` (a one-off in the slug, with its dependencies); ``deployment`` lists
every deploy with its strategy and status.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import httpx
import pytest
import trio

from tests.harness import AgentProc, Cluster, wait_for
from tests.test_git_http import Git, text

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "python"
HOST = "hello.flynnp2p.localhost"


async def through(agent: AgentProc, path: str = "/") -> tuple[int, str]:
    async with httpx.AsyncClient(timeout=10) as c:
        try:
            r = await c.get(f"http://{agent.addr}:8080{path}", headers={"Host": HOST})
        except httpx.HTTPError as exc:
            return 0, str(exc)
        return r.status_code, r.text


async def test_walkthrough(cluster: Cluster, tmp_path: Path) -> None:
    agents = await cluster.start(3)
    await cluster.wait_converged(agents, alive=3)
    n1, n2, n3 = agents
    git = Git(tmp_path / "home")
    git.env["XDG_CONFIG_HOME"] = str(tmp_path / "cli")  # git runs the CLI's credential helper
    env = {**git.env, "PATH": os.environ["PATH"]}
    env.pop("FLYNNP2P_URL", None)
    env.pop("FLYNNP2P_TOKEN", None)
    work = tmp_path / "hello"
    shutil.copytree(EXAMPLE, work)

    async def flynnp2p(*argv: str, ok: bool = True) -> str:
        with trio.fail_after(240):
            done = await trio.run_process(
                [sys.executable, "-m", "flynnp2p", *argv], cwd=work, env=env,
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
        out = done.stdout.decode() + done.stderr.decode()
        if ok:
            assert done.returncode == 0, (argv, out)
        return out

    async def serves(want: str, why: str) -> None:
        async def seen() -> bool:
            code, body = await through(n3)
            return code == 200 and want in body

        await wait_for(seen, 60, why)

    for name, node in (("n1", n1), ("n2", n2)):
        await flynnp2p("cluster", "add", name, "--url", node.url, "--token", cluster.token.encode())
    await flynnp2p("cluster", "default", "n1")
    await git.run("init", "--quiet", "-b", "main", cwd=work)
    await git.run("add", "-A", cwd=work)
    await git.run("commit", "--quiet", "-m", "hello", cwd=work)

    # create: the app, its default route and the git remote with its credential helper.
    out = await flynnp2p("create", "hello")
    assert "flynnp2p" in (await git.run("remote", cwd=work)).stdout.decode(), out

    # git push: built with the python buildpack, released, answering through node 3.
    pushed = text(await git.run("push", "flynnp2p", "main", cwd=work))
    assert "-----> Python app detected" in pushed, pushed
    assert "remote: -----> Released v1" in pushed, pushed
    await serves("Hello from flynnp2p", "the first push to answer through node 3")

    # scale, ps, log
    await flynnp2p("scale", "web=3")

    async def three_up() -> bool:
        return (await flynnp2p("ps")).count(" up ") >= 3

    await wait_for(three_up, 60, "web=3 up")
    assert "web" in await flynnp2p("log", "-n", "20")

    # A second push, to node 2: a normal fast-forward of the repository node 1 saved.
    app_py = work / "app.py"
    app_py.write_text(app_py.read_text().replace("Hello from flynnp2p", "Hello again"))
    await git.run("commit", "--quiet", "-am", "again", cwd=work)
    await flynnp2p("-c", "n2", "git", "remote", "add", "--remote", "n2")
    pushed = text(await git.run("push", "n2", "main", cwd=work))
    assert "main -> main" in pushed and "forced update" not in pushed, pushed
    assert "remote: -----> Released v2" in pushed, pushed
    await serves("Hello again", "the second push to answer through node 3")

    # env set: a new release, deployed.
    await flynnp2p("env", "set", "GREETING=hi")
    await serves("hi: Python", "GREETING=hi to answer")

    # release lists them; rollback -y goes back to the release before.
    releases = await flynnp2p("release")
    assert all(v in releases for v in ("v1", "v2", "v3")), releases
    await flynnp2p("rollback", "-y")

    async def rolled_back() -> bool:
        code, body = await through(n3)
        return code == 200 and body.startswith("Hello again")

    await wait_for(rolled_back, 60, "the rollback to v2 to answer")

    # run: a one-off in the slug, with the app's dependencies.
    out = await flynnp2p("run", "--", "python", "-c", "import flask; print('flask', flask.__version__)")
    assert "flask " in out, out

    # deployment: every deploy, its strategy and status.
    deployments = await flynnp2p("deployment")
    assert deployments.count("complete") >= 4, deployments
    assert "one-by-one" in deployments, deployments  # web=3: the default turned one-by-one
