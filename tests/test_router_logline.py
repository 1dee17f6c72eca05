"""The router's log lines (flynnp2p/router/logline.py): the format, and that no
request can forge a field or a line (pure, with Hypothesis over hostile input)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from flynnp2p.cli.jobs import log_line
from flynnp2p.router.logline import SOURCE, RouterEvent, format_line, parse_line, quote


def event(**kw: object) -> RouterEvent:
    base: dict[str, object] = dict(
        code="H12", method="GET", path="/slow?x=1", host="shop.example", request_id="a" * 32,
        fwd="10.0.0.9", protocol="http", backend="web-3f2a@127.0.0.2:5001", connect_ms=1,
        service_ms=60000, status=504, bytes=38,
    )  # fmt: skip
    return RouterEvent(**{**base, **kw})  # type: ignore[arg-type]


def test_an_error_line_reads_like_herokus() -> None:
    assert format_line(event()) == (
        'at=error code=H12 desc="Request timeout" method=GET path="/slow?x=1" host=shop.example '
        f"request_id={'a' * 32} fwd=10.0.0.9 protocol=http backend=web-3f2a@127.0.0.2:5001 "
        "connect=1ms service=60000ms status=504 bytes=38"
    )


def test_a_503_without_backend_and_a_retry() -> None:
    line = parse_line(format_line(event(code="H10", backend="", connect_ms=0, service_ms=0, status=503)))
    assert (line["at"], line["code"], line["desc"], line["backend"], line["status"]) == (
        "error", "H10", "No backend is up", "", "503",
    )  # fmt: skip
    retry = parse_line(format_line(event(code="H21", retry="web-77aa@[::1]:5002", service_ms=0)))
    assert retry["at"] == "warning" and retry["desc"] == "Backend connection refused, retrying"
    assert retry["backend"] == "web-3f2a@127.0.0.2:5001" and retry["retry"] == "web-77aa@[::1]:5002"
    assert "status" not in retry and "bytes" not in retry  # nothing was answered yet


def test_the_cli_prints_a_router_line_as_router_on_its_node() -> None:
    item = {"ts_ms": 1_800_000_000_000, "node": "n2", "job_id": SOURCE, "type": "router",
            "stream": "stdout", "text": format_line(event(code="H10", status=503))}  # fmt: skip
    assert log_line(item) == f"2027-01-15T08:00:00.000Z router[n2]: {item['text']}"


def test_quoting() -> None:
    assert quote("GET") == "GET" and quote("") == '""'
    assert quote('a b"c\\') == '"a b\\"c\\\\"'
    assert quote("x\ny\r\x00é\u2028\U0001f600") == '"x\\x0ay\\x0d\\x00\\xe9\\u2028\\U0001f600"'


# Anything a client can put in a request line or a Host header (httptools hands the
# router bytes, which it decodes as latin-1), and any Unicode besides.
hostile = st.one_of(
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
    st.text(max_size=60),
    st.sampled_from(['" at=info code=H00 x="', "\n2026-01-01T00:00:00Z web.1: forged", "a=b c=d"]),
)


@given(method=hostile, path=hostile, host=hostile, fwd=hostile)
def test_hostile_values_make_one_printable_line_that_parses_back(
    method: str, path: str, host: str, fwd: str
) -> None:
    e = event(method=method, path=path, host=host, fwd=fwd)
    text = format_line(e)
    assert text.isascii() and text.isprintable()  # one line: no newline, no control character
    fields = parse_line(text)
    assert (fields["method"], fields["path"], fields["host"], fields["fwd"]) == (method, path, host, fwd)
    assert list(fields)[:3] == ["at", "code", "desc"] and fields["code"] == "H12"
    assert fields["status"] == "504" and len(fields) == 14  # no field added or lost
