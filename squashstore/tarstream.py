"""The canonical tar stream of a flattened tree, its digest, and its tar-split record.

`TarStream` turns merged entries (`layers.MergedEntry`) into one POSIX (PAX) tar stream,
in the order they come: header, content, padding. It may write the stream to a file
(`squashstore export`), and it always computes the stream's sha256 and length: that digest
is the store layer's ``diff-digest`` and the image config's ``diff_id``. With a tar-split
file it also records, in vbatts/tar-split's format (gzip'd JSON lines: type 2 raw segments,
type 1 file entries with the CRC-64/ISO of their content), how to rebuild those exact bytes
from the layer's mounted directory, so containers/storage can re-create the layer tar (for
``podman save`` and ``podman push``) byte for byte from a squash mount.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import weakref
from collections.abc import Callable
from typing import IO, BinaryIO, Protocol, TypeVar

from fastcrc import crc64

from squashstore.layers import MergedEntry
from squashstore.tar import format as f
from squashstore.tar.format import BLOCK, quote
from squashstore.tar.split import DiffFile, DiffFileReader, TarSplitRecorder
from squashstore.tar.writer import encode_fields
from squashstore.tree import Inode, Kind

__all__ = ["TarSplitRecorder", "TarStream", "TeeReader", "add_content", "add_small",
           "header_for"]

H = TypeVar("H", covariant=True)


class AddFile(Protocol[H]):
    """A writer's ``add_file(stream, size, again=...)``."""

    def __call__(self, stream: BinaryIO, size: int, *,
                 again: Callable[[], bytes] | None = None) -> H: ...


CHUNK = 1 << 20
_ZEROS = [bytes(n) for n in range(BLOCK)]
"""The padding after content, made once for each length."""
_crc = crc64.go_iso
_TYPES = {
    Kind.DIR: f.TYPE_DIR,
    Kind.FILE: f.TYPE_REG,
    Kind.SYMLINK: f.TYPE_SYMLINK,
    Kind.CHARDEV: f.TYPE_CHAR,
    Kind.BLOCKDEV: f.TYPE_BLOCK,
    Kind.FIFO: f.TYPE_FIFO,
}


def header_for(path: str, inode: Inode, link_to: str | None = None) -> tuple[str, int, bytes]:
    """(name, content size, header bytes) of a merged entry (a hard link with `link_to`)."""
    name = path or "."
    if inode.kind is Kind.DIR:
        name += "/"
    if link_to is not None:
        kind, size, linkname, rdev = f.TYPE_LINK, 0, link_to, (0, 0)
    else:
        try:
            kind = _TYPES[inode.kind]
        except KeyError:
            raise ValueError(f"{quote(path)}: a {inode.kind.name.lower()} cannot be stored "
                             "in a tar stream") from None
        size = inode.size if inode.kind is Kind.FILE else 0
        linkname, rdev = inode.target, inode.rdev
    header = encode_fields(name, kind, inode.mode, inode.uid, inode.gid, size, inode.mtime,
                           linkname, rdev[0], rdev[1], inode.xattrs)
    return name, size, header


class _BackgroundSha256:
    """sha256 of a byte stream, computed on a thread of its own: hashlib lets go of the GIL
    for large buffers, so the canonical tar's digest costs the thread that streams only the
    hand-over. Small pieces (headers, small files) are appended to one batch (`pending`)
    first; a large one (a block of a file's content) is handed over as it is (joining
    copied every byte: ~0.3 s of the streaming thread per 900 MB)."""

    BATCH = 1 << 20
    DIRECT = 1 << 16

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.Queue[bytes | bytearray | None] = queue.Queue(maxsize=64)
        self.pending = bytearray()
        """Small pieces not yet handed over (`TarStream.whole` appends to it itself)."""
        self._thread = threading.Thread(target=_hash_worker, args=(self._queue, self._hash),
                                        name="tar-sha256", daemon=True)
        self._thread.start()
        # An abandoned stream (an error mid-way) must not leave its thread waiting forever.
        self._stop = weakref.finalize(self, self._queue.put, None)
        self._hex: str | None = None

    def update(self, data: bytes) -> None:
        if self._hex is not None:
            raise ValueError("update after hexdigest")
        if len(data) >= self.DIRECT:
            if self.pending:
                self.flush()
            self._queue.put(bytes(data))
            return
        pending = self.pending
        pending += data
        if len(pending) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        """Hand the pending pieces over (the batch itself: no copy; a new one starts)."""
        if self.pending:
            self._queue.put(self.pending)
            self.pending = bytearray()

    def hexdigest(self) -> str:
        if self._hex is None:
            self.flush()
            self._stop()
            self._thread.join()
            self._hex = self._hash.hexdigest()
        return self._hex


def _hash_worker(work: queue.Queue[bytes | bytearray | None], digest: hashlib._Hash) -> None:
    while (data := work.get()) is not None:
        digest.update(data)


class TarStream:
    """Serialise merged entries as one tar stream: written, hashed, tar-split recorded."""

    def __init__(self, out: BinaryIO | None = None,
                 tarsplit: TarSplitRecorder | None = None) -> None:
        self._out = out
        self._split = tarsplit
        self._sha = _BackgroundSha256()
        self.size = 0
        self._pending: tuple[str, int, int | None] | None = None

    @property
    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()

    def _raw(self, data: bytes) -> None:
        self._sha.update(data)
        self.size += len(data)
        if self._out is not None:
            self._out.write(data)

    def begin(self, entry: MergedEntry) -> None:
        """Write the header of `entry`; content (if any) follows through `payload`."""
        self.begin_header(*header_for(entry.path, entry.inode, entry.link_to))

    def begin_header(self, name: str, size: int, header: bytes) -> None:
        """`begin` with what `header_for` made of the entry (elsewhere: the parent of the
        writer's worker process makes it and sends it)."""
        self._raw(header)
        if self._split is not None:
            self._split.segment(header)
        self._pending = (name, size, None)

    def payload(self, data: bytes) -> None:
        """Content bytes of the entry begun last."""
        pending = self._pending
        assert pending is not None
        self._sha.update(data)
        self.size += len(data)
        if self._out is not None:
            self._out.write(data)
        crc = pending[2]
        self._pending = (pending[0], pending[1],
                         _crc(data) if crc is None else _crc(data, crc))

    @property
    def content_crc(self) -> int | None:
        """The CRC-64/ISO of the content given so far to the entry begun last."""
        assert self._pending is not None
        return self._pending[2]

    def end(self) -> None:
        """Close the entry begun last: record it and pad its content to a block."""
        assert self._pending is not None
        name, size, crc = self._pending
        self._pending = None
        if self._split is not None:
            self._split.file(name, size, crc)
        pad = -size % BLOCK
        if pad:
            padding = _ZEROS[pad]
            self._raw(padding)
            if self._split is not None:
                self._split.segment(padding)

    def whole(self, name: str, header: bytes, data: bytes) -> int:
        """`begin_header`, `payload` and `end` of an entry whose content is all in `data`
        (a small file), in one call; returns the content's CRC-64/ISO."""
        assert self._pending is None
        size = len(data)
        crc: int = _crc(data)
        padding = _ZEROS[-size % BLOCK]
        sha = self._sha
        if size < sha.DIRECT and sha._hex is None:
            pending = sha.pending
            pending += header
            pending += data
            pending += padding
            if len(pending) >= sha.BATCH:
                sha.flush()
        else:
            sha.update(header)
            sha.update(data)
            sha.update(padding)
        self.size += len(header) + size + len(padding)
        if self._out is not None:
            self._out.write(header)
            self._out.write(data)
            self._out.write(padding)
        if self._split is not None:
            self._split.entry(header, name, size, crc, padding)
        return crc

    def add(self, entry: MergedEntry) -> None:
        """Write a whole entry, copying its content from `entry.content`."""
        self.begin(entry)
        if entry.content is not None:
            remaining = entry.inode.size
            while remaining:
                chunk = entry.content.read(min(CHUNK, remaining))
                if not chunk:
                    raise EOFError(f"{quote(entry.path)}: content ended {remaining} bytes early")
                self.payload(chunk)
                remaining -= len(chunk)
        self.end()

    def close(self) -> None:
        """Write the end-of-archive marker (two zero blocks)."""
        end = f.END_OF_ARCHIVE
        self._raw(end)
        if self._split is not None:
            self._split.segment(end)
            self._split.close()


def add_content(stream: TarStream, content: IO[bytes], source: DiffFile | None, size: int,
                add_file: AddFile[H]) -> H:
    """One file's `size` content bytes given to `add_file` (a writer's) and, as they pass,
    to `stream` (the entry begun last). With `source` (`layers.content_source`) they are
    read from that file in the layer's diff directory, not from `content`, and the CRC-64
    the tar-split needs, computed once, is checked against the one podman recorded; the
    writer may hash them later, read again (`DiffFile.sha256`), instead of now."""
    if source is None:
        return add_file(TeeReader(content, stream), size)  # type: ignore[arg-type]
    with DiffFileReader(source) as reader:
        handle = add_file(TeeReader(reader, stream), size,  # type: ignore[arg-type]
                          again=source.sha256)
    source.check(stream.content_crc)
    return handle


def add_small(stream: TarStream, name: str, header: bytes, source: DiffFile,
              add_bytes: Callable[[bytes, Callable[[], bytes]], H]) -> H:
    """`begin_header` + `add_content` + `end` for a file of podman's store shorter than a
    block (most files): read at once, its entry in `stream` whole, the CRC-64 checked, the
    bytes given to `add_bytes` (a writer's, with how to hash them again). The same bytes,
    tar-split and errors as the general path, with a few calls instead of dozens."""
    data = source.content()
    source.check(stream.whole(name, header, data))
    return add_bytes(data, source.sha256)


class TeeReader:
    """A read-only stream that passes every byte it reads on to a `TarStream`."""

    def __init__(self, source: BinaryIO, stream: TarStream) -> None:
        self._source = source
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        if data:
            self._stream.payload(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True
