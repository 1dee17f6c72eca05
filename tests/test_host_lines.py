"""A child's output read as lines: bounded, nothing lost, whatever the reads' sizes."""

from __future__ import annotations

import random

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from flynnp2p.host.spawn import MAX_LINE, line_batches


class Chunky:
    """A stream that hands out its bytes in reads of random sizes."""

    def __init__(self, data: bytes, seed: int) -> None:
        self.data, self.at, self.rng = data, 0, random.Random(seed)

    async def receive_some(self, max_bytes: int) -> bytes:
        n = self.rng.randint(1, max_bytes)
        chunk = self.data[self.at : self.at + n]
        self.at += len(chunk)
        return chunk


def lines_of(data: bytes, seed: int) -> list[bytes]:
    async def read() -> list[bytes]:
        out: list[bytes] = []
        async for batch in line_batches(Chunky(data, seed)):  # type: ignore[arg-type]
            out += batch
        return out

    return trio.run(read)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 3 * MAX_LINE), min_size=1, max_size=5),
    st.booleans(),
    st.integers(0, 2**32),
)
def test_lines_are_bounded_and_nothing_is_lost(lengths: list[int], newline_at_end: bool, seed: int) -> None:
    data = b"\n".join(b"x" * n for n in lengths) + (b"\n" if newline_at_end else b"")
    out = lines_of(data, seed)
    assert all(len(line) <= MAX_LINE for line in out)
    assert b"".join(out) == data.replace(b"\n", b"")
    # A line of n bytes is ceil(n / MAX_LINE) pieces (an empty line is one).
    expected = sum(max(1, -(-n // MAX_LINE)) for n in lengths)
    if not newline_at_end and lengths[-1] == 0:
        expected -= 1  # nothing after the last newline: no last line
    assert len(out) == expected


def test_a_long_line_before_a_newline_in_one_read_is_split() -> None:
    """The bug this module had: a read that completes a line past MAX_LINE gave it whole."""
    class TwoReads:
        chunks = [b"x" * (MAX_LINE - 1), b"x" * 101 + b"\nend\n", b""]

        async def receive_some(self, max_bytes: int) -> bytes:
            return self.chunks.pop(0)

    async def read() -> list[bytes]:
        return [line async for batch in line_batches(TwoReads()) for line in batch]  # type: ignore[arg-type]

    out = trio.run(read)
    assert [len(p) for p in out[:-1]] == [MAX_LINE, 100] and out[-1] == b"end"
