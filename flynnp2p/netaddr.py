"""``IP:PORT`` text (``[v6]:PORT`` too) as the agent advertises it: parsed and checked
once, so nothing downstream builds a URL or a socket address from a malformed one."""

from __future__ import annotations

import ipaddress


def ip_port(text: str) -> tuple[str, int] | None:
    """(host, port) of an ``IP:PORT`` address, or None if it is anything else."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None  # an IPv6 address takes brackets, or its last group reads as a port
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    number = int(port)
    return (host, number) if 1 <= number <= 65535 else None


def url_host(addr: str) -> str:
    """An address as it stands in a URL or ``HOST:PORT`` (IPv6 in brackets)."""
    return f"[{addr}]" if ":" in addr else addr
