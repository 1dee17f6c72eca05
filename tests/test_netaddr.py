"""IP:PORT parsing: what may become a URL or a socket address."""

from __future__ import annotations

import pytest

from flynnp2p.netaddr import ip_port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.2:7100", ("127.0.0.2", 7100)),
        ("[::1]:7100", ("::1", 7100)),
        ("127.0.0.2:0", None),
        ("127.0.0.2:65536", None),
        ("127.0.0.2:99999", None),
        ("127.0.0.2", None),
        ("host.example:80", None),  # a hostname: DNS where none may block
        ("not a host:port", None),
        ("127.0.0.2:+80", None),
        ("127.0.0.2: 80", None),
        ("::1:80", None),  # an unbracketed v6 address is ambiguous
        ("", None),
    ],
)
def test_only_an_ip_and_a_port_in_range_are_accepted(text: str, expected: tuple[str, int] | None) -> None:
    assert ip_port(text) == expected
