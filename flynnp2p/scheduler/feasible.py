"""Feasibility: which hosts may take a job of a group, and why the others may not.

Theory of operation
-------------------
Three filters, in order, as in Nomad's feasibility stage: the host is alive, it
has every tag the formation asks for, and its free memory (capacity minus the
memory of the jobs it holds, including those placed earlier in the same plan) is
at least the job's ``memory_mb``. Every host a filter drops yields a `Filtered`
naming the host and the reason, so a job that cannot be placed is always
explained (`explain`).

The first two filters depend only on the host and the constraints, so the planner
computes them once per distinct constraint set (`eligible`); memory changes as the
plan places jobs and is checked at placement time (`check_memory`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flynnp2p.scheduler.model import Host

MAX_HOST_REASONS = 10  # per-host lines kept in one explanation; the counts cover the rest

NOT_ALIVE = "alive"
TAG = "tag"
MEMORY = "memory"


@dataclass(frozen=True, slots=True)
class Filtered:
    """Host `host` was filtered out by the `kind` filter, for the reason `detail`."""

    host: str
    kind: str  # NOT_ALIVE | TAG | MEMORY
    detail: str

    def __str__(self) -> str:
        return f"host {self.host}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Eligible:
    """Hosts passing the alive and tag filters for one constraint set."""

    hosts: tuple[str, ...]
    filtered: tuple[Filtered, ...]


def missing_tag(tags: Mapping[str, str], constraints: Mapping[str, str]) -> str | None:
    """The first constraint (in key order) that `tags` does not satisfy, as "k=v"."""
    for key in sorted(constraints):
        if tags.get(key) != constraints[key]:
            return f"{key}={constraints[key]}"
    return None


def check_host(host: Host, constraints: Mapping[str, str]) -> Filtered | None:
    """None if `host` is alive and has the tags, else why not."""
    if not host.alive:
        return Filtered(host.name, NOT_ALIVE, "not alive")
    tag = missing_tag(host.tags, constraints)
    if tag is not None:
        return Filtered(host.name, TAG, f"lacks tag {tag}")
    return None


def check_memory(host: str, free_mb: int, need_mb: int) -> Filtered | None:
    """None if `free_mb` covers `need_mb`, else why not."""
    if free_mb >= need_mb:
        return None
    return Filtered(host, MEMORY, f"{max(free_mb, 0)} MB free, needs {need_mb} MB")


def eligible(hosts: Sequence[Host], constraints: Mapping[str, str]) -> Eligible:
    """Split `hosts` (sorted by name) into eligible names and filtered ones."""
    ok: list[str] = []
    dropped: list[Filtered] = []
    for host in hosts:
        why = check_host(host, constraints)
        if why is None:
            ok.append(host.name)
        else:
            dropped.append(why)
    return Eligible(tuple(ok), tuple(dropped))


def explain(
    constraints: Mapping[str, str],
    need_mb: int,
    filtered: Sequence[Filtered],
    headline: str | None = None,
) -> tuple[str, ...]:
    """Reasons for a blocked group: a headline, counts per filter, then per-host lines.

    The default headline names the filter that emptied the candidate set: the
    last one that dropped any host (memory, then tags, then liveness).
    """
    kinds = {f.kind: 0 for f in filtered}
    for f in filtered:
        kinds[f.kind] += 1
    if not filtered:
        return ("no hosts in the cluster",)
    if headline is not None:
        pass
    elif MEMORY in kinds:
        headline = f"no host with {need_mb} MB free"
    elif TAG in kinds:
        wanted = ", ".join(f"{k}={constraints[k]}" for k in sorted(constraints))
        headline = f"no host with tag{'s' if len(constraints) > 1 else ''} {wanted}"
    else:
        headline = "no alive host"
    parts = []
    if NOT_ALIVE in kinds:
        parts.append(f"{kinds[NOT_ALIVE]} not alive")
    if TAG in kinds:
        parts.append(f"{kinds[TAG]} lacking a required tag")
    if MEMORY in kinds:
        parts.append(f"{kinds[MEMORY]} short of memory")
    n = len(filtered)
    lines = [headline, f"{n} host{'s' if n != 1 else ''} filtered: {', '.join(parts)}"]
    ordered = sorted(filtered, key=lambda f: f.host)
    lines.extend(str(f) for f in ordered[:MAX_HOST_REASONS])
    if len(ordered) > MAX_HOST_REASONS:
        lines.append(f"... and {len(ordered) - MAX_HOST_REASONS} more hosts")
    return tuple(lines)
