"""The one vocabulary: each name is accepted alike by records, the API edge, config and CLI."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flynnp2p import vocab
from flynnp2p.errors import UserError
from flynnp2p.state.errors import RecordError
from flynnp2p.state.schema import Str, unencodable_char

TERMS = [v for v in vars(vocab).values() if isinstance(v, vocab.Term)]


@pytest.mark.parametrize(
    ("term", "good", "bad"),
    [(vocab.APP_NAME, ["hello", "a-b-9", "a" * 63], ["Hello", "a-", "-a", "a--b", "a" * 64, "hello\n"]),
     (vocab.NODE_NAME, ["n1", "node-1.a_b"], ["", "-n", "n" * 64, "n1\n", "n 1"]),
     (vocab.TAG_KEY, ["disk", "zone.a"], ["Disk", "1a", "a" * 32]),
     (vocab.TAG_VALUE, ["", "ssd", "a/b:c"], ["a b", "x" * 129]),
     (vocab.ENV_NAME, ["A", "_X1"], ["1A", "A-B", "A" * 257]),
     (vocab.DOMAIN, ["a.example.com", "*.example.com"], ["A.com", "*.", "a..b", "a.*.b"]),
     (vocab.HOSTNAME, ["flynnp2p.localhost"], ["*.example.com", "x.", "x\n"]),
     (vocab.DIGEST, ["sha256:" + "0" * 64], ["sha256:" + "0" * 63, "md5:" + "0" * 64])],
)  # fmt: skip
def test_terms(term: vocab.Term, good: list[str], bad: list[str]) -> None:
    for value in good:
        assert term.ok(value) and term.check("x", value) == value
    for value in bad:
        assert not term.ok(value), value
        with pytest.raises(UserError, match=f"x: expected {term.accepted[:20]}"):
            term.check("x", value)


@given(st.sampled_from(TERMS), st.one_of(st.text(max_size=300), st.integers(), st.none()))
def test_a_record_field_accepts_what_its_term_accepts(term: vocab.Term, value: object) -> None:
    """A name the API (or the CLI, or config) lets in is one every peer's record check
    accepts, and the other way round: there is one rule, not two that agree today."""
    try:
        Str.of(term).decode("f", value)
        stored = True
    except RecordError:
        stored = False
    # The record check also refuses what peers cannot read (NUL, lone surrogates).
    readable = isinstance(value, str) and unencodable_char(value) is None
    assert stored == (term.ok(value) and readable)
