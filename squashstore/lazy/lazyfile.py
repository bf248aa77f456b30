"""A lazily pulled squash file as a `pread`-able object: cache first, registry for the rest.

`LazyFile` is what the squashfs reader opens instead of a local file (it has `size` and
`pread(size, offset)`). A read is served from the `RangeCache`; the chunks it lacks are
fetched from the `RangeSource`, merged into as few requests as possible, cut into pieces
fetched concurrently, written to the cache and only then returned. Reads that continue a
sequential stream also fetch a readahead window (doubling up to `readahead_max`) in the
same round, whose failure does not fail the read. Threads that need a chunk another
thread is already fetching wait for it instead of fetching it twice. `metadata_spans`
computes, from a superblock, the byte ranges that `ls` and `stat` need, so a lazy pull
fetches them up front; `fill` fetches everything still missing (completing the image).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from squashstore.lazy import ranges
from squashstore.lazy.cache import ChunkMismatch, RangeCache
from squashstore.lazy.ranges import Span
from squashstore.lazy.source import FetchError, RangeSource
from squashstore.squashfs import format

PIECE = 1 << 20
"""Most bytes per range request: big enough to amortise a request, small enough that
several go at once and a retry repeats little."""
READAHEAD = 128 << 10
READAHEAD_MAX = 4 << 20
FETCH_MIN = 256 << 10
"""Fewest bytes fetched for a read that misses (from the read's start): an import reads
hundreds of small files one after another, each miss a round trip (bench_lazy)."""
HEAD = 64 << 10
"""Bytes at the start of the image fetched up front: the superblock and compressor options."""
BULK_GAP = 256 << 10
"""A prefetch list's ranges at most this far apart are fetched as one: at 100 MB/s that is
2.6 ms, about a request's round trip (bench_lazy: a 1 MiB gap doubled the bytes moved)."""
BULK_MARGIN = 128 << 10
"""Bytes fetched past the end of each listed range: the kernel's readahead of a file read
at start-up reaches a little further one time than another."""
BULK_PIECE = 8 << 20
"""Most bytes per request of a bulk prefetch (its pieces are about a worker's share)."""


def metadata_spans(superblock: format.Superblock, size: int) -> list[Span]:
    """The spans holding everything but file data: the superblock (and compressor options)
    at the start, and from the first metadata table (inodes, directories, fragment, export,
    id and xattr tables) to the end of the image, where writers put them."""
    sb = superblock
    tables = [sb.inode_table, sb.directory_table, sb.id_table]
    tables += [t for t in (sb.fragment_table, sb.export_table, sb.xattr_id_table)
               if t != format.INVALID_BLK]
    first = min((t for t in tables if t <= size), default=size)
    return ranges.coalesce([Span(0, min(HEAD, size)), Span(first, size)])


class LazyFile:
    """The blob cached by `cache`, fetched from `source` where not yet cached."""

    def __init__(self, cache: RangeCache, source: RangeSource | None, *,
                 piece: int = PIECE, readahead_initial: int = READAHEAD,
                 readahead_max: int = READAHEAD_MAX, fetch_min: int = FETCH_MIN) -> None:
        if source is not None and source.size != cache.size:
            raise FetchError(f"{source.what}: the registry's blob is {source.size} bytes, the "
                             f"cache's {cache.size}")
        self.cache, self.source = cache, source
        self.size = cache.size
        self._piece = max(cache.chunk, piece // cache.chunk * cache.chunk)
        self._initial, self._max = readahead_initial, readahead_max
        self._fetch_min = fetch_min
        self._streams: tuple[ranges.Stream, ...] = ()
        self._lock = threading.Lock()
        self._inflight: dict[int, threading.Event] = {}

    def close(self) -> None:
        self.cache.close()

    # -- the reader's interface --------------------------------------------------------

    def pread(self, size: int, offset: int) -> bytes:
        """`size` bytes at `offset` (fewer at the end of the file)."""
        span = Span(offset, max(offset, min(offset + size, self.size)))
        with self._lock:
            self._streams, ahead = ranges.readahead(
                self._streams, span, initial=self._initial, maximum=self._max,
                slack=self.cache.chunk)
        # At least `fetch_min` bytes per miss: a request costs a round trip whatever its
        # size, and what lies next to a read is read next more often than not.
        ahead = max(ahead, self._fetch_min - len(span))
        optional = Span(span.end, min(self.size, span.end + ahead)) if ahead > 0 else None
        self.ensure([span], [optional] if optional else [])
        return self.cache.read(span)

    # -- fetching ----------------------------------------------------------------------

    def prefetch(self, spans: Sequence[Span]) -> None:
        """Make `spans` present (the metadata at a lazy pull, a start-up list)."""
        self.ensure(spans, [])

    def prefetch_bulk(self, spans: Sequence[Span], gap: int = BULK_GAP,
                      margin: int = BULK_MARGIN) -> None:
        """Make `spans` (a start-up prefetch list), each with `margin` bytes more at its
        end, present in few requests: what is missing, neighbours up to `gap` bytes apart
        merged, cut into about one piece per worker of the source (at least `PIECE`, at
        most `BULK_PIECE` bytes), fetched concurrently and stored as each arrives."""
        spans = [Span(s.start, min(self.size, s.end + margin)) for s in spans]
        if self.source is None:
            self.ensure(spans, [])
            return
        chunk = self.cache.chunk
        need = ranges.coalesce((m for s in spans for m in self.cache.missing(s)), gap)
        total = sum(len(s) for s in need)
        workers = max(1, self.source.workers)
        piece = min(BULK_PIECE, max(self._piece, -(-total // workers)))
        piece = -(-piece // chunk) * chunk
        mine, waits = self._claim(need)
        try:
            for fetched in self.source.fetch_each(ranges.split(mine, piece, chunk)):
                self.cache.store([fetched])
        finally:
            self._release(mine)
        for event in waits:
            event.wait()
        self.ensure(spans, [])  # what another thread was fetching, should that have failed

    def prefetch_metadata(self) -> None:
        """Fetch the superblock and every metadata table (`metadata_spans`), so `ls` and
        `stat` never wait on the registry; `ValueError` when the head is no superblock."""
        self.prefetch([Span(0, min(HEAD, self.size))])
        head = self.cache.read(Span(0, min(format.SUPERBLOCK_SIZE, self.size)))
        self.prefetch(metadata_spans(format.Superblock.unpack(head), self.size))

    def fill(self, progress: Callable[[int], None] | None = None) -> None:
        """Fetch everything still missing, `READAHEAD_MAX` bytes at a time."""
        missing = ranges.split(self.cache.all_missing(), READAHEAD_MAX, self.cache.chunk)
        done = self.cache.present_chunks() * self.cache.chunk
        for span in missing:
            self.ensure([span], [])
            done += len(span)
            if progress is not None:
                progress(min(done, self.size))

    def ensure(self, required: Sequence[Span], optional: Sequence[Span]) -> None:
        """Make `required` present (or raise `FetchError`); try `optional` on the way."""
        while True:
            need = ranges.coalesce(m for s in required for m in self.cache.missing(s))
            if not need:
                return
            extra = ranges.coalesce(m for s in optional for m in self.cache.missing(s))
            mine, waits = self._claim(need)
            mine_extra, _ = self._claim(extra) if mine else ([], [])
            if mine:
                try:
                    self._fetch(mine, mine_extra)
                finally:
                    self._release(mine + mine_extra)
            for event in waits:
                event.wait()

    def _claim(self, spans: list[Span]) -> tuple[list[Span], list[threading.Event]]:
        """The chunk runs of `spans` no other thread is fetching (now claimed by this one)
        and the events of those another thread is."""
        chunk = self.cache.chunk
        mine: list[range] = []
        waits: dict[int, threading.Event] = {}
        with self._lock:
            for span in spans:
                run_start: int | None = None
                indices = ranges.chunk_range(span, chunk)
                for index in indices:
                    event = self._inflight.get(index)
                    if event is None:
                        self._inflight[index] = threading.Event()
                        run_start = index if run_start is None else run_start
                        continue
                    waits[id(event)] = event
                    if run_start is not None:
                        mine.append(range(run_start, index))
                        run_start = None
                if run_start is not None:
                    mine.append(range(run_start, indices.stop))
        return ranges.runs_to_spans(mine, chunk, self.size), list(waits.values())

    def _release(self, spans: list[Span]) -> None:
        with self._lock:
            for span in spans:
                for index in ranges.chunk_range(span, self.cache.chunk):
                    event = self._inflight.pop(index, None)
                    if event is not None:
                        event.set()

    def _fetch(self, required: list[Span], optional: list[Span]) -> None:
        if self.source is None:
            raise FetchError(f"{self.cache.data_path}: bytes {required[0].start}-"
                             f"{required[0].end - 1} are not cached and the image has no "
                             "registry source")
        chunk = self.cache.chunk
        if optional:
            # One round: the read and its readahead, neighbours merged into one request.
            merged = ranges.split(ranges.coalesce([*required, *optional]), self._piece, chunk)
            try:
                self.cache.store(zip(merged, self.source.fetch_many(merged), strict=True))
                return
            except (FetchError, ChunkMismatch):
                pass  # the readahead may be what failed: the read alone, once more
            required = ranges.coalesce(m for s in required for m in self.cache.missing(s))
            if not required:
                return
        need = ranges.split(required, self._piece, chunk)
        self.cache.store(zip(need, self.source.fetch_many(need), strict=True))
