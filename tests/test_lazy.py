"""Lazy pull: range arithmetic (Hypothesis), the shared cache file (real files, real
concurrent processes), and reading a squash file through a real registry by HTTP Range."""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from squashstore.lazy import ranges
from squashstore.lazy.cache import CacheError, RangeCache
from squashstore.lazy.ranges import Span

# ---------------------------------------------------------------------------------------
# Range arithmetic.

spans = st.builds(lambda a, n: Span(a, a + n), st.integers(0, 300), st.integers(0, 40))


def covered(items: list[Span]) -> set[int]:
    return {b for s in items for b in range(s.start, s.end)}


@given(st.lists(spans, max_size=20), st.integers(0, 10))
def test_coalesce_covers_exactly_the_inputs_and_gaps(items: list[Span], gap: int) -> None:
    out = ranges.coalesce(items, gap)
    assert all(len(s) for s in out)
    for a, b in itertools.pairwise(out):
        assert b.start > a.end + gap  # sorted, disjoint, and not joinable
    inputs, outputs = covered(items), covered(out)
    assert inputs <= outputs
    extra = sorted(outputs - inputs)
    # Every byte added lies in a hole of at most `gap` bytes between input bytes.
    holes: list[list[int]] = []
    for byte in extra:
        if holes and holes[-1][-1] == byte - 1:
            holes[-1].append(byte)
        else:
            holes.append([byte])
    for hole in holes:
        assert len(hole) <= gap
        assert hole[0] - 1 in inputs and hole[-1] + 1 in inputs


@given(st.lists(spans, max_size=10), st.integers(1, 8), st.integers(1, 6))
def test_split_keeps_bytes_and_cuts_on_alignment(items: list[Span], align: int,
                                                 times: int) -> None:
    limit = align * times
    pieces = ranges.split(items, limit, align)
    assert [b for p in pieces for b in range(p.start, p.end)] == \
        [b for s in items for b in range(s.start, s.end)]
    for piece in pieces:
        assert 0 < len(piece) <= limit
    for a, b in itertools.pairwise(pieces):
        if a.end == b.start:  # a cut inside one input span
            assert a.end % align == 0


@given(st.binary(min_size=1, max_size=8), st.integers(1, 16), spans)
def test_missing_runs_are_exactly_the_absent_chunks(bitmap: bytes, chunk: int,
                                                    span: Span) -> None:
    chunks = len(bitmap) * 8
    size = chunks * chunk - random.Random(span.start).randrange(chunk)
    span = Span(min(span.start, size), min(span.end, size))
    touched = ranges.chunk_range(span, chunk)
    runs = ranges.missing_runs(bitmap, touched)
    absent = [i for i in touched if not ranges.has_chunk(bitmap, i)]
    assert [i for r in runs for i in r] == absent
    for a, b in itertools.pairwise(runs):
        assert b.start > a.stop  # maximal: runs never touch
    for s in ranges.runs_to_spans(runs, chunk, size):
        assert s.start % chunk == 0 and (s.end % chunk == 0 or s.end == size)
    # Reading the span is covered by its present chunks plus the missing spans.
    present = covered([Span(i * chunk, min((i + 1) * chunk, size)) for i in touched
                       if ranges.has_chunk(bitmap, i)])
    assert covered([span]) <= present | covered(ranges.runs_to_spans(runs, chunk, size))


@given(st.binary(max_size=16), st.integers(0, 128))
def test_set_and_count_chunks(bitmap: bytes, upto: int) -> None:
    upto = min(upto, len(bitmap) * 8)
    naive = sum(ranges.has_chunk(bitmap, i) for i in range(upto))
    assert ranges.count_present(bitmap, upto) == naive
    grown = bytearray(bitmap)
    ranges.set_chunks(grown, range(upto))
    assert ranges.count_present(grown, upto) == upto
    assert all(ranges.has_chunk(grown, i) == ranges.has_chunk(bitmap, i)
               for i in range(upto, len(bitmap) * 8))


@given(st.integers(1, 64), st.integers(1, 10), st.lists(st.integers(1, 50), min_size=1,
                                                      max_size=30))
def test_readahead_doubles_on_sequential_reads_and_stops_on_random(
        initial: int, factor: int, sizes: list[int]) -> None:
    maximum = initial * factor
    streams: tuple[ranges.Stream, ...] = ()
    pos, windows = 1000, []
    for size in sizes:
        streams, ahead = ranges.readahead(streams, Span(pos, pos + size), initial=initial,
                                          maximum=maximum)
        windows.append(ahead)
        pos += size
    assert windows[0] == 0  # the first read of a stream is taken as random
    for before, after in itertools.pairwise(windows[1:]):
        assert after == min(maximum, max(initial, before * 2))
    assert all(w <= maximum for w in windows)
    # A read far from every stream reads nothing ahead and starts a new stream.
    streams, ahead = ranges.readahead(streams, Span(0, 1), initial=initial, maximum=maximum)
    assert ahead == 0 and streams[0] == ranges.Stream(1, 0)


def test_readahead_follows_several_streams_at_once() -> None:
    streams: tuple[ranges.Stream, ...] = ()
    kw = {"initial": 10, "maximum": 80}
    for step in range(4):
        for base in (0, 10_000, 20_000):
            streams, ahead = ranges.readahead(
                streams, Span(base + 5 * step, base + 5 * step + 5), **kw)
            assert ahead == (0 if step == 0 else min(80, 10 * 2 ** (step - 1)))
    assert len(streams) == 3


# ---------------------------------------------------------------------------------------
# The cache file.

CHUNK = 4096


def blob_bytes(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def chunk_spans(size: int, chunk: int = CHUNK) -> list[Span]:
    return [Span(i, min(i + chunk, size)) for i in range(0, size, chunk)]


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    return directory


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_cache_stores_reads_and_survives_a_reopen(cache_dir: Path) -> None:
    blob = blob_bytes(10 * CHUNK + 123)
    digest = digest_of(blob)
    with RangeCache(cache_dir, digest, len(blob), CHUNK) as cache:
        assert cache.missing(Span(5, 9000)) == [Span(0, 3 * CHUNK)]
        cache.store([(Span(CHUNK, 2 * CHUNK), blob[CHUNK:2 * CHUNK])])
        assert cache.missing(Span(5, 9000)) == [Span(0, CHUNK), Span(2 * CHUNK, 3 * CHUNK)]
        last = Span(10 * CHUNK, len(blob))
        cache.store([(last, blob[last.start:])])
        assert cache.read(Span(CHUNK + 7, 2 * CHUNK)) == blob[CHUNK + 7:2 * CHUNK]
        assert not cache.complete()
        with pytest.raises(CacheError, match="chunk-aligned"):
            cache.store([(Span(1, CHUNK + 1), blob[1:CHUNK + 1])])
    # The data file is sparse: only what was stored occupies disk.
    assert os.stat(cache.data_path).st_blocks * 512 < 4 * CHUNK + 8192
    with RangeCache(cache_dir, digest, len(blob), CHUNK) as again:  # a remount
        assert again.present_chunks() == 2
        assert again.read(last) == blob[last.start:]
        again.store((s, blob[s.start:s.end]) for s in again.all_missing())
        assert again.complete()
    assert cache.data_path.read_bytes() == blob


def test_cache_refuses_another_blobs_map_and_an_open_directory(cache_dir: Path) -> None:
    blob = blob_bytes(3 * CHUNK)
    RangeCache(cache_dir, digest_of(blob), len(blob), CHUNK).close()
    with pytest.raises(CacheError, match="another blob"):
        RangeCache(cache_dir, digest_of(blob), len(blob) + 1, CHUNK)
    from squashstore.lazy.cache import check_directory

    check_directory(cache_dir)
    cache_dir.chmod(0o777)
    with pytest.raises(CacheError, match="writable only by it"):
        check_directory(cache_dir)


def test_cache_a_crash_before_the_header_leaves_a_new_cache(cache_dir: Path) -> None:
    blob = blob_bytes(2 * CHUNK)
    cache = RangeCache(cache_dir, digest_of(blob), len(blob), CHUNK)
    cache.store([(Span(0, CHUNK), blob[:CHUNK])])
    cache.close()
    with open(cache.map_path, "r+b") as f:  # header torn away, bits left behind
        f.write(bytes(128))
    with RangeCache(cache_dir, digest_of(blob), len(blob), CHUNK) as again:
        assert again.present_chunks() == 0
        assert again.missing(Span(0, len(blob))) == [Span(0, len(blob))]


def _fill_worker(directory: str, digest: str, size: int, seed: int, start: object) -> None:
    blob = blob_bytes(size)
    order = chunk_spans(size)
    random.Random(seed).shuffle(order)
    start.wait()  # type: ignore[attr-defined]
    stored = []
    with RangeCache(Path(directory), digest, size, CHUNK) as cache:
        for span in order[: len(order) * 2 // 3]:
            if cache.missing(span):
                cache.store([(span, blob[span.start:span.end])])
                stored.append(str(span.start))
    (Path(directory) / f"stored-{seed}").write_text(" ".join(stored))


def test_cache_is_shared_by_racing_processes(cache_dir: Path) -> None:
    size = 200 * CHUNK + 77
    blob = blob_bytes(size)
    digest = digest_of(blob)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    workers = [ctx.Process(target=_fill_worker,
                           args=(str(cache_dir), digest, size, seed, barrier))
               for seed in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    with RangeCache(cache_dir, digest, size, CHUNK) as cache:
        # No bit was lost to a racing read-modify-write of the map: every chunk a worker
        # stored is marked present.
        stored = {int(x) for seed in range(4)
                  for x in (cache_dir / f"stored-{seed}").read_text().split()}
        missing = cache.all_missing()
        present = [s for s in chunk_spans(size) if not cache.missing(s)]
        assert {s.start for s in present} == stored
        assert len(stored) > len(chunk_spans(size)) * 2 // 3
        for span in present:
            assert cache.read(span) == blob[span.start:span.end]
        cache.store((s, blob[s.start:s.end]) for s in missing)
        assert cache.complete()
    assert hashlib.sha256(cache.data_path.read_bytes()).hexdigest() == digest[7:]
