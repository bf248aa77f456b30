"""The local cache of one lazily pulled blob: a sparse data file and a map of its chunks.

`RangeCache` owns two files in a cache directory, named after the blob's digest:
``<hex>.data``, a sparse file of the blob's full size holding the bytes fetched so far at
their own offsets, and ``<hex>.map``, a header (magic, blob size, chunk size, digest) and a
bitmap with one bit per `chunk`-sized piece of the blob. Every process that serves the
blob on the host opens the same two files (so containers of one image share what any of
them fetched, and a remount finds it again). A bit is set only after its chunk's bytes
are written and flushed to disk (`fdatasync`), under an exclusive ``flock`` of the map,
by or-ing it into the bytes on disk; bits are never cleared except by `reset`, so readers
need no lock: a bit they have not seen yet only costs a duplicate fetch, whose bytes are
the same. The cache is `complete` when every bit is set; then the data file is the blob.
Given the blob's per-chunk digests (`squashstore.lazy.chunkdigests`), `store` checks every
chunk against its digest before writing it: a wrong one is neither written nor marked, and
the store raises `ChunkMismatch` (errno EIO) once the right ones are in.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from squashstore.image import SquashstoreError
from squashstore.lazy import ranges
from squashstore.lazy.ranges import Span

if TYPE_CHECKING:
    from squashstore.lazy.chunkdigests import ChunkDigests

CHUNK = 64 << 10
"""Bytes per map bit: small enough that a few small files cost little, large enough that
the map of a 10 GB blob is 20 KB."""
MAGIC = b"SQSLAZY1"
_HEADER = struct.Struct("<8sQI4x96s")
HEADER_SIZE = 128
"""The map's bitmap starts here (the header struct, zero-padded)."""


class CacheError(SquashstoreError):
    """A cache file is unusable (not ours, of another blob, or unwritable)."""


class ChunkMismatch(CacheError, OSError):
    """Fetched bytes of a chunk do not match its digest (errno EIO: the read that needed
    them fails, a later one fetches them again)."""

    def __init__(self, message: str) -> None:
        OSError.__init__(self, errno.EIO, message)

    def __str__(self) -> str:
        return str(self.strerror)


def _hex(digest: str) -> str:
    algorithm, _, hex_ = digest.partition(":")
    if not algorithm.isalnum() or not hex_ or not all(c in "0123456789abcdef" for c in hex_):
        raise CacheError(f"bad blob digest {digest!r}")
    return hex_


def data_path(directory: Path, digest: str) -> Path:
    """Where the cache of `digest` keeps its bytes (the blob itself once complete)."""
    return directory / f"{_hex(digest)}.data"


def map_path(directory: Path, digest: str) -> Path:
    return directory / f"{_hex(digest)}.map"


def check_directory(directory: Path) -> None:
    """Refuse a cache directory another user could write to or swap (it would feed us
    bytes, or, for `cleanup`, point our removals elsewhere): it must be a real directory
    (not a symlink), ours, writable only by us, and every directory above it root's or
    ours and writable by no one else (a sticky one such as /tmp allowed)."""
    try:
        st = os.lstat(directory)
    except OSError as exc:
        raise CacheError(f"{directory}: cannot use as cache directory: {exc.strerror}") \
            from None
    if stat.S_ISLNK(st.st_mode):
        raise CacheError(f"{directory}: a symlink, not a cache directory of its own")
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"{directory}: not a directory")
    me = os.geteuid()
    if st.st_uid != me or st.st_mode & 0o022:
        raise CacheError(f"{directory}: cache directory must be owned by uid {me} "
                         "and writable only by it")
    given = Path(os.path.abspath(directory))
    real = Path(os.path.realpath(directory))
    for parent in {*given.parents, *real.parents}:
        try:
            pst = os.lstat(parent)
        except OSError as exc:
            raise CacheError(f"{parent}: {exc.strerror}") from None
        # A symlink's owner can point it elsewhere; a directory's writers can swap entries.
        writable = not stat.S_ISLNK(pst.st_mode) and pst.st_mode & 0o022 and \
            not pst.st_mode & stat.S_ISVTX
        if pst.st_uid not in (0, me) or writable:
            raise CacheError(f"{directory}: {parent} (uid {pst.st_uid}, mode "
                             f"{stat.S_IMODE(pst.st_mode):04o}) can be changed by another "
                             "user: not a cache directory")


def header(digest: str, size: int, chunk: int) -> bytes:
    """The map's header for the blob `digest` of `size` bytes in `chunk`-byte chunks."""
    encoded = digest.encode()
    if len(encoded) > 96:
        raise CacheError(f"digest too long: {digest}")
    return _HEADER.pack(MAGIC, size, chunk, encoded).ljust(HEADER_SIZE, b"\0")


def read_bitmap(map_: Path, digest: str, size: int, chunk: int = CHUNK) -> bytes | None:
    """The chunk bitmap of another process's cache map, read without writing anything (a
    shared store's, perhaps read-only to us); None when absent or of another blob."""
    try:
        data = map_.read_bytes()
    except OSError:
        return None
    length = -(-ranges.chunk_count(size, chunk) // 8)
    if data[:HEADER_SIZE] != header(digest, size, chunk) or \
            len(data) != HEADER_SIZE + length:
        return None
    return data[HEADER_SIZE:]


def _open(path: Path, readonly: bool = False) -> int:
    flags = os.O_RDONLY | os.O_NONBLOCK if readonly else os.O_RDWR | os.O_CREAT
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise CacheError(f"{path}: cannot open cache file: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_uid != os.geteuid() and not readonly):
        os.close(fd)
        raise CacheError(f"{path}: not a cache file of uid {os.geteuid()}")
    return fd


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:  # pragma: no cover - pwrite raises rather than returning 0
            raise OSError(errno.ENOSPC, "short write")
        view = view[written:]
        offset += written


class RangeCache:
    """The cache of the blob `digest` of `size` bytes: its bytes in `data` and its map in
    `map_` (both created if absent). `in_directory` names them after the digest. With
    `digests` (the blob's per-chunk digests) every chunk stored is checked first."""

    def __init__(self, data: Path, map_: Path, digest: str, size: int,
                 chunk: int = CHUNK, digests: ChunkDigests | None = None,
                 readonly: bool = False) -> None:
        if size < 0 or chunk <= 0:
            raise CacheError(f"bad cache geometry (size {size}, chunk {chunk})")
        _hex(digest)
        if digests is not None and (digests.digest, digests.size, digests.chunk) != \
                (digest, size, chunk):
            raise CacheError(f"the chunk digests of {digests.digest} for the cache of "
                             f"{digest}")
        self.digest, self.size, self.chunk = digest, size, chunk
        self.digests = digests
        self.chunks = ranges.chunk_count(size, chunk)
        self.data_path, self.map_path = Path(data), Path(map_)
        self._bitmap = bytearray(-(-self.chunks // 8))
        self._lock = threading.Lock()
        self.readonly = readonly
        """Only read (`verify`, or another user's store): nothing created, written or
        repaired; a map that is not whole and of this blob is a `CacheError`."""
        self._map = _open(self.map_path, readonly)
        try:
            self._data = _open(self.data_path, readonly)
        except BaseException:
            os.close(self._map)
            raise
        try:
            self._initialise()
        except BaseException:
            self.close()
            raise

    @classmethod
    def in_directory(cls, directory: Path, digest: str, size: int,
                     chunk: int = CHUNK, digests: ChunkDigests | None = None) -> RangeCache:
        """The cache of `digest` in a cache directory of its own (``<hex>.data``/``.map``)."""
        return cls(data_path(directory, digest), map_path(directory, digest), digest, size,
                   chunk, digests)

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        for name in ("_data", "_map"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> RangeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            fcntl.flock(self._map, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._map, fcntl.LOCK_UN)

    def _header(self) -> bytes:
        return header(self.digest, self.size, self.chunk)

    def _initialise(self) -> None:
        expected = self._header()
        with self._locked():
            current = os.pread(self._map, HEADER_SIZE, 0)
            if current == expected and \
                    os.fstat(self._map).st_size == HEADER_SIZE + len(self._bitmap) and \
                    os.fstat(self._data).st_size == self.size:
                self._bitmap[:] = os.pread(self._map, len(self._bitmap), HEADER_SIZE)
                return
            if self.readonly:
                raise CacheError(f"{self.map_path}: not a whole chunk map of {self.digest} "
                                 f"(or {self.data_path} is not {self.size} bytes)")
            if current.strip(b"\0") and current != expected:
                raise CacheError(f"{self.map_path}: the cache of another blob or format")
            # New (or left half-made by a crash): empty map first, header last. Bytes
            # already in the data file stay (it may be a store's squash file) but count
            # for nothing until fetched again.
            if os.fstat(self._data).st_size != self.size:
                os.ftruncate(self._data, self.size)
            os.ftruncate(self._map, 0)
            os.ftruncate(self._map, HEADER_SIZE + len(self._bitmap))
            os.fsync(self._map)
            _pwrite_all(self._map, expected, 0)
            os.fsync(self._map)

    # -- the map -----------------------------------------------------------------------

    def _refresh(self, chunks: range) -> None:
        """Pick up bits other processes set for `chunks` (bits only ever get set)."""
        if not len(chunks):
            return
        first, last = chunks.start >> 3, ((chunks.stop - 1) >> 3) + 1
        disk = os.pread(self._map, last - first, HEADER_SIZE + first)
        with self._lock:
            for i, byte in enumerate(disk):
                self._bitmap[first + i] |= byte

    def refresh(self) -> None:
        """Re-read the whole map from disk."""
        self._refresh(range(self.chunks))

    def _chunks(self, span: Span) -> range:
        if span.end > self.size:
            raise CacheError(f"{self.data_path}: span {span} beyond the blob's {self.size} "
                             "bytes")
        return ranges.chunk_range(span, self.chunk)

    def missing(self, span: Span) -> list[Span]:
        """The chunk-aligned spans of `span`'s chunks not yet present (sorted)."""
        chunks = self._chunks(span)
        if not ranges.missing_runs(self._bitmap, chunks):
            return []
        self._refresh(chunks)
        return ranges.runs_to_spans(ranges.missing_runs(self._bitmap, chunks), self.chunk,
                                    self.size)

    def all_missing(self) -> list[Span]:
        return self.missing(Span(0, self.size))

    def present_chunks(self) -> int:
        return ranges.count_present(self._bitmap, self.chunks)

    def present_bytes(self) -> int:
        """Bytes present (the last chunk counted at its own, shorter length)."""
        total = self.present_chunks() * self.chunk
        if self.chunks and ranges.has_chunk(self._bitmap, self.chunks - 1):
            total -= self.chunks * self.chunk - self.size
        return total

    def complete(self) -> bool:
        """Whether every chunk is present (the data file is then the whole blob)."""
        if self.present_chunks() < self.chunks:
            self.refresh()
        return self.present_chunks() == self.chunks

    # -- data --------------------------------------------------------------------------

    def _verified(self, span: Span, data: bytes) -> tuple[list[tuple[Span, memoryview]],
                                                          list[int]]:
        """`span`'s chunks whose bytes match their digests (as runs) and the indices of
        those that do not (all of them match without digests)."""
        view = memoryview(data)
        if self.digests is None:
            return [(span, view)], []
        good: list[tuple[Span, memoryview]] = []
        bad: list[int] = []
        run = span.start
        for index in self._chunks(span):
            start = index * self.chunk
            end = min(start + self.chunk, self.size)
            if self.digests.matches(index, view[start - span.start:end - span.start]):
                continue
            bad.append(index)
            if run < start:
                good.append((Span(run, start), view[run - span.start:start - span.start]))
            run = end
        if run < span.end:
            good.append((Span(run, span.end), view[run - span.start:]))
        return good, bad

    def store(self, pieces: Iterable[tuple[Span, bytes]]) -> None:
        """Write fetched chunk-aligned pieces, flush them, then mark them present; chunks
        that do not match their digests are left out and raise `ChunkMismatch` after."""
        if self.readonly:
            raise CacheError(f"{self.data_path}: opened read-only")
        marks: list[range] = []
        wrong: list[int] = []
        for span, data in pieces:
            if len(data) != len(span):
                raise CacheError(f"{self.data_path}: {len(data)} bytes for span {span}")
            if span.start % self.chunk or (span.end % self.chunk and span.end != self.size):
                raise CacheError(f"{self.data_path}: span {span} is not chunk-aligned")
            good, bad = self._verified(span, data)
            wrong += bad
            for piece, view in good:
                _pwrite_all(self._data, view, piece.start)
                marks.append(self._chunks(piece))
        if marks:
            self._mark(marks)
        if wrong:
            raise ChunkMismatch(
                f"{self.digest}: {len(wrong)} chunk(s) from {wrong[0] * self.chunk} fetched "
                "with the wrong digest (registry or blob storage served other bytes); "
                "not cached")

    def _mark(self, marks: list[range]) -> None:
        os.fdatasync(self._data)
        with self._locked():
            for chunks in marks:
                if not len(chunks):
                    continue
                first, last = chunks.start >> 3, ((chunks.stop - 1) >> 3) + 1
                disk = bytearray(os.pread(self._map, last - first, HEADER_SIZE + first))
                window = bytearray(last - first)
                ranges.set_chunks(window, range(chunks.start - first * 8,
                                                chunks.stop - first * 8))
                for i, byte in enumerate(window):
                    disk[i] |= byte
                _pwrite_all(self._map, bytes(disk), HEADER_SIZE + first)
                for i, byte in enumerate(disk):
                    self._bitmap[first + i] |= byte

    def read(self, span: Span) -> bytes:
        """The cached bytes of `span` (the caller made sure they are present)."""
        data = os.pread(self._data, len(span), span.start)
        if len(data) != len(span):
            raise CacheError(f"{self.data_path}: short read at {span.start}")
        return data

    def reset(self) -> None:
        """Forget everything (a complete cache whose digest turned out wrong)."""
        if self.readonly:
            raise CacheError(f"{self.data_path}: opened read-only")
        with self._locked():
            os.ftruncate(self._map, HEADER_SIZE)
            os.ftruncate(self._map, HEADER_SIZE + len(self._bitmap))
            self._bitmap[:] = bytes(len(self._bitmap))
            os.ftruncate(self._data, 0)
            os.ftruncate(self._data, self.size)
