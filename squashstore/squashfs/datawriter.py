"""Writing file content: data blocks and fragments (libsquashfs's ``block_processor``,
``block_writer`` and ``frag_table``).

This module owns where file content goes in an image. `DataWriter.add_file` cuts a file
into blocks, skips all-zero blocks, deduplicates identical files (stored once, the second
copy's blocks truncated away), tail-packs files smaller than a block into fragments, and
hands blocks to `BlockPipeline`, which compresses them on a thread pool while the caller
keeps reading and appends them in submission order (so the output never depends on thread
timing) with a bounded number in flight. `FileData` is the handle of one file's content
that the inode table later records; `fragment_entries` is the fragment table's content.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, BinaryIO

from squashstore.image import LayerError
from squashstore.squashfs import format as fmt
from squashstore.squashfs.compress import Codec
from squashstore.squashfs.metawriter import WriterError
from squashstore.tree import Inode


class FileData:
    """Where one file's content is in the image: the handle `add_file` returns.

    `start` and `blocks` are final once the writer has drained its pipeline (in `finish`).
    Two files with identical content share one `FileData`.
    """

    __slots__ = ("blocks", "fragment", "offset", "size", "sparse", "start")

    def __init__(self, size: int) -> None:
        self.size = size
        self.start = 0
        self.blocks = array("I")
        """Size words (u32) of the full and last blocks (0 = sparse)."""
        self.fragment = fmt.INVALID_FRAG
        self.offset = 0
        self.sparse = 0
        """Bytes of all-zero blocks reported as sparse (only for sources with holes)."""


def file_data(node: Inode) -> FileData:
    """The content handle of regular file `node` (an empty file may have none)."""
    data = node.data
    if isinstance(data, FileData):
        return data
    if data is None and node.size == 0:
        return FileData(0)
    raise WriterError("a regular file in the tree has no content from this writer")


# --- the block pipeline ----------------------------------------------------------------

IN_FLIGHT_BYTES_PER_JOB = 4 << 20
"""Uncompressed bytes queued for compression per worker thread, at most."""

_Written = Callable[[int, int], None]
"""Called with (position, size word) once a block is in the file."""


def _compress_block(codec: Codec, data: bytes) -> bytes | None:
    """The compressed block, or None when it does not shrink (store it raw)."""
    out = codec.compress(data)
    return out if len(out) < len(data) else None


class BlockPipeline:
    """Compresses blocks on threads and appends them to the image in submission order."""

    def __init__(
        self, out: BinaryIO, start: int, codec: Codec, jobs: int, dest: Path, block_size: int
    ) -> None:
        self._out = out
        self._dest = dest
        self.position = start
        self._codec = codec
        self._raw = not codec.can_compress or codec.name == "none"
        self._pool = ThreadPoolExecutor(jobs, "squash") if jobs > 1 and not self._raw else None
        # Blocks in flight: enough that uneven block costs never idle a worker (measured:
        # 8 blocks of 128 KiB left a third of 2 cores idle), bounded to 4 MiB per worker.
        self._limit = max(4 * jobs, IN_FLIGHT_BYTES_PER_JOB * jobs // block_size)
        self._queue: collections.deque[
            tuple[Future[bytes | None] | None, bytes, _Written | None]
        ] = collections.deque()
        self.bytes_compressed = 0

    def mark(self, callback: Callable[[int], None]) -> None:
        """Call `callback(position)` when every block submitted so far is written."""
        if not self._queue:
            callback(self.position)
        else:
            self._queue.append((None, b"", lambda pos, _word: callback(pos)))

    def submit(self, data: bytes, written: _Written) -> None:
        """Compress and append `data`; `written(position, size word)` once it is in."""
        if self._pool is None:
            if self._raw:
                self._write(data, None, written)
            else:
                self._write(data, _compress_block(self._codec, data), written)
            return
        future = self._pool.submit(_compress_block, self._codec, data)
        self._queue.append((future, data, written))
        while len(self._queue) > self._limit:
            self._pop()

    def drain(self) -> None:
        """Write everything submitted."""
        while self._queue:
            self._pop()

    def truncate(self, position: int) -> None:
        """Forget everything written from `position` on (the caller drained first)."""
        self._out.flush()
        self._out.truncate(position)
        self._out.seek(position)
        self.position = position

    def close(self) -> None:
        for future, _data, _cb in self._queue:
            if future is not None:
                future.cancel()
        self._queue.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _pop(self) -> None:
        future, data, written = self._queue.popleft()
        if future is None:
            assert written is not None
            written(self.position, 0)
            return
        self._write(data, future.result(), written)

    def _write(self, data: bytes, compressed: bytes | None, written: _Written | None) -> None:
        stored = data if compressed is None else compressed
        try:
            self._out.write(stored)
        except OSError as exc:
            raise WriterError(f"writing {self._dest}: {exc.strerror}") from None
        word = fmt.size_word(len(stored), compressed is not None)
        length = len(stored)
        if written is not None:
            written(self.position, word)
        self.position += length


# --- files: blocks, deduplication, fragments -------------------------------------------


class DataWriter:
    """Appends file content to the image at `start`: blocks, then fragments."""

    def __init__(
        self, out: BinaryIO, start: int, codec: Codec, jobs: int, dest: Path, block_size: int
    ) -> None:
        self._pipe = BlockPipeline(out, start, codec, jobs, dest, block_size)
        self._block_size = block_size
        self._zero_block = bytes(block_size)
        self._dedup: dict[tuple[int, bytes], FileData] = {}
        self._sizes: set[int] = set()
        """Sizes of the files added so far."""
        self._unhashed: dict[int, tuple[FileData, Callable[[], bytes]]] = {}
        """Size -> the file of that size added without hashing it (the first one, when it
        could be read again), and how to hash it if another file of its size comes."""
        self._fragment = bytearray()
        self.fragment_entries: list[fmt.FragmentEntry | None] = []
        """The fragment table: one entry per fragment block (None until it is written)."""

    def add_file(self, stream: BinaryIO, size: int, sparse: bool = False,
                 again: Callable[[], bytes] | None = None) -> FileData:
        """Read exactly `size` bytes of one file's content; return its handle.

        Files are deduplicated by size and sha256. With `again` (the sha256 of the same
        bytes, read again from their source), a file whose size no file had before is not
        hashed: only a later file of that size makes it hash (most content, by bytes, is
        in files of a size of their own)."""
        if 0 < size < self._block_size:
            return self.add_bytes(read_exact(stream, size, size), again)
        handle = FileData(size)
        if size == 0:
            return handle
        hasher = None
        if size in self._sizes or again is None:
            hasher = hashlib.sha256()
            first = self._unhashed.pop(size, None)
            if first is not None:
                self._dedup.setdefault((size, first[1]()), first[0])
        self._sizes.add(size)
        bs = self._block_size
        count = (size + bs - 1) // bs
        handle.blocks = array("I", bytes(4 * count))
        self._pipe.mark(lambda pos: setattr(handle, "start", pos))
        submitted = False
        for index in range(count):
            length = min(bs, size - index * bs)
            data = read_exact(stream, length, size)
            if hasher is not None:
                hasher.update(data)
            if data == (self._zero_block if length == bs else bytes(length)):
                if sparse:
                    handle.sparse += length
                continue
            self._pipe.submit(data, _block_setter(handle.blocks, index))
            submitted = True
        if hasher is None:
            assert again is not None
            self._unhashed[size] = (handle, again)
            return handle
        return self._complete(handle, hasher.digest(), b"", submitted)

    def add_bytes(self, data: bytes, again: Callable[[], bytes] | None = None) -> FileData:
        """`add_file` of content already read: `data`, shorter than a block (a fragment)."""
        size = len(data)
        handle = FileData(size)
        if not size:
            return handle
        sizes = self._sizes
        if size in sizes or again is None:
            first = self._unhashed.pop(size, None)
            if first is not None:
                self._dedup.setdefault((size, first[1]()), first[0])
            sizes.add(size)
            return self._complete(handle, hashlib.sha256(data).digest(), data, False)
        sizes.add(size)
        self._unhashed[size] = (handle, again)
        self._add_fragment(handle, data)
        return handle

    def finish(self) -> int:
        """Writes the last fragment and every pending block; returns the end position."""
        self._flush_fragment()
        self._pipe.drain()
        self._pipe.close()
        return self._pipe.position

    def close(self) -> None:
        """Stops the compression threads; what is queued is dropped."""
        self._pipe.close()

    def _complete(self, handle: FileData, digest: bytes, tail: bytes, submitted: bool) -> FileData:
        key = (handle.size, digest)
        known = self._dedup.get(key)
        if known is not None:
            if submitted:
                self._pipe.drain()
                self._pipe.truncate(handle.start)
            return known
        if tail:
            self._add_fragment(handle, tail)
        self._dedup[key] = handle
        return handle

    def _add_fragment(self, handle: FileData, tail: bytes) -> None:
        if len(self._fragment) + len(tail) > self._block_size:
            self._flush_fragment()
        handle.fragment = len(self.fragment_entries)
        handle.offset = len(self._fragment)
        self._fragment += tail

    def _flush_fragment(self) -> None:
        if not self._fragment:
            return
        index = len(self.fragment_entries)
        self.fragment_entries.append(None)

        def written(position: int, word: int) -> None:
            self.fragment_entries[index] = fmt.FragmentEntry(position, word)

        self._pipe.submit(bytes(self._fragment), written)
        self._fragment = bytearray()


def fragment_table(entries: list[fmt.FragmentEntry | None]) -> bytes:
    """The fragment table's entries, every fragment block written."""
    return b"".join(_entry(entry).pack() for entry in entries)


def _entry(entry: fmt.FragmentEntry | None) -> fmt.FragmentEntry:
    assert entry is not None, "fragment not written"
    return entry


def _block_setter(blocks: array[int], index: int) -> _Written:
    def written(_position: int, word: int) -> None:
        blocks[index] = word

    return written


def read_exact(stream: IO[bytes], length: int, total: int) -> bytes:
    data = stream.read(length)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = stream.read(length - got)
        if not more:
            raise LayerError(f"file content ended early (expected {total} bytes)")
        parts.append(more)
        got += len(more)
    return b"".join(parts)
