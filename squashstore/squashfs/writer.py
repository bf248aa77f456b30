"""The native squashfs 4.0 writer: file content streamed in, a finished image out.

`SquashWriter` owns one image being written. File content arrives through `add_file` in any
order, is cut into blocks, deduplicated (identical content is stored once), and compressed
on a thread pool while the caller keeps reading; results are written in submission order,
so the output never depends on thread timing, and the blocks in flight are bounded. Files
smaller than a block are tail-packed into fragments. `finish(root)` then serialises the
tree exactly as mksquashfs lays it out: inodes children-first (root last) with basic or
extended forms chosen by mksquashfs's rules, directory listings with headers and indexes,
then the fragment, export, id and xattr tables in the order the kernel checks, a 4 KiB
padded end, and an atomic fsync-and-rename into place. `SquashOptions` and `parse_size`
describe the image to write.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from squashstore.atomic import fsync_dir
from squashstore.image import LayerError, SquashstoreError
from squashstore.squashfs import format as fmt
from squashstore.squashfs.compress import WRITABLE, Codec, CodecError, codec_for
from squashstore.tree import Inode, Kind, name_bytes


class WriterError(SquashstoreError):
    """The image cannot be written: bad options, an invalid tree, or an I/O failure."""


@dataclass(frozen=True)
class SquashOptions:
    """How to write an image."""

    compression: str = "zstd"
    """gzip, xz, lz4, zstd or none."""
    level: int | None = None
    """None = the codec's mksquashfs default (gzip 9, xz preset 6, zstd 15, lz4 normal)."""
    block_size: int = 128 * 1024
    """A power of two from 4 KiB to 1 MiB."""
    jobs: int = 0
    """Compression threads; 0 = all cores."""
    export_table: bool = True
    xattrs: bool = True
    mtime: int | None = None
    """Superblock time; None = SOURCE_DATE_EPOCH if set, else the newest mtime in the tree."""


@dataclass(frozen=True)
class WriteSummary:
    """What `SquashWriter.finish` wrote."""

    files: int
    """Regular files in the tree (a hard-linked file counts once)."""
    bytes_in: int
    """Content bytes of those files."""
    bytes_out: int
    """Size of the image file."""
    seconds: float


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*$")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes from ``131072``, ``128K``, ``128k``, ``1M``, ``1MiB``; `WriterError` if not."""
    match = _SIZE_RE.match(text)
    if not match:
        raise WriterError(f"invalid size {text!r} (examples: 131072, 128K, 1M)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _check_options(options: SquashOptions) -> int:
    """Validates `options`; returns the block log."""
    if options.compression not in WRITABLE:
        raise WriterError(
            f"unknown compression {options.compression!r} (choose {', '.join(WRITABLE)})"
        )
    size = options.block_size
    log = size.bit_length() - 1
    if size <= 0 or size != 1 << log or not fmt.MIN_BLOCK_LOG <= log <= fmt.MAX_BLOCK_LOG:
        raise WriterError(f"block size must be a power of two from 4K to 1M, not {size}")
    if options.jobs < 0:
        raise WriterError(f"jobs must be 0 (all cores) or more, not {options.jobs}")
    return log


def _default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


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


# --- the data pipeline -----------------------------------------------------------------

IN_FLIGHT_BYTES_PER_JOB = 4 << 20
"""Uncompressed bytes queued for compression per worker thread, at most."""

_Written = Callable[[int, int], None]
"""Called with (position, size word) once a block is in the file."""


def _compress_block(codec: Codec, data: bytes) -> bytes | None:
    """The compressed block, or None when it does not shrink (store it raw)."""
    out = codec.compress(data)
    return out if len(out) < len(data) else None


class _Pipeline:
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


# --- metadata tables -------------------------------------------------------------------


class _Metadata:
    """An in-memory metadata table: 8 KiB blocks, each compressed unless that grows it."""

    def __init__(self, codec: Codec, compress: bool) -> None:
        self._codec = codec
        self._compress = compress
        self.blob = bytearray()
        self._pending = bytearray()
        self.block_starts = [0]
        """Position (relative to the table) of each block started so far."""

    def tell_ref(self) -> int:
        """The reference of the next byte written."""
        return fmt.make_ref(len(self.blob), len(self._pending))

    def tell(self) -> int:
        """The uncompressed offset of the next byte written."""
        return (len(self.block_starts) - 1) * fmt.METADATA_SIZE + len(self._pending)

    def ref_of(self, uncompressed: int) -> int:
        """The reference of an uncompressed offset already written or about to be."""
        block, offset = divmod(uncompressed, fmt.METADATA_SIZE)
        return fmt.make_ref(self.block_starts[block], offset)

    def write(self, data: bytes | bytearray) -> None:
        self._pending += data
        while len(self._pending) >= fmt.METADATA_SIZE:
            self._flush(bytes(self._pending[: fmt.METADATA_SIZE]))
            del self._pending[: fmt.METADATA_SIZE]

    def finish(self) -> bytearray:
        if self._pending:
            self._flush(bytes(self._pending))
            self._pending.clear()
        return self.blob

    def _flush(self, chunk: bytes) -> None:
        packed = self._codec.compress(chunk) if self._compress else chunk
        if len(packed) < len(chunk):
            self.blob += fmt.metadata_header(len(packed), True) + packed
        else:
            self.blob += fmt.metadata_header(len(chunk), False) + chunk
        self.block_starts.append(len(self.blob))


# --- the tree --------------------------------------------------------------------------


def _is_dir(node: Inode) -> bool:
    return node.kind is Kind.DIR


def _sorted_children(node: Inode) -> list[tuple[bytes, Inode]]:
    children = node.children or {}
    entries = [(name_bytes(name), child) for name, child in children.items()]
    entries.sort(key=lambda item: item[0])
    for raw, _child in entries:
        if (
            not raw
            or len(raw) > fmt.NAME_MAX
            or b"/" in raw
            or b"\0" in raw
            or raw in (b".", b"..")
        ):
            raise WriterError(f"invalid file name {raw!r} in the tree")
    return entries


@dataclass
class _TreeInfo:
    """What the pre-pass learns: write order, inode numbers, name counts, parents."""

    order: list[Inode]
    number: dict[int, int]
    links: dict[int, int]
    parent: dict[int, int]
    listing: dict[int, list[tuple[bytes, Inode]]]


def _scan(root: Inode) -> _TreeInfo:
    """Walks the tree children-first (as mksquashfs writes inodes) without recursion."""
    if not _is_dir(root):
        raise WriterError("the root of an image must be a directory")
    order: list[Inode] = []
    links: dict[int, int] = {}
    parent: dict[int, int] = {}
    listing: dict[int, list[tuple[bytes, Inode]]] = {id(root): _sorted_children(root)}
    stack: list[tuple[Inode, Iterator[tuple[bytes, Inode]]]] = [
        (root, iter(listing[id(root)]))
    ]
    while stack:
        node, entries = stack[-1]
        for _raw, child in entries:
            key = id(child)
            if _is_dir(child):
                if key in listing:
                    raise WriterError("a directory appears twice in the tree")
                listing[key] = _sorted_children(child)
                parent[key] = id(node)
                stack.append((child, iter(listing[key])))
                break
            if key not in links:
                links[key] = 0
                order.append(child)
            links[key] += 1
        else:
            stack.pop()
            order.append(node)
    number = {id(node): index + 1 for index, node in enumerate(order)}
    return _TreeInfo(order, number, links, parent, listing)


# --- the writer ------------------------------------------------------------------------


class SquashWriter:
    """Writes one squashfs image; use as a context manager, call `finish` in it."""

    def __init__(self, dest: Path, options: SquashOptions) -> None:
        self._started = time.monotonic()
        self._dest = Path(dest)
        self._options = options
        self._block_log = _check_options(options)
        self._block_size = options.block_size
        try:
            self._codec = codec_for(options.compression, options.level, None, self._block_size)
        except CodecError as exc:
            raise WriterError(str(exc)) from None
        self._compress_meta = options.compression != "none"
        self._opts_block = self._codec.options_block()
        try:
            fd, tmp = tempfile.mkstemp(
                prefix=f".{self._dest.name}.", suffix=".tmp", dir=self._dest.parent
            )
        except OSError as exc:
            raise WriterError(f"cannot write in {self._dest.parent}: {exc.strerror}") from None
        self._tmp: Path | None = Path(tmp)
        self._out: BinaryIO = os.fdopen(fd, "w+b")
        start = fmt.SUPERBLOCK_SIZE
        self._out.write(bytes(fmt.SUPERBLOCK_SIZE))
        if self._opts_block is not None:
            self._out.write(fmt.metadata_header(len(self._opts_block), False) + self._opts_block)
            start += 2 + len(self._opts_block)
        jobs = options.jobs or _default_jobs()
        self._pipe = _Pipeline(
            self._out, start, self._codec, jobs, self._dest, self._block_size
        )
        self._zero_block = bytes(self._block_size)
        self._dedup: dict[tuple[int, bytes], FileData] = {}
        self._fragment = bytearray()
        self._fragment_entries: list[fmt.FragmentEntry | None] = []
        self._finished = False

    # context manager

    def __enter__(self) -> SquashWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._finished:
            self.abort()

    def abort(self) -> None:
        """Stop and remove the temporary file; the destination is left untouched."""
        self._finished = True
        self._pipe.close()
        if not self._out.closed:
            self._out.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    # content

    def add_file(self, stream: BinaryIO, size: int, sparse: bool = False) -> object:
        """Read exactly `size` bytes of one file's content; return its handle.

        All-zero blocks are never stored. `sparse` says the source file has holes: then,
        as mksquashfs does for files sparse on disk, the inode reports those blocks as
        sparse (an extended inode whose stat shows fewer blocks).
        """
        if self._finished:
            raise WriterError("add_file after finish or abort")
        if size < 0:
            raise WriterError(f"negative file size {size}")
        handle = FileData(size)
        if size == 0:
            return handle
        bs = self._block_size
        hasher = hashlib.sha256()
        if size < bs:
            tail = _read_exact(stream, size, size)
            hasher.update(tail)
            return self._complete(handle, hasher.digest(), tail, False)
        count = (size + bs - 1) // bs
        handle.blocks = array("I", bytes(4 * count))
        self._pipe.mark(lambda pos: setattr(handle, "start", pos))
        submitted = False
        for index in range(count):
            length = min(bs, size - index * bs)
            data = _read_exact(stream, length, size)
            hasher.update(data)
            if data == (self._zero_block if length == bs else bytes(length)):
                if sparse:
                    handle.sparse += length
                continue
            self._pipe.submit(data, _block_setter(handle.blocks, index))
            submitted = True
        return self._complete(handle, hasher.digest(), b"", submitted)

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
        handle.fragment = len(self._fragment_entries)
        handle.offset = len(self._fragment)
        self._fragment += tail

    def _flush_fragment(self) -> None:
        if not self._fragment:
            return
        index = len(self._fragment_entries)
        self._fragment_entries.append(None)

        def written(position: int, word: int) -> None:
            self._fragment_entries[index] = fmt.FragmentEntry(position, word)

        self._pipe.submit(bytes(self._fragment), written)
        self._fragment = bytearray()

    # the image

    def finish(self, root: Inode) -> WriteSummary:
        """Write inodes, directories and tables for `root`; fsync; rename into place."""
        if self._finished:
            raise WriterError("finish after finish or abort")
        try:
            summary = self._finish(root)
        except OSError as exc:
            self.abort()
            raise WriterError(f"writing {self._dest}: {exc.strerror}") from None
        except BaseException:
            self.abort()
            raise
        self._finished = True
        return summary

    def _finish(self, root: Inode) -> WriteSummary:
        self._flush_fragment()
        self._pipe.drain()
        self._pipe.close()
        tables = _Tables(self._codec, self._compress_meta, self._block_size, self._options)
        info = _scan(root)
        root_ref = tables.write_inodes(info)
        out = self._out
        out.seek(self._pipe.position)
        layout = tables.write_tables(out, self._pipe.position, self._fragment_entries)
        bytes_used = out.tell()
        pad = -bytes_used % fmt.PAD_TO
        out.write(bytes(pad))
        superblock = fmt.Superblock(
            magic=fmt.MAGIC,
            inode_count=len(info.order),
            mtime=_clamp32(self._image_mtime(info)),
            block_size=self._block_size,
            fragment_count=len(self._fragment_entries),
            compressor=self._codec.compressor,
            block_log=self._block_log,
            flags=int(self._flags()),
            id_count=len(tables.ids),
            version_major=fmt.VERSION_MAJOR,
            version_minor=fmt.VERSION_MINOR,
            root_inode=root_ref,
            bytes_used=bytes_used,
            id_table=layout.id_table,
            xattr_id_table=layout.xattr_table,
            inode_table=layout.inode_table,
            directory_table=layout.directory_table,
            fragment_table=layout.fragment_table,
            export_table=layout.export_table,
        )
        out.seek(0)
        out.write(superblock.pack())
        self._commit()
        files, bytes_in = tables.file_totals
        return WriteSummary(
            files=files,
            bytes_in=bytes_in,
            bytes_out=bytes_used + pad,
            seconds=time.monotonic() - self._started,
        )

    def _flags(self) -> fmt.Flag:
        """The superblock flags mksquashfs 4.5.1 sets for the same options."""
        flags = fmt.Flag.DUPLICATES
        if self._options.export_table:
            flags |= fmt.Flag.EXPORTABLE
        if not self._options.xattrs:
            flags |= fmt.Flag.NO_XATTRS
        if self._opts_block is not None:
            flags |= fmt.Flag.COMPRESSOR_OPTIONS
        if not self._compress_meta:  # -noI -noD -noF -noX
            flags |= (
                fmt.Flag.UNCOMPRESSED_INODES
                | fmt.Flag.UNCOMPRESSED_DATA
                | fmt.Flag.UNCOMPRESSED_FRAGMENTS
                | fmt.Flag.UNCOMPRESSED_XATTRS
            )
        return flags

    def _commit(self) -> None:
        """fsync the temporary file, give it its final mode and rename it into place."""
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        assert self._tmp is not None
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self._dest)
        self._tmp = None
        fsync_dir(self._dest.parent)

    def _image_mtime(self, info: _TreeInfo) -> int:
        if self._options.mtime is not None:
            return self._options.mtime
        epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
        if epoch:
            try:
                return int(epoch)
            except ValueError:
                raise WriterError(f"SOURCE_DATE_EPOCH is not an integer: {epoch!r}") from None
        return max(node.mtime for node in info.order)


def _block_setter(blocks: array[int], index: int) -> _Written:
    def written(_position: int, word: int) -> None:
        blocks[index] = word

    return written


def _read_exact(stream: BinaryIO, length: int, total: int) -> bytes:
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


def _clamp32(value: int) -> int:
    return min(max(value, 0), 0xFFFF_FFFF)


# --- inodes, directories and tables ----------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    inode_table: int
    directory_table: int
    fragment_table: int
    export_table: int
    id_table: int
    xattr_table: int


XATTR_OOL_SIZE = 8
"""Size of an out-of-line value reference; shorter values are never shared."""
XATTR_INLINE_MAX = 128
XATTR_TARGET_MAX = 65536
_ENTRY_SIZE = fmt.DirEntry.STRUCT.size
_HEADER_SIZE = fmt.DirHeader.STRUCT.size


class _Tables:
    """Serialises the tree: inode and directory tables, ids, xattrs, export refs."""

    def __init__(
        self, codec: Codec, compress: bool, block_size: int, options: SquashOptions
    ) -> None:
        self._codec = codec
        self._compress = compress
        self._block_size = block_size
        self._options = options
        self.inodes = _Metadata(codec, compress)
        self.dirs = _Metadata(codec, compress)
        self.xattr_kv = _Metadata(codec, compress)
        self.ids: dict[int, int] = {}
        self.xattr_ids: dict[tuple[tuple[str, bytes], ...], int] = {}
        self.xattr_entries: list[fmt.XattrIdEntry] = []
        self.xattr_values: dict[bytes, int] = {}
        """Reference of the stored value record of each value of 8 bytes or more."""
        self.refs: dict[int, int] = {}
        self.file_totals = (0, 0)
        self._order: list[Inode] = []

    def _id(self, value: int) -> int:
        index = self.ids.get(value)
        if index is None:
            if len(self.ids) >= 0x10000:
                raise WriterError("more than 65536 distinct uids and gids")
            if not 0 <= value <= 0xFFFF_FFFF:
                raise WriterError(f"uid or gid {value} does not fit in 32 bits")
            index = self.ids[value] = len(self.ids)
        return index

    def _xattr(self, node: Inode) -> int:
        if not self._options.xattrs or not node.xattrs:
            return fmt.INVALID_XATTR
        # In the tree's order, as mksquashfs 4.5 keeps the source's listxattr order.
        items = tuple(
            (name, bytes(value))
            for name, value in node.xattrs.items()
            if fmt.split_xattr_name(name) is not None
        )
        if not items:
            return fmt.INVALID_XATTR
        known = self.xattr_ids.get(items)
        if known is not None:
            return known
        ool = self._out_of_line(items)
        for value, is_ool in zip((value for _n, value in items), ool, strict=True):
            if is_ool and value not in self.xattr_values:
                self.xattr_values[value] = self.xattr_kv.tell_ref()
                self.xattr_kv.write(fmt.XattrValue(len(value)).pack() + value)
        ref = self.xattr_kv.tell_ref()
        size = 0
        for (name, value), is_ool in zip(items, ool, strict=True):
            split = fmt.split_xattr_name(name)
            assert split is not None
            kind, rest = split
            flag = fmt.XATTR_VALUE_OOL if is_ool else 0
            self.xattr_kv.write(fmt.XattrKey(kind | flag, len(rest)).pack() + rest)
            if is_ool:
                target = fmt.TABLE_POINTER.pack(self.xattr_values[value])
                self.xattr_kv.write(fmt.XattrValue(len(target)).pack() + target)
            else:
                if len(value) >= XATTR_OOL_SIZE:
                    self.xattr_values.setdefault(value, self.xattr_kv.tell_ref())
                self.xattr_kv.write(fmt.XattrValue(len(value)).pack() + value)
            size += len(name_bytes(name)) + 1 + len(value)
        index = self.xattr_ids[items] = len(self.xattr_entries)
        self.xattr_entries.append(fmt.XattrIdEntry(ref, len(items), size))
        return index

    def _out_of_line(self, items: tuple[tuple[str, bytes], ...]) -> list[bool]:
        """Which values to store out of line, by mksquashfs's rule: values over 128 bytes
        (a lower bound, down to 8, while the list would exceed 64 KiB), and values of 8
        bytes or more already stored elsewhere (a reference is then smaller)."""
        keys = [len(name_bytes(name).split(b".", 1)[1]) for name, _value in items]
        limit = XATTR_INLINE_MAX
        while True:
            ool = [len(value) > limit for _name, value in items]
            total = sum(
                8 + key + (XATTR_OOL_SIZE if out else len(value))
                for key, (_name, value), out in zip(keys, items, ool, strict=True)
            )
            if total <= XATTR_TARGET_MAX or limit == XATTR_OOL_SIZE:
                break
            limit = max(limit // 2, XATTR_OOL_SIZE)
        return [
            out or (len(value) >= XATTR_OOL_SIZE and value in self.xattr_values)
            for (_name, value), out in zip(items, ool, strict=True)
        ]

    def write_inodes(self, info: _TreeInfo) -> int:
        """Writes every inode and listing; returns the root's reference."""
        files = 0
        bytes_in = 0
        self._order = info.order
        root_number = len(info.order)
        for node in info.order:
            key = id(node)
            number = info.number[key]
            if node.kind is Kind.DIR:
                parent = info.parent.get(key)
                parent_number = root_number + 1 if parent is None else info.number[parent]
                ref = self._write_dir(node, number, parent_number, info)
            else:
                ref = self._write_other(node, number, info.links[key])
                if node.kind is Kind.FILE:
                    files += 1
                    bytes_in += _file_data(node).size
            self.refs[key] = ref
        self.file_totals = (files, bytes_in)
        return self.refs[id(info.order[-1])]

    def _header(self, node: Inode, inode_type: fmt.InodeType, number: int) -> bytes:
        return fmt.InodeHeader(
            inode_type,
            node.mode & 0o7777,
            self._id(node.uid),
            self._id(node.gid),
            _clamp32(node.mtime),
            number,
        ).pack()

    def _write_other(self, node: Inode, number: int, nlink: int) -> int:
        xattr = self._xattr(node)
        ref = self.inodes.tell_ref()
        kind = node.kind
        if kind is Kind.FILE:
            self.inodes.write(self._file_inode(node, number, nlink, xattr))
        elif kind is Kind.SYMLINK:
            target = name_bytes(node.target)
            itype = fmt.InodeType.SYMLINK if xattr == fmt.INVALID_XATTR else fmt.InodeType.LSYMLINK
            body = fmt.SymlinkInode(nlink, len(target)).pack() + target
            if itype.is_extended:
                body += fmt.SYMLINK_XATTR.pack(xattr)
            self.inodes.write(self._header(node, itype, number) + body)
        elif kind in (Kind.BLOCKDEV, Kind.CHARDEV):
            major, minor = node.rdev
            if not (0 <= major <= fmt.RDEV_MAJOR_MAX and 0 <= minor <= fmt.RDEV_MINOR_MAX):
                raise WriterError(f"device number {major}:{minor} does not fit in squashfs")
            rdev = fmt.encode_rdev(major, minor)
            itype = fmt.InodeType(kind.value)
            if xattr == fmt.INVALID_XATTR:
                body = fmt.DevInode(nlink, rdev).pack()
            else:
                itype = itype.extended
                body = fmt.LDevInode(nlink, rdev, xattr).pack()
            self.inodes.write(self._header(node, itype, number) + body)
        else:
            itype = fmt.InodeType(kind.value)
            if xattr == fmt.INVALID_XATTR:
                body = fmt.IpcInode(nlink).pack()
            else:
                itype = itype.extended
                body = fmt.LIpcInode(nlink, xattr).pack()
            self.inodes.write(self._header(node, itype, number) + body)
        return ref

    def _file_inode(self, node: Inode, number: int, nlink: int, xattr: int) -> bytes:
        data = _file_data(node)
        blocks = _little_endian(data.blocks)
        basic = (
            nlink == 1
            and xattr == fmt.INVALID_XATTR
            and data.sparse == 0
            and data.size <= fmt.BASIC_FILE_MAX
            and data.start <= fmt.BASIC_FILE_MAX
        )
        if basic:
            header = self._header(node, fmt.InodeType.FILE, number)
            body = fmt.FileInode(data.start, data.fragment, data.offset, data.size).pack()
        else:
            header = self._header(node, fmt.InodeType.LFILE, number)
            sparse = min(data.sparse, data.size - 1) if data.sparse else 0
            body = fmt.LFileInode(
                data.start, data.size, sparse, nlink, data.fragment, data.offset, xattr
            ).pack()
        return header + body + blocks

    def _write_dir(self, node: Inode, number: int, parent_number: int, info: _TreeInfo) -> int:
        entries = info.listing[id(node)]
        listing, index = self._listing(entries, info)
        start = self.dirs.tell()
        listing_ref = self.dirs.tell_ref()
        self.dirs.write(listing)
        xattr = self._xattr(node)
        file_size = len(listing) + fmt.DIR_SIZE_EXTRA
        nlink = 2 + sum(1 for _raw, child in entries if child.kind is Kind.DIR)
        block, offset = fmt.ref_block(listing_ref), fmt.ref_offset(listing_ref)
        ref = self.inodes.tell_ref()
        if not index and file_size <= fmt.BASIC_DIR_MAX_SIZE and xattr == fmt.INVALID_XATTR:
            header = self._header(node, fmt.InodeType.DIR, number)
            body = fmt.DirInode(block, nlink, file_size, offset, parent_number).pack()
            self.inodes.write(header + body)
            return ref
        header = self._header(node, fmt.InodeType.LDIR, number)
        body = fmt.LDirInode(
            nlink, file_size, block, parent_number, len(index), offset, xattr
        ).pack()
        records = bytearray()
        for position, name in index:
            index_block = fmt.ref_block(self.dirs.ref_of(start + position))
            records += fmt.DirIndex(position, index_block, len(name) - 1).pack() + name
        self.inodes.write(header + body + records)
        return ref

    def _listing(
        self, entries: list[tuple[bytes, Inode]], info: _TreeInfo
    ) -> tuple[bytearray, list[tuple[int, bytes]]]:
        """A directory's listing bytes and its index points (listing offset, first name)."""
        listing = bytearray()
        index: list[tuple[int, bytes]] = []
        count = 0
        count_at = 0
        base_block = -1
        base_number = 0
        index_at = 0
        for raw, child in entries:
            ref = self.refs[id(child)]
            number = info.number[id(child)]
            block = fmt.ref_block(ref)
            delta = number - base_number
            grown = len(listing) + _ENTRY_SIZE + len(raw) - index_at > fmt.METADATA_SIZE
            if (
                count == 0
                or count == fmt.DIR_HEADER_MAX_ENTRIES
                or block != base_block
                or grown
                or not fmt.DIR_INODE_DELTA_MIN <= delta <= fmt.DIR_INODE_DELTA_MAX
            ):
                if count:
                    _patch_count(listing, count_at, count, base_block, base_number)
                    if grown:
                        index.append((len(listing), raw))
                        index_at = len(listing)
                count_at = len(listing)
                listing += bytes(_HEADER_SIZE)
                count = 0
                base_block = block
                base_number = number
                delta = 0
            listing += fmt.DirEntry(
                fmt.ref_offset(ref), delta, fmt.InodeType(child.kind.value), len(raw) - 1
            ).pack()
            listing += raw
            count += 1
        if count:
            _patch_count(listing, count_at, count, base_block, base_number)
        return listing, index

    def write_tables(
        self, out: BinaryIO, position: int, fragments: list[fmt.FragmentEntry | None]
    ) -> _Layout:
        """Appends every table at `position` in the order the kernel checks."""
        inode_table = position
        blob = self.inodes.finish()
        out.write(blob)
        position += len(blob)
        directory_table = position
        blob = self.dirs.finish()
        out.write(blob)
        position += len(blob)

        frag_bytes = b"".join(_entry(entry).pack() for entry in fragments)
        fragment_table, position = self._lookup_table(out, position, frag_bytes)
        export_table = fmt.INVALID_BLK
        if self._options.export_table:
            export_bytes = b"".join(
                fmt.EXPORT_ENTRY.pack(self.refs[id(node)]) for node in self._order
            )
            export_table, position = self._lookup_table(out, position, export_bytes)
        id_bytes = b"".join(fmt.ID_ENTRY.pack(value) for value in self.ids)
        id_table, position = self._lookup_table(out, position, id_bytes)
        xattr_table = fmt.INVALID_BLK
        if self.xattr_entries:
            kv_start = position
            blob = self.xattr_kv.finish()
            out.write(blob)
            position += len(blob)
            id_entries = b"".join(entry.pack() for entry in self.xattr_entries)
            header = fmt.XattrTableHeader(kv_start, len(self.xattr_entries)).pack()
            xattr_table, position = self._lookup_table(out, position, id_entries, header)
        return _Layout(
            inode_table, directory_table, fragment_table, export_table, id_table, xattr_table
        )

    def _lookup_table(
        self, out: BinaryIO, position: int, data: bytes, header: bytes = b""
    ) -> tuple[int, int]:
        """Writes a table's metadata blocks, then `header` and the u64 block positions.

        Returns (position of the header or pointer array, position after it).
        """
        table = _Metadata(self._codec, self._compress)
        table.write(data)
        blob = table.finish()
        out.write(blob)
        blocks = (len(data) + fmt.METADATA_SIZE - 1) // fmt.METADATA_SIZE
        pointers = b"".join(
            fmt.TABLE_POINTER.pack(position + start) for start in table.block_starts[:blocks]
        )
        start = position + len(blob)
        out.write(header + pointers)
        return start, start + len(header) + len(pointers)


def _little_endian(words: array[int]) -> bytes:
    """The on-disk (little-endian) bytes of an array of u32."""
    if sys.byteorder == "little":
        return words.tobytes()
    swapped = array("I", words)
    swapped.byteswap()
    return swapped.tobytes()


def _patch_count(listing: bytearray, at: int, count: int, block: int, number: int) -> None:
    listing[at : at + _HEADER_SIZE] = fmt.DirHeader(count - 1, block, number).pack()


def _entry(entry: fmt.FragmentEntry | None) -> fmt.FragmentEntry:
    assert entry is not None, "fragment not written"
    return entry


def _file_data(node: Inode) -> FileData:
    data = node.data
    if isinstance(data, FileData):
        return data
    if data is None and node.size == 0:
        return FileData(0)
    raise WriterError("a regular file in the tree has no content from this writer")
