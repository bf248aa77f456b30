"""Per-chunk digests of a squash file: what lets a lazy image trust each chunk it fetches.

A lazily pulled image's bytes arrive chunk by chunk from a registry (or the blob storage it
redirects to), long before the whole file's digest can be checked. `push` therefore sends,
as an optional artifact layer (`MEDIA_TYPE`, docs/artifact-format.md), the sha256 of every
`CHUNK`-sized piece of the squash file (the last one short), with the chunk size and the
whole file's digest and size; the manifest pins the list's own digest, so trust flows from
the manifest digest `pull` already checks (as eStargz's TOC and SOCI's zTOC do). This module
owns that list: its binary form, computing it from a file, checking one read from a registry
against the squash file it must describe, and where a store keeps it (beside the lazy
marker, `squashstore.lazy.paths.chunks_path`). `RangeCache` checks every chunk against it
before writing the chunk or setting its bit.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from squashstore.image import SourceError
from squashstore.lazy import ranges
from squashstore.lazy.paths import chunks_path, read_kept

MEDIA_TYPE = "application/vnd.squashstore.image.chunk-digests.v1"
"""The list's blob in an artifact (an optional layer; older pullers ignore it)."""
CHUNK = 64 << 10
"""The chunk size `push` lists (the lazy cache's chunk, `squashstore.lazy.cache.CHUNK`)."""
MAGIC = b"SQSCHKD1"
_HEADER = struct.Struct("<8sIIQ32s")
"""magic, chunk size, reserved (0), squash file size, sha256 of the whole squash file."""
HEADER_SIZE = 64
"""The header struct zero-padded; the digests (32 raw bytes each) follow."""
DIGEST_SIZE = 32


@dataclass(frozen=True)
class ChunkDigests:
    """The sha256 of each `chunk`-byte piece of the squash file `digest` of `size` bytes;
    `table` is their raw 32-byte values, in order."""

    digest: str
    size: int
    chunk: int
    table: bytes

    @property
    def count(self) -> int:
        return len(self.table) // DIGEST_SIZE

    def expected(self, index: int) -> bytes:
        return self.table[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]

    def matches(self, index: int, data: bytes | memoryview) -> bool:
        """Whether `data` is chunk `index` (whole: the last one at its own length)."""
        return 0 <= index < self.count and \
            hashlib.sha256(data).digest() == self.expected(index)

    def to_bytes(self) -> bytes:
        whole = bytes.fromhex(self.digest.removeprefix("sha256:"))
        head = _HEADER.pack(MAGIC, self.chunk, 0, self.size, whole).ljust(HEADER_SIZE, b"\0")
        return head + self.table


def limit(size: int, chunk: int = CHUNK) -> int:
    """The list's exact size for a `size`-byte squash file in `chunk`-byte chunks (the most
    a pull reads: 32 bytes per 64 KiB)."""
    return HEADER_SIZE + DIGEST_SIZE * ranges.chunk_count(size, chunk)


class Hasher:
    """Builds the list while the squash file streams past (`update` in order), so a push
    reads the file once for its digest and its chunks."""

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        self._whole = hashlib.sha256()
        self._piece = hashlib.sha256()
        self._filled = 0
        self._table = bytearray()
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self._whole.update(view)
        self.size += len(view)
        while view:
            take = min(len(view), self.chunk - self._filled)
            self._piece.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.chunk:
                self._table += self._piece.digest()
                self._piece, self._filled = hashlib.sha256(), 0

    def result(self) -> ChunkDigests:
        table = bytes(self._table) + (self._piece.digest() if self._filled else b"")
        return ChunkDigests("sha256:" + self._whole.hexdigest(), self.size, self.chunk, table)


def compute(path: Path, chunk: int = CHUNK) -> ChunkDigests:
    hasher = Hasher(chunk)
    with path.open("rb") as f:
        while data := f.read(1 << 20):
            hasher.update(data)
    return hasher.result()


def compute_bytes(data: bytes, chunk: int = CHUNK) -> ChunkDigests:
    hasher = Hasher(chunk)
    hasher.update(data)
    return hasher.result()


def parse(data: bytes, what: str) -> ChunkDigests:
    """A list read from a registry or a store; `SourceError` when it is malformed."""
    if len(data) < HEADER_SIZE:
        raise SourceError(f"{what}: chunk digest list too short ({len(data)} bytes)")
    magic, chunk, reserved, size, whole = _HEADER.unpack_from(data)
    if magic != MAGIC or reserved or data[_HEADER.size:HEADER_SIZE].strip(b"\0"):
        raise SourceError(f"{what}: not a chunk digest list ({MAGIC.decode()})")
    if chunk <= 0 or chunk % 4096:
        raise SourceError(f"{what}: chunk digest list with a bad chunk size {chunk}")
    if len(data) != limit(size, chunk):
        raise SourceError(f"{what}: chunk digest list has {len(data) - HEADER_SIZE} bytes of "
                          f"digests, a {size}-byte file in {chunk}-byte chunks needs "
                          f"{limit(size, chunk) - HEADER_SIZE}")
    return ChunkDigests("sha256:" + whole.hex(), size, chunk, bytes(data[HEADER_SIZE:]))


def for_squash(listed: ChunkDigests, digest: str, size: int, what: str,
               chunk: int = CHUNK) -> ChunkDigests:
    """`listed`, checked to be about the squash file `digest` of `size` bytes in the lazy
    cache's `chunk`-byte chunks."""
    if (listed.digest, listed.size) != (digest, size):
        raise SourceError(f"{what}: the chunk digest list is of another squash file "
                          f"({listed.digest}, {listed.size} bytes)")
    if listed.chunk != chunk:
        raise SourceError(f"{what}: the chunk digest list has {listed.chunk}-byte chunks, "
                          f"lazy pulls use {chunk}")
    return listed


def save(squash: Path, listed: ChunkDigests) -> Path:
    """Keep `listed` beside the lazy marker of the store's squash file `squash`."""
    from squashstore.atomic import atomic_write

    path = chunks_path(squash)
    path.parent.mkdir(mode=0o755, exist_ok=True)
    atomic_write(path, listed.to_bytes())
    return path


def load(squash: Path, digest: str, size: int, chunk: int = CHUNK) -> ChunkDigests | None:
    """The list a store keeps for the lazy squash file `squash` (of blob `digest`), None
    when it has none (an artifact pushed without one: chunks unverified until complete)."""
    path = chunks_path(squash)
    data = read_kept(path, limit(size, chunk))
    if data is None:
        return None
    return for_squash(parse(data, str(path)), digest, size, str(path), chunk)
