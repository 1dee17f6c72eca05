"""Serves the API app with hypercorn inside the agent's nursery."""

from __future__ import annotations

import errno
import logging
from typing import Any

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from flynnp2p.errors import ConfigError


class ApiServer:
    def __init__(self, app: Any, addr: str, port: int) -> None:
        self.app = wrap_app(app, 1 << 20, None)
        self.config = Config()
        host = f"[{addr}]" if ":" in addr else addr
        self.config.bind = [f"{host}:{port}"]
        self.config.accesslog = None
        self.config.errorlog = logging.getLogger("flynnp2p.api.server")
        self.config.graceful_timeout = 2.0
        self.config.keep_alive_timeout = 30.0

    def bind(self) -> Sockets:
        """Bind now, so a taken port fails the agent before it joins anything."""
        bind = self.config.bind[0]
        try:
            sockets = self.config.create_sockets()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"API port {bind} is already in use (choose --api-port)") from None
            raise ConfigError(f"cannot listen on {bind}: {exc.strerror}") from None
        for sock in sockets.insecure_sockets:
            sock.listen(self.config.backlog)
        return sockets

    async def run(
        self, sockets: Sockets, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # worker_serve reports its binds when its listeners are up.
        await worker_serve(self.app, self.config, sockets=sockets, task_status=_first(task_status))


class _first:
    """Adapts hypercorn's ``started(list_of_urls)`` to ours (one URL)."""

    def __init__(self, status: trio.TaskStatus[str]) -> None:
        self.status = status

    def started(self, value: list[str] | None = None) -> None:
        self.status.started(value[0] if value else "")
