"""Job commands of the ``flynnp2p`` CLI: ps, log, run, kill, explain, host.

Theory of operation
-------------------
``ps``, ``explain`` and ``scale``'s wait read ``GET /v1/apps/<app>/jobs``: the jobs
not finished (``?all=1``: the finished ones too) and the ``blocked`` entries the
leader wrote for jobs it could not place (``cli.scale`` has the wait).

``log`` and ``run`` read the app's merged log, NDJSON: one object per output line,
and ``{"event": ...}`` objects (heartbeats every 10 s while following, and for
``run``, ``blocked`` and the final ``exit``). ``run`` survives a broken stream by
reconnecting: the history part of the new stream replays the job's lines, and
`RunFollower` skips as many as it already printed. Ctrl-C in ``run`` kills the job.

The formatting functions are pure (``now_ms`` is an argument) so the tests check
them without a server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TextIO
from urllib.parse import quote

import httpx

from flynnp2p.cli.client import ApiClient
from flynnp2p.cli.common import (
    app_options,
    app_path,
    blocked_text,
    blocked_what,
    client_for,
    env_pairs,
    print_json,
    reason_text,
    short_job,
    table,
)
from flynnp2p.errors import ClusterError, FlynnError, UserError

# The server sends a heartbeat every 10 s while following: 60 s of silence is a dead stream.
STREAM_TIMEOUT = httpx.Timeout(10.0, read=60.0)
RUN_HISTORY_LINES = 10_000
RECONNECT_PAUSE_S = 0.5
RECONNECT_GIVE_UP_S = 60.0


class StreamBroken(ClusterError):
    """A log stream ended by a network failure (not by an HTTP error answer)."""


# -- formatting (pure) ------------------------------------------------------------


def age(created_ms: int, now_ms: int) -> str:
    """``12s``, ``3m``, ``2h``, ``5d``: how long ago, in its largest whole unit."""
    s = max(0, (now_ms - created_ms) // 1000)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def ps_text(body: Mapping[str, Any], now_ms: int) -> str:
    rows: list[tuple[str, ...]] = [
        (j["id"], j["process_type"], j["state"], j["host"], str(j["release_id"])[:8],
         age(j["created_at"], now_ms), reason_text(j))
        for j in body["jobs"]
    ]  # fmt: skip
    header: tuple[str, ...] = ("ID", "TYPE", "STATE", "HOST", "RELEASE", "AGE", "REASON")
    if not any(r[-1] for r in rows):
        rows, header = [r[:-1] for r in rows], header[:-1]
    lines = [table(rows, header)] if rows else ["no jobs"]
    lines += [f"blocked: {blocked_text(b)}" for b in body.get("blocked") or ()]
    return "\n".join(lines)


def log_timestamp(ts_ms: int) -> str:
    """``2026-11-26T01:02:03.456Z``."""
    t = datetime.fromtimestamp(ts_ms // 1000, UTC)
    return f"{t:%Y-%m-%dT%H:%M:%S}.{ts_ms % 1000:03d}Z"


def log_line(item: Mapping[str, Any], *, raw: bool = False) -> str:
    """``2026-11-26T01:02:03.456Z web-3f2a[n2]: text`` (just the text if `raw`)."""
    text = str(item.get("text", ""))
    if raw:
        return text
    job = short_job(str(item.get("job_id", "?")))
    return f"{log_timestamp(int(item.get('ts_ms', 0)))} {job}[{item.get('node', '?')}]: {text}"


def host_rows(hosts: Sequence[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    return [
        (h["name"], str(h.get("addr", "")), str(h.get("status", "")), "*" if h.get("leader") else "",
         str(h.get("jobs", 0)),
         ",".join(f"{k}={v}" for k, v in sorted((h.get("tags") or {}).items())) or "-")
        for h in hosts
    ]  # fmt: skip


def tag_changes(items: Sequence[str]) -> dict[str, str | None]:
    """``k=v`` sets tag k, ``k-`` removes it (None)."""
    out: dict[str, str | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key:
            out[key] = value
        elif not sep and len(item) > 1 and item.endswith("-"):
            out[item[:-1]] = None
        else:
            raise UserError(f"expected KEY=VALUE to set a tag or KEY- to remove one, got {item!r}")
    return out


# -- streams ----------------------------------------------------------------------


def _http_error(client: ApiClient, resp: httpx.Response) -> FlynnError:
    try:
        body = resp.json()
    except ValueError:
        body = None
    err = body.get("error", {}) if isinstance(body, dict) else {}
    message = err.get("message") or resp.text.strip() or resp.reason_phrase
    error = FlynnError(f"{client.url} answered {resp.status_code}: {message}")
    error.status = resp.status_code
    return error


def _items(resp: httpx.Response) -> Iterator[dict[str, Any]]:
    for raw in resp.iter_lines():
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError:
            raise StreamBroken(f"the log stream sent a line that is not JSON: {raw[:80]!r}") from None
        if isinstance(item, dict):
            yield item


@contextlib.contextmanager
def open_ndjson(client: ApiClient, path: str, params: Mapping[str, str]) -> Iterator[Iterator[dict[str, Any]]]:
    """The objects of an NDJSON stream; `StreamBroken` if the network fails, the
    API's error (one line) if it answers one."""
    try:
        with client.http.stream("GET", path, params=params, timeout=STREAM_TIMEOUT) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise _http_error(client, resp)
            yield _items(resp)
    except httpx.TransportError as exc:
        raise StreamBroken(f"the log stream from {client.url} broke: {str(exc) or type(exc).__name__}") from None


def _emit(text: str, to: TextIO) -> None:
    print(text, file=to, flush=True)


def _quiet_broken_pipe() -> int:
    """stdout's reader went away (``| head``): stop without a traceback at exit."""
    with contextlib.suppress(OSError, ValueError):  # not a real file (tests): nothing to flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


# -- commands ---------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def cmd_ps(args: argparse.Namespace) -> int:
    params = {"all": "1"} if args.all else {}
    body = client_for(args).request("GET", app_path(args, "jobs"), params=params)
    if args.json:
        print_json(body)
    else:
        print(ps_text(body, _now_ms()))
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    if args.lines < 0:
        raise UserError(f"-n: expected a number of lines >= 0, got {args.lines}")
    client = client_for(args)
    params = {"n": str(args.lines), **({"follow": "1"} if args.follow else {})}
    params |= {k: v for k, v in (("type", args.type), ("job", args.job)) if v}
    err_to = sys.stderr if args.split_stderr else sys.stdout
    try:
        while True:
            try:
                with open_ndjson(client, app_path(args, "log"), params) as items:
                    for item in items:
                        if "event" in item:
                            continue  # heartbeats, and what the stream says about itself
                        if args.json:
                            _emit(json.dumps(item), sys.stdout)
                        else:
                            _emit(log_line(item, raw=args.raw), err_to if item.get("stream") == "stderr" else sys.stdout)
            except StreamBroken as exc:
                if not args.follow:
                    raise
                print(f"log: {exc.message}; reconnecting", file=sys.stderr, flush=True)
            if not args.follow:
                return 0
            params["n"] = "0"  # the lines so far were shown: from here on, new ones only
            time.sleep(RECONNECT_PAUSE_S)
    except KeyboardInterrupt:
        if args.follow:
            return 0
        raise
    except BrokenPipeError:
        return _quiet_broken_pipe()


@dataclass
class RunFollower:
    """What ``run`` has shown of a one-off's log stream, across reconnects."""

    shown: int = 0  # lines printed so far: a new stream replays them first
    received: int = 0  # lines received on the current stream
    blocked: tuple[str, ...] = ()
    exit: dict[str, Any] | None = None

    def reconnected(self) -> None:
        self.received = 0

    def feed(self, item: Mapping[str, Any]) -> tuple[Literal["stdout", "stderr"], str] | None:
        """Where to print what, for one object of the stream (None: nothing)."""
        event = item.get("event")
        if event is None:
            self.received += 1
            if self.received <= self.shown:
                return None  # replayed after a reconnect
            self.shown += 1
            return ("stderr" if item.get("stream") == "stderr" else "stdout", str(item.get("text", "")))
        if event == "blocked":
            reasons = tuple(str(r) for r in item.get("reasons") or ())
            if reasons != self.blocked:
                self.blocked = reasons
                return "stderr", f"run: blocked: {'; '.join(reasons) or 'no reason given'}"
        elif event == "exit":
            self.exit = dict(item)
        return None


def exit_status(event: Mapping[str, Any]) -> tuple[int, str | None]:
    """The exit code ``run`` returns for the job's exit event, and what to say."""
    code = event.get("exit_code")
    if code is None:
        reason = event.get("reason") or f"the job ended {event.get('state', 'without an exit code')}"
        return 1, f"run: {reason}"
    code = int(code)
    return (128 - code if code < 0 else code), None  # a negative code is a signal


def _follow_run(client: ApiClient, args: argparse.Namespace, job_id: str) -> int:
    params = {"job": job_id, "until_exit": "1", "n": str(RUN_HISTORY_LINES)}
    follower = RunFollower()
    give_up = time.monotonic() + RECONNECT_GIVE_UP_S
    while True:
        try:
            with open_ndjson(client, app_path(args, "log"), params) as items:
                follower.reconnected()
                give_up = time.monotonic() + RECONNECT_GIVE_UP_S
                for item in items:
                    shown = follower.feed(item)
                    if shown is not None:
                        _emit(shown[1], sys.stderr if shown[0] == "stderr" else sys.stdout)
                    if follower.exit is not None:
                        code, message = exit_status(follower.exit)
                        if message:
                            print(message, file=sys.stderr)
                        return code
        except StreamBroken as exc:
            if time.monotonic() >= give_up:
                raise StreamBroken(
                    f"{exc.message}; job {job_id} may still run (see 'flynnp2p ps --all', "
                    "'flynnp2p kill')"
                ) from None
        time.sleep(RECONNECT_PAUSE_S)  # the stream ended early or broke: reconnect


def cmd_run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UserError("give a command: flynnp2p run -a APP -- CMD ARGS...")
    if args.json and not args.detach:
        raise UserError("--json goes with -d (without it, run prints the job's output)")
    client = client_for(args)
    body: dict[str, Any] = {"args": command, "env": env_pairs(args.env)}
    if args.memory is not None:
        body["memory_mb"] = args.memory
    resp = client.request("POST", app_path(args, "jobs"), json=body)
    job_id = resp["job_id"]
    if args.detach:
        if args.json:
            print_json(resp)
        else:
            print(job_id)
        return 0
    try:
        return _follow_run(client, args, job_id)
    except KeyboardInterrupt:
        client.request("DELETE", app_path(args, "jobs", job_id))
        print(f"run: stopped job {job_id}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _quiet_broken_pipe()


def cmd_kill(args: argparse.Namespace) -> int:
    client = client_for(args)
    # Only to say what happens next (the kill's answer does not tell a one-off apart);
    # a job placed but never reported is not listed, yet can be killed.
    try:
        job = client.get(app_path(args, "jobs", args.job)).get("job") or {}
    except FlynnError as exc:
        if exc.status != 404:
            raise
        job = {}
    resp = client.request("DELETE", app_path(args, "jobs", args.job))
    if args.json:
        print_json(resp)
    elif resp.get("already"):
        print(f"job {args.job} is already stopping")
    elif job.get("one_off"):
        print(f"killed job {args.job} (a one-off: it is not restarted)")
    else:
        print(f"killed job {args.job} (the scheduler replaces it)")
    return 0


def job_text(job: Mapping[str, Any]) -> str:
    lines = [
        ("job", job["id"]), ("type", job["process_type"]), ("state", job["state"]),
        ("host", job.get("host") or "-"), ("release", job["release_id"]),
        ("address", job.get("address") or "-"), ("reason", job.get("reason") or "-"),
        ("exit code", "-" if job.get("exit_code") is None else str(job["exit_code"])),
        ("restarts", str(job.get("restarts", 0))),
    ]  # fmt: skip
    return "\n".join(f"{k + ':':<11}{v}" for k, v in lines)


def blocked_explained(entry: Mapping[str, Any]) -> str:
    reasons = entry.get("reasons") or ("no reason given",)
    return "\n".join([f"{blocked_what(entry)}: cannot be placed", *(f"  - {r}" for r in reasons)])


def cmd_explain(args: argparse.Namespace) -> int:
    client = client_for(args)
    body = client.get(app_path(args, "jobs"))
    target: str | None = args.target
    blocked = [b for b in body.get("blocked") or ()
               if target is None or target in (b.get("job_id"), b["process_type"])]  # fmt: skip
    if blocked or target is None:
        if args.json:
            print_json({"blocked": blocked})
        else:
            print("\n".join(blocked_explained(b) for b in blocked) or "nothing is blocked")
        return 0
    if any(j["process_type"] == target for j in body["jobs"]):
        if args.json:
            print_json({"blocked": []})
        else:
            print(f"nothing is blocked for {target}")
        return 0
    try:
        resp = client.get(app_path(args, "jobs", target))
    except FlynnError as exc:
        if exc.status == 404:
            raise FlynnError(f"no job and no blocked process type {target!r} (see 'flynnp2p ps --all')") from None
        raise
    if args.json:
        print_json(resp)
    else:
        print(job_text(resp["job"]) if resp.get("job") else blocked_explained(resp["blocked"]))
    return 0


def cmd_host_list(args: argparse.Namespace) -> int:
    body = client_for(args).get("/v1/hosts")
    if args.json:
        print_json(body)
        return 0
    print(table(host_rows(body["hosts"]), ("NAME", "ADDR", "STATUS", "LEADER", "JOBS", "TAGS")))
    return 0


def cmd_host_tag(args: argparse.Namespace) -> int:
    tags = tag_changes(args.tags)
    resp = client_for(args).request("PUT", f"/v1/hosts/{quote(args.name, safe='')}/tags", json={"tags": tags})
    if args.json:
        print_json(resp)
        return 0
    now = ", ".join(f"{k}={v}" for k, v in sorted(resp["tags"].items())) or "none"
    print(f"host {resp['host']} tags: {now}")
    return 0


# -- the parser -------------------------------------------------------------------


def add_job_commands(sub: Any) -> None:
    top = [app_options(nested=False)]

    p = sub.add_parser("ps", parents=top, help="an app's jobs, and the ones that cannot be placed")
    p.add_argument("--all", action="store_true", help="finished jobs too")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("log", parents=top, help="an app's output, from every node")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C ends)")
    p.add_argument("-n", "--lines", type=int, default=100, metavar="N", help="lines of history (default 100)")
    p.add_argument("-t", "--type", metavar="TYPE", help="only this process type")
    p.add_argument("-j", "--job", metavar="JOB", help="only this job")
    p.add_argument("--split-stderr", action="store_true", help="print the jobs' stderr lines to stderr")
    p.add_argument("--raw", action="store_true", help="the text only: no time, job or node")
    p.set_defaults(func=cmd_log)

    p = sub.add_parser(
        "run", parents=top, help="run a one-off command in the app's release",
        description="Run CMD in the app's current release on some host, print its output "
        "and exit with its exit code. Ctrl-C kills the job.",
    )  # fmt: skip
    p.add_argument("-d", "--detach", action="store_true", help="print the job id and return")
    p.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment (repeatable)")  # fmt: skip
    p.add_argument("--memory", type=int, metavar="MB", help="memory limit (default 512)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("kill", parents=top, help="stop a job (the scheduler replaces it)")
    p.add_argument("job", metavar="JOB")
    p.set_defaults(func=cmd_kill)

    p = sub.add_parser("explain", parents=top, help="why jobs cannot be placed, or how a job is")
    p.add_argument("target", nargs="?", metavar="JOB|TYPE", help="one job or process type (default: all)")
    p.set_defaults(func=cmd_explain)

    json_only = argparse.ArgumentParser(add_help=False)
    json_only.add_argument("--json", action="store_true", help="print the API's JSON")
    p = sub.add_parser("host", help="the cluster's hosts and their tags")
    hosts = p.add_subparsers(dest="host_cmd", metavar="SUBCOMMAND", required=True)
    h = hosts.add_parser("list", parents=[json_only], help="hosts, their jobs and tags")
    h.set_defaults(func=cmd_host_list)
    h = hosts.add_parser("tag", parents=[json_only], help="set (K=V) or remove (K-) a host's tags")
    h.add_argument("name", metavar="NAME")
    h.add_argument("tags", nargs="+", metavar="K=V|K-")
    h.set_defaults(func=cmd_host_tag)
