"""Byte-range arithmetic for lazy reads: pure functions over plain data, no I/O.

A `Span` is a half-open byte range ``[start, end)``. A file is cut into fixed-size chunks
and a chunk *bitmap* (bit ``i`` of byte ``i // 8``, least significant bit first) says which
chunks are present. This module answers the questions the cache and the fetcher ask:
which chunks a read touches (`chunk_range`), which runs of them are missing
(`missing_runs`) and as which byte spans (`runs_to_spans`), how to merge neighbouring spans
into fewer requests (`coalesce`) and cut big ones for concurrent fetching (`split`), and how
far to read ahead of a read that continues a sequential stream (`readahead`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class Span:
    """The bytes ``[start, end)`` of a file."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"bad span [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start


def coalesce(spans: Iterable[Span], gap: int = 0) -> list[Span]:
    """Sorted, disjoint spans covering `spans`; spans at most `gap` bytes apart are joined
    (the gap's bytes then come along: one request instead of two)."""
    result: list[Span] = []
    for span in sorted(s for s in spans if len(s)):
        if result and span.start <= result[-1].end + gap:
            last = result[-1]
            if span.end > last.end:
                result[-1] = Span(last.start, span.end)
        else:
            result.append(span)
    return result


def split(spans: Iterable[Span], limit: int, align: int = 1) -> list[Span]:
    """`spans` cut into pieces of at most `limit` bytes whose cuts fall on multiples of
    `align` (pieces fetched concurrently, each small enough to retry cheaply)."""
    if limit < align or limit % align:
        raise ValueError("limit must be a positive multiple of align")
    pieces: list[Span] = []
    for span in spans:
        start = span.start
        while span.end - start > limit:
            cut = (start + limit) // align * align
            if cut <= start:  # pragma: no cover - limit >= align prevents it
                cut = start + limit
            pieces.append(Span(start, cut))
            start = cut
        if start < span.end:
            pieces.append(Span(start, span.end))
    return pieces


def chunk_count(size: int, chunk: int) -> int:
    return -(-size // chunk)


def chunk_range(span: Span, chunk: int) -> range:
    """The indices of the chunks `span` touches."""
    if not len(span):
        return range(0)
    return range(span.start // chunk, (span.end - 1) // chunk + 1)


def has_chunk(bitmap: bytes | bytearray, index: int) -> bool:
    return bool(bitmap[index >> 3] >> (index & 7) & 1)


def set_chunks(bitmap: bytearray, chunks: range) -> None:
    """Set the bits of `chunks` in `bitmap`."""
    for index in chunks:
        bitmap[index >> 3] |= 1 << (index & 7)


def missing_runs(bitmap: bytes | bytearray, chunks: range) -> list[range]:
    """The maximal runs of consecutive chunks in `chunks` whose bits are clear."""
    runs: list[range] = []
    first: int | None = None
    for index in chunks:
        if has_chunk(bitmap, index):
            if first is not None:
                runs.append(range(first, index))
                first = None
        elif first is None:
            first = index
    if first is not None:
        runs.append(range(first, chunks.stop))
    return runs


def runs_to_spans(runs: Iterable[range], chunk: int, size: int) -> list[Span]:
    """The byte spans of chunk runs, the last clipped to the file's `size`."""
    return [Span(r.start * chunk, min(r.stop * chunk, size)) for r in runs if len(r)]


def count_present(bitmap: bytes | bytearray, chunks: int) -> int:
    """How many of the first `chunks` bits are set."""
    full, rest = divmod(chunks, 8)
    total = sum(byte.bit_count() for byte in bitmap[:full])
    if rest:
        total += (bitmap[full] & ((1 << rest) - 1)).bit_count()
    return total


@dataclass(frozen=True, slots=True)
class Stream:
    """One sequential reader being followed: where its last read ended and how far ahead
    the next continuation reads."""

    end: int
    window: int


def readahead(
    streams: tuple[Stream, ...],
    span: Span,
    *,
    initial: int,
    maximum: int,
    slack: int = 0,
    keep: int = 8,
) -> tuple[tuple[Stream, ...], int]:
    """The streams after a read of `span`, and how many bytes to read ahead past its end.

    A read that starts where a followed stream ended (up to `slack` bytes later) continues
    it: its window doubles from `initial` up to `maximum` and that many bytes are read
    ahead. Any other read starts a new stream and reads nothing ahead (random access pays
    for no more than it reads). At most `keep` streams are followed, the latest first.
    """
    for i, stream in enumerate(streams):
        if stream.end <= span.start <= stream.end + slack:
            window = min(maximum, max(initial, stream.window * 2 if stream.window else initial))
            rest = streams[:i] + streams[i + 1:]
            return (Stream(span.end, window), *rest)[:keep], window
    return (Stream(span.end, 0), *streams)[:keep], 0
