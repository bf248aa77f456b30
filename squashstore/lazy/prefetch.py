"""Start-up prefetch lists: which byte ranges of a squash file a container start reads.

A lazily pulled image pays one registry round trip per miss, and a start (an interpreter
importing hundreds of small modules) misses hundreds of times. A prefetch list names the
ranges a typical start read, so `pull --lazy` fetches them first, in bulk (neighbours merged,
pieces fetched concurrently), before anything runs. This module owns the list: its JSON form
(`MEDIA_TYPE`, docs/artifact-format.md), checking a list read from a registry, where a store
keeps one (``<store meta>/prefetch/<layer>.json``, pushed with the image), and `Recorder`,
the byte source the FUSE server reads through while ``squashstore record`` runs a command,
which appends the index of every chunk read for the first time to a file.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from squashstore.image import SourceError
from squashstore.lazy import ranges
from squashstore.lazy.paths import PREFETCH_DIR, read_kept
from squashstore.lazy.ranges import Span
from squashstore.squashfs.meta import ByteSource

MEDIA_TYPE = "application/vnd.squashstore.image.prefetch.v1+json"
"""The prefetch list's blob in an artifact (an optional layer; older pullers ignore it)."""
VERSION = 1
RECORD_CHUNK = 64 << 10
"""Granularity of a recording (the lazy cache's chunk: a smaller one buys nothing)."""
LIMIT = 16 << 20
"""Largest prefetch blob a pull reads."""
MAX_RANGES = 1 << 20


@dataclass(frozen=True)
class PrefetchList:
    """The `spans` (sorted, disjoint) of the squash file `digest` of `size` bytes that a
    start read; `command` says what was recorded (informational)."""

    digest: str
    size: int
    spans: tuple[Span, ...]
    command: str = ""

    @property
    def total(self) -> int:
        return sum(len(s) for s in self.spans)

    def to_json(self) -> bytes:
        doc = {"version": VERSION, "squash": {"digest": self.digest, "size": self.size},
               "ranges": [[s.start, len(s)] for s in self.spans], "command": self.command}
        return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def from_chunks(chunks: Iterable[int], chunk: int, digest: str, size: int,
                command: str = "") -> PrefetchList:
    """The list of the chunks (indices of `chunk` bytes) a recording saw."""
    spans = [Span(i * chunk, min((i + 1) * chunk, size)) for i in set(chunks)
             if 0 <= i * chunk < size]
    return PrefetchList(digest, size, tuple(ranges.coalesce(spans)), command)


def parse(data: bytes, what: str) -> PrefetchList | None:
    """A list read from a registry or a store; None for a later version of the format
    (ignored: it is only an optimisation); `SourceError` when it is malformed."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise SourceError(f"{what}: prefetch list is not JSON ({exc})") from None
    except RecursionError:
        raise SourceError(f"{what}: prefetch list nested too deep") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{what}: prefetch list is not a JSON object")
    if doc.get("version") != VERSION:
        return None
    squash, items = doc.get("squash"), doc.get("ranges")
    if not isinstance(squash, dict) or not isinstance(items, list) or \
            len(items) > MAX_RANGES:
        raise SourceError(f"{what}: prefetch list without squash or ranges")
    digest, size = squash.get("digest"), squash.get("size")
    if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool) \
            or size < 0:
        raise SourceError(f"{what}: prefetch list with a bad squash digest or size")
    spans = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and
                all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
            raise SourceError(f"{what}: prefetch list with a bad range {item!r}")
        start, length = item
        if start < 0 or length < 0 or start + length > size:
            raise SourceError(f"{what}: prefetch range {start}+{length} outside the "
                              f"{size}-byte squash file")
        spans.append(Span(start, start + length))
    command = doc.get("command", "")
    return PrefetchList(digest, size, tuple(ranges.coalesce(spans)),
                        command if isinstance(command, str) else "")


def for_squash(listed: PrefetchList, digest: str, size: int, what: str) -> PrefetchList:
    """`listed`, checked to be about the squash file `digest` of `size` bytes."""
    if listed.digest != digest or listed.size != size:
        raise SourceError(f"{what}: the prefetch list is of another squash file "
                          f"({listed.digest}, {listed.size} bytes)")
    return listed


def store_path(squash: Path) -> Path:
    """Where a store keeps the list of the squash file ``<meta>/squash/<layer>.sqfs``."""
    return squash.parent.parent / PREFETCH_DIR / f"{squash.stem}.json"


def load(squash: Path) -> PrefetchList | None:
    """The list a store keeps for `squash`, None when it has none."""
    path = store_path(squash)
    data = read_kept(path, LIMIT)
    return None if data is None else parse(data, str(path))


def save(squash: Path, listed: PrefetchList) -> Path:
    """Keep `listed` beside the store's squash file (replacing any earlier one)."""
    from squashstore.atomic import atomic_write

    path = store_path(squash)
    path.parent.mkdir(mode=0o755, exist_ok=True)
    atomic_write(path, listed.to_json())
    return path


def read_recording(path: Path) -> list[int]:
    """The chunk indices a `Recorder` wrote, in the order they were first read."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip().isdigit():
            out.append(int(line))
    return out


class FileSource:
    """An ordinary squash file as a `ByteSource` (what a `Recorder` wraps for it)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Recorder:
    """Reads `inner`, appending to the file open at `fd` (``O_APPEND``) the index of every
    `chunk` read for the first time, one per line, before the read returns: what a start
    read is on disk once its reads were answered."""

    def __init__(self, inner: ByteSource, fd: int, chunk: int = RECORD_CHUNK) -> None:
        self.inner, self._fd, self.chunk = inner, fd, chunk
        self._seen = bytearray(-(-inner.size // chunk) // 8 + 1)
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.inner.size

    def pread(self, size: int, offset: int) -> bytes:
        data = self.inner.pread(size, offset)
        if data:
            touched = ranges.chunk_range(Span(offset, offset + len(data)), self.chunk)
            with self._lock:
                new = [i for i in touched if not ranges.has_chunk(self._seen, i)]
                ranges.set_chunks(self._seen, touched)
                if new:
                    os.write(self._fd, "".join(f"{i}\n" for i in new).encode())
        return data
