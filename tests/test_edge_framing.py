"""`framing_problem`, the pure core of the API's framing guard: raw headers in,
a refusal (status, reason) or None out."""

from __future__ import annotations

import pytest

from flynnp2p.api.framing import framing_problem, target_problem

LIMIT = 1 << 20


@pytest.mark.parametrize(
    ("headers", "status", "says"),
    [
        ([(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")], 400, "both"),
        ([(b"transfer-encoding", b"chunked"), (b"content-length", b"0")], 400, "both"),
        ([(b"Content-Length", b"5"), (b"content-length", b"5")], 400, "2 Content-Length"),
        ([(b"Content-Length", b"5"), (b"Content-Length", b"6")], 400, "2 Content-Length"),
        ([(b"Content-Length", b"5, 5")], 400, "non-negative decimal"),
        ([(b"Content-Length", b"abc")], 400, "non-negative decimal"),
        ([(b"Content-Length", b"-1")], 400, "non-negative decimal"),
        ([(b"Content-Length", b"+1")], 400, "non-negative decimal"),
        ([(b"Content-Length", b"1_0")], 400, "non-negative decimal"),
        ([(b"Content-Length", b"")], 400, "non-negative decimal"),
        ([(b"Transfer-Encoding", b"gzip")], 400, "only 'chunked'"),
        ([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")], 400, "2 Transfer"),
        ([(b"Content-Length", str(LIMIT + 1).encode())], 413, f"limit of {LIMIT} bytes"),
        ([(b"Content-Length", b"5000000000")], 413, "5000000000 bytes"),
        ([(b"Content-Length", b"9" * 5000)], 413, "over this endpoint's limit"),
    ],
)
def test_ambiguous_or_oversized_framing_is_refused_with_a_reason(
    headers: list[tuple[bytes, bytes]], status: int, says: str
) -> None:
    refusal = framing_problem(headers, LIMIT)
    assert refusal is not None and refusal.status == status
    assert says in refusal.message


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"Content-Length", b"0")],
        [(b"Content-Length", str(LIMIT).encode())],
        [(b"content-length", b" 17 ")],  # optional whitespace around a field value
        [(b"Transfer-Encoding", b"Chunked")],
        [(b"Content-Type", b"application/json"), (b"Content-Length", b"2")],
    ],
)
def test_one_unambiguous_framing_passes(headers: list[tuple[bytes, bytes]]) -> None:
    assert framing_problem(headers, LIMIT) is None


@pytest.mark.parametrize("path", ["/v1/apps/\x00", "/v1/apps/a\nb/jobs", "/v1/apps/\x7f", "/\t"])
def test_a_path_with_a_control_character_is_refused(path: str) -> None:
    refusal = target_problem(path)
    assert refusal is not None and refusal.status == 400 and "control character" in refusal.message


@pytest.mark.parametrize("path", ["/v1/apps/web", "/v1/apps/caf\u00e9", "/v1/apps/\ufffd", "/ "])
def test_a_printable_path_passes(path: str) -> None:
    assert target_problem(path) is None
