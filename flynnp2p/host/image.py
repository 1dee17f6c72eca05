"""A Docker image's run configuration, and the ``web`` process a release takes from it.

Theory of operation
-------------------
An image says how it runs in its config: ``Entrypoint`` and ``Cmd`` (the argv is
the one followed by the other, as ``docker run`` does it), ``Env`` (``NAME=value``
lines), ``WorkingDir``, ``ExposedPorts`` (``{"8000/tcp": {}}``). The engine's
``inspect`` shows it under ``Config``, a ``docker save`` archive's config document
under ``config``; `image_config` reads either, and refuses what is not that shape.

A release of an image has one process type, ``web`` (`web_process`): its command
is the argv as shell words (for people and for ``flynnp2p ps``; a host runs the
image's own argv, not this text), and its port (``ports[0]``) is the first exposed TCP port:
where the job listens, and what its ``$PORT`` says. An image that exposes none
has port 0, as a slug's web has: it listens on ``$PORT``, the host's choice.

The image's ``Env`` is merged *under* the app's env when a job starts (docker
does it for a container; the process backend does it by hand), so ``flynnp2p env``
shows only what the app set, and the next image's env is not shadowed by this
one's. Pure: no I/O here.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flynnp2p.errors import UserError
from flynnp2p.state.records import ProcessSpec

WEB = "web"
_MAX_COMMAND = 4096  # as ProcessSpec.command takes it


class ImageConfigError(UserError):
    """The image's config is not what an image config looks like, or cannot run here."""

    code = "bad_image_config"


@dataclass(frozen=True, slots=True)
class ImageConfig:
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # in the image's order; a later name wins
    workdir: str = "/"
    ports: tuple[int, ...] = ()  # exposed TCP ports, in the config's order

    @property
    def argv(self) -> tuple[str, ...]:
        return self.entrypoint + self.cmd

    @property
    def port(self) -> int | None:
        """Where a job of the image listens: its first exposed TCP port."""
        return self.ports[0] if self.ports else None

    def env_map(self) -> dict[str, str]:
        return dict(self.env)


def _strings(what: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageConfigError(f"image config: {what} must be a list of strings")
    return tuple(value)


def _ports(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise ImageConfigError('image config: ExposedPorts must be an object like {"8000/tcp": {}}')
    ports = []
    for key in value:
        number, _, proto = str(key).partition("/")
        if proto not in ("", "tcp"):
            continue  # udp and sctp ports are not routed
        if not number.isdigit() or not 0 < int(number) < 65536:
            raise ImageConfigError(f"image config: exposed port {key!r} is not PORT[/tcp]")
        ports.append(int(number))
    return tuple(ports)


def image_config(config: Any) -> ImageConfig:
    """The run configuration from an image config's ``config`` (or inspect's ``Config``)."""
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ImageConfigError("image config: 'config' must be an object")
    env = []
    for line in _strings("Env", config.get("Env")):
        name, eq, value = line.partition("=")
        if not eq or not name:
            raise ImageConfigError(f"image config: Env line {line[:60]!r} is not NAME=value")
        env.append((name, value))
    workdir = config.get("WorkingDir") or "/"
    if not isinstance(workdir, str) or not workdir.startswith("/") or "\0" in workdir:
        raise ImageConfigError("image config: WorkingDir must be an absolute path")
    return ImageConfig(
        entrypoint=_strings("Entrypoint", config.get("Entrypoint")),
        cmd=_strings("Cmd", config.get("Cmd")),
        env=tuple(env),
        workdir=workdir,
        ports=_ports(config.get("ExposedPorts")),
    )


def web_process(config: ImageConfig, what: str) -> ProcessSpec:
    """The release's ``web`` process for an image (`what` names it in errors)."""
    if not config.argv:
        raise ImageConfigError(f"{what} has neither ENTRYPOINT nor CMD: nothing to run")
    command = shlex.join(config.argv)
    if len(command) > _MAX_COMMAND:
        raise ImageConfigError(f"{what}: its ENTRYPOINT and CMD are over {_MAX_COMMAND} characters")
    port = config.port
    return ProcessSpec(command=command, ports=(port or 0,))  # 0: $PORT, the host's choice
