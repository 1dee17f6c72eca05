"""The hooks `git receive-pack` runs, and the loopback server they call back.

Theory of operation
-------------------
`git http-backend` runs ``git receive-pack``, which runs the repo's
``pre-receive`` hook once the pack is in (quarantined, not yet visible) and
before any ref moves. Whatever the hook writes to stderr, receive-pack sends on
its sideband, and ``git push`` prints it as ``remote: …`` lines, live: that is
how a build's output reaches the pusher. There is no ``post-receive`` hook: what
follows the refs' move is done once receive-pack has exited (`Push.close`, by
the git endpoint), so the pusher does not wait for one more hook (a Python start
and a call back, 30-60 ms of every push); `install_hooks` removes one an earlier
version installed.

The hook is one small stdlib-only script (no flynnp2p import: it starts in
milliseconds). It connects to this node's `HookServer` on 127.0.0.1 and sends::

    <secret> <hook name>\\n<git's object dirs, JSON>\\n<the hook's stdin: "old new ref" lines>

The object directories are the quarantine git keeps a push's objects in until
pre-receive accepts it (``GIT_OBJECT_DIRECTORY`` and
``GIT_ALTERNATE_OBJECT_DIRECTORIES``): with them the agent can read the pushed
commit (`GitSource.export`) before any ref moves, which is what a build needs.

then half-closes. The server answers with text lines (the hook copies them to
its stderr) and ends with one line ``\\0ok`` or ``\\0no``: the hook's exit status
(for pre-receive, 0 accepts every ref, anything else refuses the whole push).

The secret is made for one push (`register`, by the git endpoint that runs the
backend, with the environment the backend passes down to the hook) and names
its `Push`; a connection with an unknown secret is answered ``\\0no`` at once.
The server's connection tasks live in its own nursery; the pushes they serve are
owned by the requests that registered them.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import shlex
import sys
import tarfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import trio

from flynnp2p.errors import FlynnError

log = logging.getLogger(__name__)

HOOKS = ("pre-receive",)
_RETIRED_HOOKS = ("post-receive",)  # installed by earlier versions: removed
MAX_HOOK_INPUT = 4 << 20  # ref update lines; a push of ~50,000 refs
PORT_ENV = "FLYNNP2P_HOOK_PORT"
SECRET_ENV = "FLYNNP2P_HOOK_SECRET"
RENEW_S = 4.0

HOOK_SCRIPT = r'''"""flynnp2p's git hook: hands the push to the agent that runs git (see
flynnp2p/build/hooks.py) and prints its answer; the agent decides."""
import json
import os
import socket
import sys

hook = os.path.basename(sys.argv[1] if len(sys.argv) > 1 else sys.argv[0])
port, secret = os.environ.get("FLYNNP2P_HOOK_PORT"), os.environ.get("FLYNNP2P_HOOK_SECRET")
if not port or not secret:
    sys.stderr.write("flynnp2p: push through the flynnp2p agent (git push flynnp2p)\n")
    sys.exit(1)
data = sys.stdin.buffer.read()
OBJECT_ENV = ("GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_QUARANTINE_PATH")
try:
    sock = socket.create_connection(("127.0.0.1", int(port)))
    objects = {k: os.environ[k] for k in OBJECT_ENV if k in os.environ}
    sock.sendall(secret.encode() + b" " + hook.encode() + b"\n" + json.dumps(objects).encode() + b"\n" + data)
    sock.shutdown(socket.SHUT_WR)
    ok = False
    for line in sock.makefile("rb"):
        if line.startswith(b"\0"):
            ok = line[1:].strip() == b"ok"
            break
        sys.stderr.buffer.write(line)
        sys.stderr.flush()
except OSError as exc:
    sys.stderr.write(f"flynnp2p: the agent did not answer the {hook} hook ({exc})\n")
    sys.exit(1)
sys.exit(0 if ok else 1)
'''


@dataclass(frozen=True)
class RefUpdate:
    old: str
    new: str
    ref: str

    @property
    def deleted(self) -> bool:
        return set(self.new) == {"0"}


def parse_updates(text: str) -> list[RefUpdate]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append(RefUpdate(*parts))
    return out


Say = Callable[[str], Awaitable[None]]
OBJECT_ENV = ("GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_QUARANTINE_PATH")


@dataclass(frozen=True)
class GitSource:
    """The pushed repository as a hook sees it: its path, and the quarantine the
    push's objects are in until pre-receive accepts them."""

    repo: Path
    objects: Mapping[str, str] = field(default_factory=dict)
    # Awaited by a step before it releases anything: returns once the push's
    # repository is saved in the cluster, raises FlynnError if it cannot be. The
    # save runs while the step builds (`flynnp2p.build.push`); None: nothing to wait.
    saved: Callable[[], Awaitable[None]] | None = None

    async def wait_saved(self) -> None:
        """Return once the push is saved (a step calls it before it releases)."""
        if self.saved is not None:
            await self.saved()

    async def export(self, commit: str, dest: Path) -> None:
        """The tree of `commit`, written under `dest` (``git archive``, extracted with
        tarfile's data filter: no path leaves `dest`)."""
        if not all(c in "0123456789abcdef" for c in commit) or len(commit) not in (40, 64):
            raise FlynnError(f"not a commit id: {commit!r}")
        await trio.to_thread.run_sync(partial(dest.mkdir, parents=True, exist_ok=True))
        archive = dest.parent / f"{dest.name}.tar"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_DIR": str(self.repo), **self.objects}
        done = await trio.run_process(
            ["git", "archive", "--format=tar", "-o", str(archive), commit], env=env,
            capture_stderr=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise FlynnError(f"git archive {commit[:7]} failed: {done.stderr.decode(errors='replace')[:300]}")
        try:
            await trio.to_thread.run_sync(_extract, archive, dest)
        finally:
            archive.unlink(missing_ok=True)


def _extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")


class Push(Protocol):
    """What a hook call is handed to (`flynnp2p.build.push.PushSession`)."""

    async def pre_receive(self, updates: Sequence[RefUpdate], say: Say, objects: Mapping[str, str]) -> bool: ...


    async def renew(self) -> None:
        """Keep what the push holds (its lease) alive; called every ``RENEW_S``."""
        ...


def install_hooks(hooks_dir: Path, python: str = sys.executable) -> None:
    """Write the hook script and the hook that runs it (idempotent), and remove the
    ones earlier versions wrote that are run no more."""
    hooks_dir.mkdir(parents=True, exist_ok=True)
    hooks_dir = hooks_dir.absolute()
    script = hooks_dir / "flynnp2p-hook.py"
    script.write_text(HOOK_SCRIPT)
    for name in HOOKS:
        hook = hooks_dir / name
        hook.write_text(
            f"#!/bin/sh\nexec {shlex.quote(python)} -I {shlex.quote(str(script))} {name}\n"
        )
        hook.chmod(0o755)
    for name in _RETIRED_HOOKS:
        retired = hooks_dir / name
        with contextlib.suppress(OSError):
            if script.name in retired.read_text():
                retired.unlink()


class HookServer:
    def __init__(self, hooks_dir: Path) -> None:
        self.hooks_dir = hooks_dir.absolute()
        self.port = 0
        self._pushes: dict[str, Push] = {}

    def register(self, push: Push) -> dict[str, str]:
        """A secret for `push`; the environment the hook needs to call back with it."""
        secret = secrets.token_urlsafe(24)
        self._pushes[secret] = push
        return {PORT_ENV: str(self.port), SECRET_ENV: secret}

    def unregister(self, env: dict[str, str]) -> None:
        self._pushes.pop(env.get(SECRET_ENV, ""), None)

    def _find(self, presented: str) -> Push | None:
        for secret, push in self._pushes.items():
            if hmac.compare_digest(secret.encode(), presented.encode()):
                return push
        return None

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.to_thread.run_sync(install_hooks, self.hooks_dir)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._serve, listeners)
            task_status.started(self.port)
            while True:
                await trio.sleep(RENEW_S)
                for push in list(self._pushes.values()):
                    try:
                        await push.renew()
                    except FlynnError as exc:
                        log.warning("a push could not renew its lease: %s", exc.message)

    async def _serve(self, stream: trio.SocketStream) -> None:
        """One hook's call. Whatever goes wrong in it refuses that push (a full
        disk says so); nothing a push does can end the agent's hook server."""
        try:
            await self._answer(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.info("a push hook went away before its answer")
        except Exception:
            log.exception("a push hook failed; the push is refused")

    async def _answer(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = bytearray()
            with trio.move_on_after(30):
                while len(data) <= MAX_HOOK_INPUT:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    data += chunk
            head, _, rest = bytes(data).partition(b"\n")
            objects_line, _, body = rest.partition(b"\n")
            secret, _, hook = head.decode(errors="replace").partition(" ")
            objects = _objects(objects_line)
            push = self._find(secret)
            if push is None or hook not in HOOKS:
                await stream.send_all(b"flynnp2p: this push is not known to the agent\n\0no\n")
                return

            async def say(line: str) -> None:
                await stream.send_all(line.rstrip("\n").encode(errors="replace") + b"\n")

            updates = parse_updates(body.decode(errors="replace"))
            try:
                ok = await push.pre_receive(updates, say, objects)
            except trio.BrokenResourceError:
                log.info("a %s hook went away before its answer", hook)
                return
            except FlynnError as exc:
                await say(f"flynnp2p: {exc.message}")
                ok = False
            except OSError as exc:  # e.g. a full disk where no step said so itself
                log.warning("a %s hook failed: %s", hook, exc)
                await say(f"flynnp2p: the push failed on this node: {exc.strerror or exc}")
                ok = False
            except Exception:
                log.exception("a %s hook failed", hook)
                await say("flynnp2p: the push failed on this node (an internal error; see the agent's log)")
                ok = False
            await stream.send_all(b"\0ok\n" if ok else b"\0no\n")


def _objects(line: bytes) -> dict[str, str]:
    """The object directories a hook sent (only the names git uses, only strings)."""
    try:
        raw = json.loads(line)
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if k in OBJECT_ENV and isinstance(v, str) and "\0" not in v}
