"""Random-access reading of squashfs 4.0 images: the `SquashReader` and its `SqInode`.

This module owns everything between a squash file on disk and the questions the FUSE server
and the CLI ask of it: parsing and checking the superblock and lookup tables, decoding
inodes by reference or number, listing and searching directories (through the directory
index, never the whole listing), reading file content (blocks, sparse blocks, fragment
tails), symlink targets and xattrs, and rebuilding the whole image as a `squashstore.tree`.
All I/O is `os.pread` on one descriptor, so one reader serves many threads; decompressed
metadata blocks, data blocks, inodes and block lists sit in bounded, locked LRU caches.
Every offset, count and size read from the image is checked before it is used, so a corrupt
or hostile image yields a `SquashfsError` naming the inode or block, never a hang or an
unbounded allocation.
"""

from __future__ import annotations

import bisect
import os
import stat
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from squashstore import tree
from squashstore.image import SquashstoreError
from squashstore.squashfs import compress, format


class SquashfsError(SquashstoreError):
    """A squash file is not a valid squashfs 4.0 image, or one of its parts is corrupt."""


# ---------------------------------------------------------------------------------------
# Format constants the reader needs beyond `format.py`.

_META_SIZE = format.METADATA_SIZE
_META_RAW = format.METADATA_UNCOMPRESSED
_DATA_RAW = format.DATA_UNCOMPRESSED
_DATA_SIZE_MASK = format.DATA_SIZE_MASK
_NO_FRAGMENT = format.INVALID_FRAG
_NO_XATTR = format.INVALID_XATTR
_ABSENT = format.INVALID_BLK
_MAX_NAME = format.NAME_MAX
_MAX_DIR_COUNT = format.DIR_HEADER_MAX_ENTRIES
_MAX_SYMLINK = 65535
"""Longest symlink target accepted (Linux allows 4095; tar archives may carry more)."""
_MAX_XATTR_NAME = 255
_MAX_XATTR_VALUE = 1 << 16
"""Linux's XATTR_SIZE_MAX: no larger value can have come from a real file."""
_MAX_XATTR_COUNT = 1 << 16
_XATTR_OOL = format.XATTR_VALUE_OOL
_XATTR_PREFIXES = {int(k): v.encode() for k, v in format.XATTR_PREFIXES.items()}

_HEADER = format.InodeHeader.STRUCT
_U16 = struct.Struct("<H")
_U32 = format.SYMLINK_XATTR
_U64 = format.EXPORT_ENTRY
_DIR_HEADER = format.DirHeader.STRUCT
_DIR_ENTRY = format.DirEntry.STRUCT
_DIR_INDEX = format.DirIndex.STRUCT
_FRAGMENT = format.FragmentEntry.STRUCT
_XATTR_ID = format.XattrIdEntry.STRUCT
_XATTR_TABLE = format.XattrTableHeader.STRUCT
_XATTR_KEY = format.XattrKey.STRUCT
_KINDS = {int(k): k for k in tree.Kind}
_INODE_BODY = {int(t): body.STRUCT for t, body in format.INODE_BODY.items()}

K = TypeVar("K")
V = TypeVar("V")


class _LRU(Generic[K, V]):
    """A small thread-safe least-recently-used map with a fixed number of entries."""

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


# ---------------------------------------------------------------------------------------
# Public data types.


@dataclass(frozen=True, slots=True)
class DirIndex:
    """One directory index entry: where the listing header starting with `name` lies."""

    index: int
    """Byte position of the header within the directory's listing."""
    start: int
    """Position of its metadata block relative to the directory table."""
    name: bytes


@dataclass(frozen=True, slots=True)
class SqInode:
    """One decoded squashfs inode; `ref` is its inode reference (block << 16 | offset)."""

    ref: int
    number: int
    kind: tree.Kind
    mode: int
    """Permission bits only (``0o7777``)."""
    uid: int
    gid: int
    mtime: int
    nlink: int
    size: int
    """File length, symlink target length, or directory listing length + 3."""
    rdev: tuple[int, int] = (0, 0)
    xattr: int | None = None
    extended: bool = False
    # Regular files.
    blocks_start: int = 0
    block_count: int = 0
    block_list_ref: int = 0
    """Metadata reference (relative to the inode table) of the first block size word."""
    fragment: int | None = None
    fragment_offset: int = 0
    # Directories.
    dir_block: int = 0
    dir_offset: int = 0
    parent: int = 0
    dir_index: tuple[DirIndex, ...] = ()
    # Symlinks.
    target_ref: int = 0
    """Metadata reference of the symlink target bytes."""

    @property
    def st_mode(self) -> int:
        """The full ``st_mode``: type bits and permission bits."""
        return self.kind.ifmt | self.mode


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One directory entry; `next_offset` resumes `readdir` just after it (always > 2)."""

    name: bytes
    ref: int
    kind: tree.Kind
    inode_number: int
    next_offset: int


@dataclass(frozen=True, slots=True)
class _Segment:
    """The parsed entries of one indexed part of a directory listing."""

    names: list[bytes]
    offsets: list[int]
    entries: list[DirEntry]


@dataclass(frozen=True, slots=True)
class _Region:
    """A byte range of the image that one table's metadata blocks must lie in."""

    name: str
    start: int
    end: int


_CHUNK = 2048
"""Block size words decoded at a time (one metadata block's worth)."""


class _BlockList:
    """A file's data block layout, decoded lazily in chunks from its block size list.

    Only a checkpoint per chunk (where its words are, where its data starts) is kept for
    good; decoded chunks live in the reader's bounded cache. So even a huge (or hostile)
    block count costs memory only in proportion to the metadata actually read.
    """

    def __init__(self, reader: SquashReader, inode: SqInode) -> None:
        self._reader = reader
        self._inode = inode
        pos = reader._inodes.start + (inode.block_list_ref >> 16)
        self._checkpoints = [(pos, inode.block_list_ref & 0xFFFF, inode.blocks_start)]
        self._lock = threading.Lock()

    def locate(self, index: int) -> tuple[int, int]:
        """The (position, size word) of data block `index`."""
        chunk, slot = divmod(index, _CHUNK)
        with self._lock:
            while len(self._checkpoints) <= chunk:
                self._decode(len(self._checkpoints) - 1)
            starts, words = self._decode(chunk)
        return starts[slot], words[slot]

    def _decode(self, chunk: int) -> tuple[array[int], array[int]]:
        key = (self._inode.ref, chunk)
        cached = self._reader._chunks.get(key)
        if cached is not None:
            return cached
        pos, offset, start = self._checkpoints[chunk]
        count = min(_CHUNK, self._inode.block_count - chunk * _CHUNK)
        cursor = _Cursor(self._reader, self._reader._inodes, pos, offset)
        words = array("I", cursor.read(4 * count))
        if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover
            words.byteswap()
        starts = array("Q")
        for word in words:
            starts.append(start)
            start += word & _DATA_SIZE_MASK
        if start > self._reader.superblock.inode_table:
            raise SquashfsError(
                f"{self._reader.path}: inode {self._inode.number} has blocks beyond the data area"
            )
        if chunk + 1 == len(self._checkpoints):
            self._checkpoints.append((*cursor.position(), start))
        self._reader._chunks.put(key, (starts, words))
        return starts, words


class _Cursor:
    """Sequential reading of records that span metadata blocks of one table."""

    __slots__ = ("_data", "_next", "_offset", "_pos", "_reader", "_region")

    def __init__(self, reader: SquashReader, region: _Region, pos: int, offset: int) -> None:
        self._reader = reader
        self._region = region
        self._pos = pos
        self._data, self._next = reader._metablock(region, pos)
        self._offset = offset
        if offset > len(self._data):
            raise SquashfsError(
                f"{reader.path}: {region.name} reference offset {offset} is beyond its"
                f" metadata block at {pos}"
            )

    def position(self) -> tuple[int, int]:
        """The (block position, offset) of the next byte."""
        if self._offset == len(self._data):
            return self._next, 0
        return self._pos, self._offset

    def read(self, n: int) -> bytes:
        """The next `n` bytes, fetching further metadata blocks as needed."""
        end = self._offset + n
        if end <= len(self._data):
            chunk = self._data[self._offset : end]
            self._offset = end
            return chunk
        parts = [self._data[self._offset :]]
        left = n - len(parts[0])
        while left > 0:
            self._pos = self._next
            self._data, self._next = self._reader._metablock(self._region, self._pos)
            take = self._data[:left]
            parts.append(take)
            left -= len(take)
            self._offset = len(take)
        return b"".join(parts)

    def skip(self, n: int) -> None:
        """Move past `n` bytes without keeping them."""
        while n > 0:
            room = len(self._data) - self._offset
            if n <= room:
                self._offset += n
                return
            n -= room
            self._pos = self._next
            self._data, self._next = self._reader._metablock(self._region, self._pos)
            self._offset = 0


# ---------------------------------------------------------------------------------------
# The reader.


class ByteSource(Protocol):
    """Where a reader reads its image from instead of the file at its path (a lazily
    pulled image's cache and registry): `size` bytes, read with `pread`; a part that
    cannot be read raises `OSError`."""

    @property
    def size(self) -> int: ...

    def pread(self, size: int, offset: int) -> bytes: ...


class SquashReader:
    """A squashfs 4.0 image opened for reading; safe to share between threads.

    Opening checks the superblock and reads the id table and the positions of the lookup
    tables; everything else is read on demand with `os.pread` and kept in bounded LRU
    caches: `metadata_cache_blocks` decompressed metadata blocks (and 16 times as many
    decoded inodes, a quarter as many parsed directory index segments), `data_cache_blocks`
    decompressed data and fragment blocks. Methods raise `SquashfsError` for anything
    corrupt; `readdir`, `lookup` and `resolve` raise `NotADirectoryError` for a
    non-directory and `resolve` raises `FileNotFoundError` for a missing name. With a
    `source`, every read goes to it and `path` only names the image in messages.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        metadata_cache_blocks: int = 1024,
        data_cache_blocks: int = 64,
        source: ByteSource | None = None,
    ) -> None:
        self.path = Path(path)
        self._source = source
        self.remote = source is not None
        """Whether reads go to a `source` (which may wait on a network) instead of a file."""
        self._fd = -1
        if source is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise SquashfsError(f"{self.path}: cannot open: {exc.strerror}") from None
        try:
            self._open(metadata_cache_blocks, data_cache_blocks)
        except BaseException:
            self.close()
            raise

    def _open(self, metadata_cache_blocks: int, data_cache_blocks: int) -> None:
        if self._source is not None:
            self._file_size = self._source.size
        elif stat.S_ISDIR(os.fstat(self._fd).st_mode):
            raise SquashfsError(f"{self.path}: is a directory, not a squash file")
        else:
            self._file_size = os.lseek(self._fd, 0, os.SEEK_END)  # block devices too
        self._meta_cache: _LRU[int, tuple[bytes, int]] = _LRU(metadata_cache_blocks)
        self._data_cache: _LRU[tuple[int, int], bytes] = _LRU(data_cache_blocks)
        self._inode_cache: _LRU[int, SqInode] = _LRU(max(1024, metadata_cache_blocks * 16))
        self._block_lists: _LRU[int, _BlockList] = _LRU(256)
        self._chunks: _LRU[tuple[int, int], tuple[array[int], array[int]]] = _LRU(64)
        self._segments: _LRU[tuple[int, int], _Segment] = _LRU(max(64, metadata_cache_blocks // 4))
        self._number_index: dict[int, int] | None = None
        self._number_lock = threading.Lock()
        self._dir_bytes: int | None = None
        self.superblock = self._read_superblock()
        sb = self.superblock
        self.block_size: int = sb.block_size
        self.compression: str = _compression_name(sb.compressor, self.path)
        self._decompress = self._make_decompressor()
        self._layout_tables()
        self.root = self.inode(sb.root_inode)
        if self.root.kind is not tree.Kind.DIR:
            raise SquashfsError(f"{self.path}: root inode is not a directory")

    # -- context manager and lifetime --------------------------------------------------

    def __enter__(self) -> SquashReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file descriptor; the reader cannot be used afterwards."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    # -- raw I/O -----------------------------------------------------------------------

    def _pread(self, pos: int, size: int, what: str) -> bytes:
        if pos < 0 or size < 0 or pos + size > self._file_size:
            raise SquashfsError(
                f"{self.path}: {what} at {pos} (+{size}) lies outside the image"
            )
        try:
            if self._source is not None:
                data = self._source.pread(size, pos)
            else:
                data = os.pread(self._fd, size, pos)
        except OSError as exc:
            raise SquashfsError(f"{self.path}: cannot read {what} at {pos}: {exc}") from None
        if len(data) != size:
            raise SquashfsError(f"{self.path}: short read of {what} at {pos}")
        return data

    def _read_superblock(self) -> format.Superblock:
        raw = self._pread(0, format.SUPERBLOCK_SIZE, "superblock")
        try:
            sb = format.Superblock.unpack(raw)
        except (ValueError, struct.error) as exc:
            raise SquashfsError(f"{self.path}: not a squashfs image ({exc})") from None
        _check_superblock(sb, self._file_size, str(self.path))
        return sb

    def _make_decompressor(self) -> Callable[[bytes, int], bytes]:
        sb = self.superblock
        options: bytes | None = None
        if sb.flags & format.Flag.COMPRESSOR_OPTIONS:
            region = _Region("compressor options", format.SUPERBLOCK_SIZE, sb.bytes_used)
            options, _ = self._metablock(region, format.SUPERBLOCK_SIZE, compressed_ok=False)
        try:
            codec = compress.codec_for(
                sb.compressor, options_block=options, block_size=sb.block_size
            )
        except compress.CodecError as exc:
            raise SquashfsError(f"{self.path}: {exc}") from None

        def decompress(data: bytes, max_size: int) -> bytes:
            try:
                return codec.decompress(data, max_size)
            except compress.CodecError as exc:
                raise SquashfsError(str(exc)) from None

        return decompress

    def _layout_tables(self) -> None:
        """Read the lookup tables' block lists and fix the region of every table."""
        sb = self.superblock
        bounds = {sb.bytes_used}
        self._fragment_blocks = self._table_index(
            "fragment table", sb.fragment_table, sb.fragment_count, 16, bounds
        )
        self._export_blocks: tuple[int, ...] | None = None
        if sb.export_table != _ABSENT:
            self._export_blocks = self._table_index(
                "export table", sb.export_table, sb.inode_count, 8, bounds
            )
        id_blocks = self._table_index("id table", sb.id_table, sb.id_count, 4, bounds)
        self._xattr_blocks: tuple[int, ...] = ()
        self._xattr_ids = 0
        self._xattr_start = 0
        if sb.xattr_id_table != _ABSENT:
            self._read_xattr_header(bounds)
        self._bounds = sorted(bounds)
        self._inodes = _Region("inode table", sb.inode_table, sb.directory_table)
        # An empty directory table (an empty root) ends where it starts.
        dirs_end = min(b for b in self._bounds if b >= sb.directory_table)
        self._dirs = _Region("directory table", sb.directory_table, dirs_end)
        if self._xattr_ids:
            self._xattr_region = _Region(
                "xattr table", self._xattr_start, self._next_bound(self._xattr_start)
            )
        self._ids = self._read_ids(id_blocks)

    def _next_bound(self, start: int) -> int:
        return min(b for b in self._bounds if b > start)

    def _table_index(
        self, name: str, start: int, count: int, entry_size: int, bounds: set[int]
    ) -> tuple[int, ...]:
        """The metadata block positions of a lookup table of `count` entries."""
        sb = self.superblock
        if count == 0:
            return ()
        blocks = -(-count * entry_size // _META_SIZE)
        if start < sb.directory_table or start + 8 * blocks > sb.bytes_used:
            raise SquashfsError(f"{self.path}: {name} at {start} lies outside the image")
        raw = self._pread(start, 8 * blocks, name)
        positions = struct.unpack(f"<{blocks}Q", raw)
        for pos in positions:
            if not sb.directory_table <= pos < start:
                raise SquashfsError(f"{self.path}: {name} block at {pos} is out of place")
        bounds.add(start)
        bounds.add(positions[0])
        return positions

    def _read_xattr_header(self, bounds: set[int]) -> None:
        sb = self.superblock
        start = sb.xattr_id_table
        if start < sb.directory_table or start + _XATTR_TABLE.size > sb.bytes_used:
            raise SquashfsError(f"{self.path}: xattr id table at {start} lies outside the image")
        table_start, count, _ = _XATTR_TABLE.unpack(
            self._pread(start, _XATTR_TABLE.size, "xattr id table")
        )
        if not sb.directory_table <= table_start <= start:
            raise SquashfsError(f"{self.path}: xattr table at {table_start} is out of place")
        bounds.add(table_start)
        self._xattr_start = table_start
        self._xattr_ids = count
        self._xattr_blocks = self._table_index(
            "xattr id table", start + _XATTR_TABLE.size, count, 16, bounds
        )
        bounds.add(start)

    def _read_ids(self, blocks: tuple[int, ...]) -> tuple[int, ...]:
        count = self.superblock.id_count
        raw = self._table_bytes("id table", blocks, count * 4)
        return struct.unpack(f"<{count}I", raw)

    def _table_bytes(self, name: str, blocks: tuple[int, ...], size: int) -> bytes:
        parts = []
        for pos in blocks:
            end = self._next_bound(pos)
            data, _ = self._metablock(_Region(name, pos, end), pos)
            parts.append(data)
        raw = b"".join(parts)
        if len(raw) < size:
            raise SquashfsError(f"{self.path}: {name} is truncated")
        return raw[:size]

    def _table_entry(
        self, name: str, blocks: tuple[int, ...], index: int, entry: struct.Struct
    ) -> tuple[int, ...]:
        per_block = _META_SIZE // entry.size
        block, slot = divmod(index, per_block)
        if block >= len(blocks):
            raise SquashfsError(f"{self.path}: {name} has no entry {index}")
        pos = blocks[block]
        data, _ = self._metablock(_Region(name, pos, self._next_bound(pos)), pos)
        offset = slot * entry.size
        if offset + entry.size > len(data):
            raise SquashfsError(f"{self.path}: {name} entry {index} is truncated")
        return entry.unpack_from(data, offset)

    # -- metadata blocks ---------------------------------------------------------------

    def _metablock(
        self, region: _Region, pos: int, *, compressed_ok: bool = True
    ) -> tuple[bytes, int]:
        """The decompressed metadata block at `pos` and the position of the next one."""
        cached = self._meta_cache.get(pos)
        if cached is not None and region.start <= pos and cached[1] <= region.end:
            return cached
        if not region.start <= pos or pos + 2 > region.end:
            raise SquashfsError(
                f"{self.path}: {region.name} metadata block at {pos} lies outside the table"
            )
        (header,) = _U16.unpack(self._pread(pos, 2, f"{region.name} metadata block"))
        size = header & ~_META_RAW
        if size == 0 or size > _META_SIZE or pos + 2 + size > region.end:
            raise SquashfsError(
                f"{self.path}: {region.name} metadata block at {pos} has bad size {size}"
            )
        raw = self._pread(pos + 2, size, f"{region.name} metadata block")
        if header & _META_RAW:
            data = raw
        elif not compressed_ok:
            raise SquashfsError(f"{self.path}: {region.name} must not be compressed")
        else:
            try:
                data = self._decompress(raw, _META_SIZE)
            except SquashfsError as exc:
                raise SquashfsError(
                    f"{self.path}: {region.name} metadata block at {pos}: {exc}"
                ) from None
        if not data:
            raise SquashfsError(f"{self.path}: {region.name} metadata block at {pos} is empty")
        result = (data, pos + 2 + size)
        self._meta_cache.put(pos, result)
        return result

    def _cursor(self, region: _Region, ref: int) -> _Cursor:
        """A cursor at metadata reference `ref` (block relative to `region`, offset)."""
        block, offset = ref >> 16, ref & 0xFFFF
        if offset >= _META_SIZE:
            raise SquashfsError(f"{self.path}: bad {region.name} reference {ref:#x}")
        return _Cursor(self, region, region.start + block, offset)

    # -- inodes ------------------------------------------------------------------------

    def inode(self, ref: int) -> SqInode:
        """The inode at inode reference `ref` (block << 16 | offset)."""
        cached = self._inode_cache.get(ref)
        if cached is not None:
            return cached
        try:
            inode = self._parse_inode(ref)
        except struct.error as exc:  # pragma: no cover - lengths are always checked
            raise SquashfsError(f"{self.path}: inode {ref:#x}: {exc}") from None
        self._inode_cache.put(ref, inode)
        return inode

    def _parse_inode(self, ref: int) -> SqInode:
        if ref < 0 or ref >> 48:
            raise SquashfsError(f"{self.path}: bad inode reference {ref:#x}")
        cur = self._cursor(self._inodes, ref)
        itype, mode, uid_index, gid_index, mtime, number = _HEADER.unpack(cur.read(16))
        body = _INODE_BODY.get(itype)
        if body is None:
            raise SquashfsError(f"{self.path}: inode {ref:#x} has unknown type {itype}")
        fields = body.unpack(cur.read(body.size))
        if number == 0 or number > self.superblock.inode_count:
            raise SquashfsError(f"{self.path}: inode {ref:#x} has bad number {number}")
        common = {
            "ref": ref,
            "number": number,
            "kind": _KINDS[(itype - 1) % 7 + 1],
            "mode": mode & 0o7777,
            "uid": self._id(uid_index, ref),
            "gid": self._id(gid_index, ref),
            "mtime": mtime,
            "extended": itype > 7,
        }
        parse = _PARSERS[itype]
        return parse(self, cur, fields, common)

    def _id(self, index: int, ref: int) -> int:
        if index >= len(self._ids):
            raise SquashfsError(f"{self.path}: inode {ref:#x} has bad id index {index}")
        return self._ids[index]

    def _parse_dir(self, cur: _Cursor, f: tuple[int, ...], c: dict[str, Any]) -> SqInode:
        if len(f) == 5:  # basic
            start, nlink, size, offset, parent = f
            xattr, index = _NO_XATTR, tuple[DirIndex, ...]()
        else:
            nlink, size, start, parent, count, offset, xattr = f
            if count > size // 21 + 1:  # each index entry names a header of >= 21 bytes
                raise SquashfsError(
                    f"{self.path}: directory inode {c['ref']:#x} has {count} index entries"
                )
            index = self._parse_dir_index(cur, count, c["ref"])
        if offset >= _META_SIZE:
            raise SquashfsError(f"{self.path}: directory inode {c['ref']:#x} has bad offset")
        return SqInode(
            nlink=nlink, size=size, dir_block=start, dir_offset=offset, parent=parent,
            dir_index=index, xattr=_xattr(xattr), **c,
        )

    def _parse_dir_index(self, cur: _Cursor, count: int, ref: object) -> tuple[DirIndex, ...]:
        entries = []
        for _ in range(count):
            index, start, name_size = _DIR_INDEX.unpack(cur.read(12))
            if name_size + 1 > _MAX_NAME:
                raise SquashfsError(f"{self.path}: directory inode {ref:#x} has a bad index")
            entries.append(DirIndex(index, start, cur.read(name_size + 1)))
        return tuple(entries)

    def _parse_file(self, cur: _Cursor, f: tuple[int, ...], c: dict[str, Any]) -> SqInode:
        if len(f) == 4:
            start, fragment, frag_offset, size = f
            nlink, xattr = 1, _NO_XATTR
        else:
            start, size, _sparse, nlink, fragment, frag_offset, xattr = f
        bs = self.block_size
        has_fragment = fragment != _NO_FRAGMENT
        count = format.block_count(size, bs, has_fragment)
        if size >> 62 or start > self.superblock.bytes_used:
            raise SquashfsError(f"{self.path}: file inode {c['ref']:#x} has bad size or start")
        if has_fragment:
            if fragment >= self.superblock.fragment_count:
                raise SquashfsError(
                    f"{self.path}: file inode {c['ref']:#x} has bad fragment {fragment}"
                )
            if frag_offset + size % bs > bs:
                raise SquashfsError(
                    f"{self.path}: file inode {c['ref']:#x} has a bad fragment offset"
                )
        block_pos, block_off = cur.position()
        list_ref = (block_pos - self._inodes.start) << 16 | block_off
        return SqInode(
            nlink=nlink, size=size, xattr=_xattr(xattr), blocks_start=start, block_count=count,
            block_list_ref=list_ref, fragment=fragment if has_fragment else None,
            fragment_offset=frag_offset, **c,
        )

    def _parse_symlink(self, cur: _Cursor, f: tuple[int, ...], c: dict[str, Any]) -> SqInode:
        nlink, size = f
        if size > _MAX_SYMLINK:
            raise SquashfsError(f"{self.path}: symlink inode {c['ref']:#x} has absurd size")
        block_pos, block_off = cur.position()
        target_ref = (block_pos - self._inodes.start) << 16 | block_off
        xattr = _NO_XATTR
        if c["extended"]:
            cur.skip(size)
            (xattr,) = _U32.unpack(cur.read(4))
        return SqInode(nlink=nlink, size=size, xattr=_xattr(xattr), target_ref=target_ref, **c)

    def _parse_device(self, cur: _Cursor, f: tuple[int, ...], c: dict[str, Any]) -> SqInode:
        nlink, rdev = f[0], f[1]
        xattr = f[2] if len(f) == 3 else _NO_XATTR
        return SqInode(nlink=nlink, size=0, rdev=format.decode_rdev(rdev), xattr=_xattr(xattr), **c)

    def _parse_ipc(self, cur: _Cursor, f: tuple[int, ...], c: dict[str, Any]) -> SqInode:
        xattr = f[1] if len(f) == 2 else _NO_XATTR
        return SqInode(nlink=f[0], size=0, xattr=_xattr(xattr), **c)

    def inode_by_number(self, number: int) -> SqInode:
        """The inode numbered `number` (1-based), via the export table when there is one."""
        if not 1 <= number <= self.superblock.inode_count:
            raise SquashfsError(f"{self.path}: no inode number {number}")
        if self._export_blocks is not None:
            (ref,) = self._table_entry("export table", self._export_blocks, number - 1, _U64)
        else:
            ref_or_none = self._numbers().get(number)
            if ref_or_none is None:
                raise SquashfsError(f"{self.path}: inode number {number} is not in any directory")
            ref = ref_or_none
        inode = self.inode(ref)
        if inode.number != number:
            raise SquashfsError(
                f"{self.path}: export table entry {number} points to inode {inode.number}"
            )
        return inode

    def _numbers(self) -> dict[int, int]:
        with self._number_lock:
            if self._number_index is None:
                index = {self.root.number: self.root.ref}
                for _, _, inode in self._walk():
                    index.setdefault(inode.number, inode.ref)
                self._number_index = index
            return self._number_index

    # -- directories -------------------------------------------------------------------

    def _segment_starts(self, directory: SqInode) -> list[tuple[int, int, bytes]]:
        """(listing position, block, first name) of each indexed part of a listing."""
        if directory.kind is not tree.Kind.DIR:
            raise NotADirectoryError(f"inode {directory.number} is not a directory")
        length = directory.size - 3
        starts = [(0, directory.dir_block, b"")]
        for entry in directory.dir_index:
            if entry.index == 0 and len(starts) == 1:
                starts[0] = (0, entry.start, b"")
                continue
            if not starts[-1][0] < entry.index < length:
                raise SquashfsError(f"{self.path}: directory {directory.number} has a bad index")
            starts.append((entry.index, entry.start, entry.name))
        return starts

    def _segment(
        self, directory: SqInode, starts: list[tuple[int, int, bytes]], k: int
    ) -> _Segment:
        """The parsed entries of part `k` of a listing (cached)."""
        pos, block, _ = starts[k]
        key = (directory.ref, pos)
        cached = self._segments.get(key)
        if cached is not None:
            return cached
        end = starts[k + 1][0] if k + 1 < len(starts) else directory.size - 3
        entries: list[DirEntry] = []
        if pos < end:
            offset = (directory.dir_offset + pos) % _META_SIZE
            cur = self._cursor(self._dirs, block << 16 | offset)
            entries = list(self._scan(directory, cur, pos, end))
        segment = _Segment([e.name for e in entries], [e.next_offset for e in entries], entries)
        self._segments.put(key, segment)
        return segment

    def _scan(self, directory: SqInode, cur: _Cursor, pos: int, end: int) -> Iterator[DirEntry]:
        """The entries of the listing part from `pos` to `end` (header boundaries)."""
        while pos < end:
            if pos + 12 > end:
                raise SquashfsError(f"{self.path}: directory {directory.number} is truncated")
            count, start, base = _DIR_HEADER.unpack(cur.read(12))
            pos += 12
            if count + 1 > _MAX_DIR_COUNT:
                raise SquashfsError(
                    f"{self.path}: directory {directory.number} has a header of {count + 1}"
                )
            for _ in range(count + 1):
                offset, delta, itype, size = _DIR_ENTRY.unpack(cur.read(8))
                pos += 8 + size + 1
                if pos > end or size + 1 > _MAX_NAME:
                    raise SquashfsError(
                        f"{self.path}: directory {directory.number} has a bad entry size"
                    )
                if not 1 <= itype <= 7 or offset >= _META_SIZE:
                    raise SquashfsError(
                        f"{self.path}: directory {directory.number} has a bad entry"
                    )
                name = cur.read(size + 1)
                if b"/" in name or b"\0" in name or name in (b".", b".."):
                    raise SquashfsError(
                        f"{self.path}: directory {directory.number} has an invalid name {name!r}"
                    )
                yield DirEntry(name, start << 16 | offset, _KINDS[itype], base + delta, pos)

    def readdir(self, directory: SqInode, offset: int = 0) -> Iterator[DirEntry]:
        """The entries of `directory` in name order, resuming after `offset` (a next_offset).

        Offsets are listing positions: the first entry's `next_offset` is at least 21.
        """
        starts = self._segment_starts(directory)
        k = max(0, bisect.bisect_right([s[0] for s in starts], offset) - 1)
        for part in range(k, len(starts)):
            segment = self._segment(directory, starts, part)
            first = bisect.bisect_right(segment.offsets, offset)
            yield from segment.entries[first:]

    def lookup(self, directory: SqInode, name: bytes) -> SqInode | None:
        """The inode named `name` in `directory`, or None.

        Reads only the part of the listing the directory index points to (at most about one
        metadata block) and keeps it parsed, so repeated lookups are a binary search.
        """
        starts = self._segment_starts(directory)
        if directory.size <= 3:
            return None
        k = 0
        for i in range(1, len(starts)):
            if starts[i][2] > name:
                break
            k = i
        segment = self._segment(directory, starts, k)
        i = bisect.bisect_left(segment.names, name)
        if i < len(segment.names) and segment.names[i] == name:
            return self._child(directory, segment.entries[i])
        return None

    def _child(self, directory: SqInode, entry: DirEntry) -> SqInode:
        inode = self.inode(entry.ref)
        if inode.kind is not entry.kind or inode.number != entry.inode_number:
            raise SquashfsError(
                f"{self.path}: entry {entry.name!r} of directory {directory.number} "
                "does not match its inode"
            )
        return inode

    def resolve(self, path: str | bytes) -> SqInode:
        """The inode at `path` (absolute or relative to the root); symlinks are not followed."""
        raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
        node = self.root
        for part in raw.split(b"/"):
            if part in (b"", b"."):
                continue
            if node.kind is not tree.Kind.DIR:
                raise NotADirectoryError(f"{raw.decode(errors='replace')}: not a directory")
            child = self._parent(node) if part == b".." else self.lookup(node, part)
            if child is None:
                raise FileNotFoundError(f"{raw.decode(errors='replace')}: no such file")
            node = child
        return node

    def _parent(self, directory: SqInode) -> SqInode:
        if directory.ref == self.root.ref:
            return directory
        parent = self.inode_by_number(directory.parent)
        if parent.kind is not tree.Kind.DIR:
            raise SquashfsError(f"{self.path}: parent of {directory.number} is not a directory")
        return parent

    # -- content -----------------------------------------------------------------------

    def readlink(self, inode: SqInode) -> bytes:
        """A symlink's target."""
        if inode.kind is not tree.Kind.SYMLINK:
            raise SquashfsError(f"{self.path}: inode {inode.number} is not a symlink")
        return self._cursor(self._inodes, inode.target_ref).read(inode.size)

    def read(self, inode: SqInode, offset: int, size: int) -> bytes:
        """Up to `size` bytes of a regular file's content from `offset`."""
        if inode.kind is not tree.Kind.FILE:
            raise SquashfsError(f"{self.path}: inode {inode.number} is not a regular file")
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        end = min(inode.size, offset + size)
        bs = self.block_size
        parts = []
        while offset < end:
            index, within = divmod(offset, bs)
            block = self._file_block(inode, index)
            take = block[within : within + (end - offset)]
            if not take:
                raise SquashfsError(f"{self.path}: inode {inode.number} block {index} is short")
            parts.append(take)
            offset += len(take)
        return b"".join(parts)

    def block_layout(self, inode: SqInode, index: int) -> tuple[int, int]:
        """The (image position, size word) of data block `index` of a regular file."""
        if not 0 <= index < inode.block_count:
            raise IndexError(index)
        blocks = self._block_lists.get(inode.ref)
        if blocks is None:
            blocks = _BlockList(self, inode)
            self._block_lists.put(inode.ref, blocks)
        return blocks.locate(index)

    def _file_block(self, inode: SqInode, index: int) -> bytes:
        """The uncompressed content of a file's block `index` (the tail for the fragment)."""
        bs = self.block_size
        if index >= inode.block_count:
            return self._tail(inode)
        expected = min(bs, inode.size - index * bs)
        pos, word = self.block_layout(inode, index)
        if word == 0:
            return bytes(expected)
        data = self._data_block(pos, word, f"inode {inode.number} block {index}")
        if len(data) != expected:
            raise SquashfsError(
                f"{self.path}: inode {inode.number} block {index} holds {len(data)} bytes,"
                f" expected {expected}"
            )
        return data

    def _tail(self, inode: SqInode) -> bytes:
        if inode.fragment is None:
            raise SquashfsError(f"{self.path}: inode {inode.number} reads past its blocks")
        start, word, _ = self._table_entry(
            "fragment table", self._fragment_blocks, inode.fragment, _FRAGMENT
        )
        data = self._data_block(start, word, f"fragment {inode.fragment}")
        tail = inode.size - inode.block_count * self.block_size
        piece = data[inode.fragment_offset : inode.fragment_offset + tail]
        if len(piece) != tail:
            raise SquashfsError(
                f"{self.path}: fragment {inode.fragment} is too short for inode {inode.number}"
            )
        return piece

    def _data_block(self, pos: int, word: int, what: str) -> bytes:
        key = (pos, word)
        cached = self._data_cache.get(key)
        if cached is not None:
            return cached
        size = word & _DATA_SIZE_MASK
        if size > self.block_size or pos < format.SUPERBLOCK_SIZE:
            raise SquashfsError(f"{self.path}: {what} has bad size {size} or position {pos}")
        if pos + size > self.superblock.inode_table:
            raise SquashfsError(f"{self.path}: {what} at {pos} lies outside the data area")
        raw = self._pread(pos, size, what)
        if word & _DATA_RAW:
            data = raw
        else:
            try:
                data = self._decompress(raw, self.block_size)
            except SquashfsError as exc:
                raise SquashfsError(f"{self.path}: {what} at {pos}: {exc}") from None
        self._data_cache.put(key, data)
        return data

    # -- xattrs ------------------------------------------------------------------------

    def xattrs(self, inode: SqInode) -> dict[bytes, bytes]:
        """An inode's extended attributes by full name (``b"user.x"``)."""
        if inode.xattr is None:
            return {}
        if inode.xattr >= self._xattr_ids:
            raise SquashfsError(f"{self.path}: inode {inode.number} has bad xattr index")
        ref, count, _size = self._table_entry(
            "xattr id table", self._xattr_blocks, inode.xattr, _XATTR_ID
        )
        if count > _MAX_XATTR_COUNT:
            raise SquashfsError(f"{self.path}: inode {inode.number} has {count} xattrs")
        cur = self._cursor(self._xattr_region, ref)
        result: dict[bytes, bytes] = {}
        for _ in range(count):
            kind, name_size = _XATTR_KEY.unpack(cur.read(4))
            prefix = _XATTR_PREFIXES.get(kind & ~_XATTR_OOL)
            if prefix is None or name_size > _MAX_XATTR_NAME:
                raise SquashfsError(f"{self.path}: inode {inode.number} has a bad xattr key")
            name = prefix + cur.read(name_size)
            result[name] = self._xattr_value(cur, bool(kind & _XATTR_OOL), inode)
        return result

    def _xattr_value(self, cur: _Cursor, out_of_line: bool, inode: SqInode) -> bytes:
        (size,) = _U32.unpack(cur.read(4))
        if out_of_line:
            if size != 8:
                raise SquashfsError(f"{self.path}: inode {inode.number} has a bad xattr ref")
            (ref,) = _U64.unpack(cur.read(8))
            cur = self._cursor(self._xattr_region, ref)
            (size,) = _U32.unpack(cur.read(4))
        if size > _MAX_XATTR_VALUE:
            raise SquashfsError(f"{self.path}: inode {inode.number} has an absurd xattr value")
        return cur.read(size)

    # -- whole-image views -------------------------------------------------------------

    def _walk(self) -> Iterator[tuple[SqInode, bytes, SqInode]]:
        """Every (directory, name, inode) below the root, parents before children.

        Loops are errors, and so are directories sharing listing bytes: the listings walked
        may not add up to more than the directory table holds, so a small hostile image
        cannot expand into an enormous tree.
        """
        seen = {self.root.ref}
        stack = [self.root]
        budget = self._dir_table_bytes()
        while stack:
            directory = stack.pop()
            budget -= max(0, directory.size - 3)
            if budget < 0:
                raise SquashfsError(
                    f"{self.path}: directory listings add up to more than the directory table"
                )
            for entry in self.readdir(directory):
                child = self._child(directory, entry)
                yield directory, entry.name, child
                if child.kind is tree.Kind.DIR:
                    if child.ref in seen:
                        raise SquashfsError(
                            f"{self.path}: directory loop at {entry.name!r} in directory"
                            f" {directory.number}"
                        )
                    seen.add(child.ref)
                    stack.append(child)

    def _dir_table_bytes(self) -> int:
        """The uncompressed size of the whole directory table (read once)."""
        if self._dir_bytes is None:
            total, pos = 0, self._dirs.start
            while pos < self._dirs.end:
                data, pos = self._metablock(self._dirs, pos)
                total += len(data)
            self._dir_bytes = total
        return self._dir_bytes

    def to_tree(self) -> tree.Inode:
        """The whole image as a `squashstore.tree` (hard links share one `tree.Inode`)."""
        root = self._tree_node(self.root)
        made: dict[int, tree.Inode] = {self.root.ref: root}
        for directory, name, inode in self._walk():
            node = made.get(inode.ref)
            if node is None:
                node = made[inode.ref] = self._tree_node(inode)
            children = made[directory.ref].children
            assert children is not None
            children[tree.name_str(name)] = node
        return root

    def _tree_node(self, inode: SqInode) -> tree.Inode:
        node = tree.Inode(
            inode.kind, mode=inode.mode, uid=inode.uid, gid=inode.gid, mtime=inode.mtime,
            xattrs={tree.name_str(k): v for k, v in self.xattrs(inode).items()},
            data=inode,
        )
        if inode.kind is tree.Kind.DIR:
            node.children = {}
        else:
            node.nlink = inode.nlink
        if inode.kind is tree.Kind.FILE:
            node.size = inode.size
        elif inode.kind is tree.Kind.SYMLINK:
            node.target = tree.name_str(self.readlink(inode))
        elif inode.kind in (tree.Kind.BLOCKDEV, tree.Kind.CHARDEV):
            node.rdev = inode.rdev
        return node


_Parser = Callable[[SquashReader, _Cursor, tuple[int, ...], dict[str, Any]], SqInode]
_PARSERS: dict[int, _Parser] = {
    1: SquashReader._parse_dir,
    8: SquashReader._parse_dir,
    2: SquashReader._parse_file,
    9: SquashReader._parse_file,
    3: SquashReader._parse_symlink,
    10: SquashReader._parse_symlink,
    4: SquashReader._parse_device,
    5: SquashReader._parse_device,
    11: SquashReader._parse_device,
    12: SquashReader._parse_device,
    6: SquashReader._parse_ipc,
    7: SquashReader._parse_ipc,
    13: SquashReader._parse_ipc,
    14: SquashReader._parse_ipc,
}


def _xattr(index: int) -> int | None:
    return None if index == _NO_XATTR else index


def _compression_name(compressor: int, path: Path) -> str:
    names = {1: "gzip", 2: "lzma", 3: "lzo", 4: "xz", 5: "lz4", 6: "zstd"}
    name = names.get(compressor)
    if name is None:
        raise SquashfsError(f"{path}: unknown squashfs compressor id {compressor}")
    return name


def _check_superblock(sb: format.Superblock, file_size: int, path: str) -> None:
    """Reject superblocks whose fields cannot describe a readable image of `file_size`."""
    if sb.magic != format.MAGIC:
        raise SquashfsError(f"{path}: not a squashfs image (bad magic)")
    if (sb.version_major, sb.version_minor) != (4, 0):
        raise SquashfsError(
            f"{path}: squashfs version {sb.version_major}.{sb.version_minor} is not 4.0"
        )
    if not 4096 <= sb.block_size <= 1 << 20 or sb.block_size != 1 << sb.block_log:
        raise SquashfsError(f"{path}: bad block size {sb.block_size}")
    if sb.bytes_used > file_size:
        raise SquashfsError(
            f"{path}: image is truncated ({file_size} bytes, superblock says {sb.bytes_used})"
        )
    if not format.SUPERBLOCK_SIZE <= sb.inode_table < sb.directory_table < sb.bytes_used:
        raise SquashfsError(f"{path}: inode or directory table lies outside the image")
    if sb.id_count == 0:
        raise SquashfsError(f"{path}: the id table is empty")
    if sb.inode_count == 0:
        raise SquashfsError(f"{path}: the image has no inodes")
