"""Reading a squashfs image's file, metadata blocks and lookup tables (libsquashfs's
``sqfs_file``, ``meta_reader`` and ``read_table``).

This module owns the lowest layer of reading an image: the open file (`ImageFile`: one
descriptor, bounds-checked `os.pread`, the checked superblock, the decompressor),
metadata blocks (`MetaReader`: a bounded, locked cache of decompressed blocks, each read
only inside the byte `Region` of the table it belongs to, and `Cursor`s that read records
spanning blocks), and the lookup tables (`Tables`: where the inode, directory and xattr
tables lie, the block positions of the fragment, export, id and xattr id tables, and their
entries). The inode, directory, data and xattr readers build on these; `SquashfsError` is
the one error they all raise for a corrupt or hostile image.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from squashstore.image import SquashstoreError
from squashstore.squashfs import compress, format


class SquashfsError(SquashstoreError):
    """A squash file is not a valid squashfs 4.0 image, or one of its parts is corrupt."""


META_SIZE = format.METADATA_SIZE
_META_RAW = format.METADATA_UNCOMPRESSED
_ABSENT = format.INVALID_BLK
_U16 = struct.Struct("<H")
_XATTR_TABLE = format.XattrTableHeader.STRUCT

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
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


@dataclass(frozen=True, slots=True)
class Region:
    """A byte range of the image that one table's metadata blocks must lie in."""

    name: str
    start: int
    end: int


# ---------------------------------------------------------------------------------------
# The file.


class ByteSource(Protocol):
    """Where a reader reads its image from instead of the file at its path (a lazily
    pulled image's cache and registry): `size` bytes, read with `pread`; a part that
    cannot be read raises `OSError`."""

    @property
    def size(self) -> int: ...

    def pread(self, size: int, offset: int) -> bytes: ...


class ImageFile:
    """An image opened for reading: its file (or `source`), size, superblock and codec.

    Opening checks the superblock against the image's size; every read is a bounds-checked
    `os.pread` (or `source.pread`), so one `ImageFile` serves many threads. With a
    `source`, `path` only names the image in messages.
    """

    def __init__(self, path: Path, source: ByteSource | None = None) -> None:
        self.path = path
        self._source = source
        self._fd = -1
        if source is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise SquashfsError(f"{self.path}: cannot open: {exc.strerror}") from None
        try:
            if source is not None:
                self.size = source.size
            elif stat.S_ISDIR(os.fstat(self._fd).st_mode):
                raise SquashfsError(f"{self.path}: is a directory, not a squash file")
            else:
                self.size = os.lseek(self._fd, 0, os.SEEK_END)  # block devices too
            self.superblock = self._read_superblock()
            self.block_size: int = self.superblock.block_size
            self.compression: str = _compression_name(self.superblock.compressor, self.path)
            self.decompress = self._make_decompressor()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the file descriptor; the image cannot be read afterwards."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def pread(self, pos: int, size: int, what: str) -> bytes:
        """Exactly `size` bytes at `pos`; `SquashfsError` if they are not all in the file."""
        if pos < 0 or size < 0 or pos + size > self.size:
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
        raw = self.pread(0, format.SUPERBLOCK_SIZE, "superblock")
        try:
            sb = format.Superblock.unpack(raw)
        except (ValueError, struct.error) as exc:
            raise SquashfsError(f"{self.path}: not a squashfs image ({exc})") from None
        _check_superblock(sb, self.size, str(self.path))
        return sb

    def _make_decompressor(self) -> Callable[[bytes, int], bytes]:
        sb = self.superblock
        options: bytes | None = None
        if sb.flags & format.Flag.COMPRESSOR_OPTIONS:
            region = Region("compressor options", format.SUPERBLOCK_SIZE, sb.bytes_used)
            options, _ = load_metablock(self, region, format.SUPERBLOCK_SIZE, None)
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


# ---------------------------------------------------------------------------------------
# Metadata blocks.


def load_metablock(
    image: ImageFile,
    region: Region,
    pos: int,
    decompress: Callable[[bytes, int], bytes] | None,
) -> tuple[bytes, int]:
    """The metadata block at `pos` (uncached) and the position of the next one.

    `decompress` None: the block must be stored raw (the compressor options block).
    """
    if not region.start <= pos or pos + 2 > region.end:
        raise SquashfsError(
            f"{image.path}: {region.name} metadata block at {pos} lies outside the table"
        )
    (header,) = _U16.unpack(image.pread(pos, 2, f"{region.name} metadata block"))
    size = header & ~_META_RAW
    if size == 0 or size > META_SIZE or pos + 2 + size > region.end:
        raise SquashfsError(
            f"{image.path}: {region.name} metadata block at {pos} has bad size {size}"
        )
    raw = image.pread(pos + 2, size, f"{region.name} metadata block")
    if header & _META_RAW:
        data = raw
    elif decompress is None:
        raise SquashfsError(f"{image.path}: {region.name} must not be compressed")
    else:
        try:
            data = decompress(raw, META_SIZE)
        except SquashfsError as exc:
            raise SquashfsError(
                f"{image.path}: {region.name} metadata block at {pos}: {exc}"
            ) from None
    if not data:
        raise SquashfsError(f"{image.path}: {region.name} metadata block at {pos} is empty")
    return data, pos + 2 + size


class MetaReader:
    """Decompressed metadata blocks of one image, in a bounded cache shared by threads."""

    def __init__(self, image: ImageFile, cache_blocks: int) -> None:
        self.image = image
        self._cache: LRU[int, tuple[bytes, int]] = LRU(cache_blocks)

    def block(self, region: Region, pos: int) -> tuple[bytes, int]:
        """The decompressed metadata block at `pos` and the position of the next one."""
        cached = self._cache.get(pos)
        if cached is not None and region.start <= pos and cached[1] <= region.end:
            return cached
        result = load_metablock(self.image, region, pos, self.image.decompress)
        self._cache.put(pos, result)
        return result

    def cursor(self, region: Region, ref: int) -> Cursor:
        """A cursor at metadata reference `ref` (block relative to `region`, offset)."""
        block, offset = ref >> 16, ref & 0xFFFF
        if offset >= META_SIZE:
            raise SquashfsError(f"{self.image.path}: bad {region.name} reference {ref:#x}")
        return Cursor(self, region, region.start + block, offset)


class Cursor:
    """Sequential reading of records that span metadata blocks of one table."""

    __slots__ = ("_data", "_meta", "_next", "_offset", "_pos", "_region")

    def __init__(self, meta: MetaReader, region: Region, pos: int, offset: int) -> None:
        self._meta = meta
        self._region = region
        self._pos = pos
        self._data, self._next = meta.block(region, pos)
        self._offset = offset
        if offset > len(self._data):
            raise SquashfsError(
                f"{meta.image.path}: {region.name} reference offset {offset} is beyond its"
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
            self._data, self._next = self._meta.block(self._region, self._pos)
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
            self._data, self._next = self._meta.block(self._region, self._pos)
            self._offset = 0


# ---------------------------------------------------------------------------------------
# Lookup tables.


class Tables:
    """Where every table of an image lies, and the entries of its lookup tables.

    Reading the positions of the fragment, export, id and xattr id tables fixes the end of
    each table (the next table's start), so a metadata block can never be read across two
    tables. The id table is read whole; the others entry by entry, on demand.
    """

    def __init__(self, meta: MetaReader) -> None:
        self._meta = meta
        self._path = meta.image.path
        sb = self._sb = meta.image.superblock
        bounds = {sb.bytes_used}
        self.fragment_blocks = self._index(
            "fragment table", sb.fragment_table, sb.fragment_count, 16, bounds
        )
        self.export_blocks: tuple[int, ...] | None = None
        if sb.export_table != _ABSENT:
            self.export_blocks = self._index(
                "export table", sb.export_table, sb.inode_count, 8, bounds
            )
        id_blocks = self._index("id table", sb.id_table, sb.id_count, 4, bounds)
        self.xattr_blocks: tuple[int, ...] = ()
        self.xattr_ids = 0
        """Entries of the xattr id table (0: the image has no xattrs)."""
        xattr_start = 0
        if sb.xattr_id_table != _ABSENT:
            xattr_start = self._read_xattr_header(bounds)
        self._bounds = sorted(bounds)
        self.inodes = Region("inode table", sb.inode_table, sb.directory_table)
        # An empty directory table (an empty root) ends where it starts.
        dirs_end = min(b for b in self._bounds if b >= sb.directory_table)
        self.dirs = Region("directory table", sb.directory_table, dirs_end)
        self.xattrs: Region | None = None
        """The xattr key/value table, when `xattr_ids` is not 0."""
        if self.xattr_ids:
            self.xattrs = Region("xattr table", xattr_start, self._next_bound(xattr_start))
        self.ids = self._read_ids(id_blocks)
        """The uid/gid table."""

    def _next_bound(self, start: int) -> int:
        return min(b for b in self._bounds if b > start)

    def _index(
        self, name: str, start: int, count: int, entry_size: int, bounds: set[int]
    ) -> tuple[int, ...]:
        """The metadata block positions of a lookup table of `count` entries."""
        sb = self._sb
        if count == 0:
            return ()
        blocks = -(-count * entry_size // META_SIZE)
        if start < sb.directory_table or start + 8 * blocks > sb.bytes_used:
            raise SquashfsError(f"{self._path}: {name} at {start} lies outside the image")
        raw = self._meta.image.pread(start, 8 * blocks, name)
        positions = struct.unpack(f"<{blocks}Q", raw)
        for pos in positions:
            if not sb.directory_table <= pos < start:
                raise SquashfsError(f"{self._path}: {name} block at {pos} is out of place")
        bounds.add(start)
        bounds.add(positions[0])
        return positions

    def _read_xattr_header(self, bounds: set[int]) -> int:
        """Read the xattr id table's header and block list; the key/value table's start."""
        sb = self._sb
        start = sb.xattr_id_table
        if start < sb.directory_table or start + _XATTR_TABLE.size > sb.bytes_used:
            raise SquashfsError(f"{self._path}: xattr id table at {start} lies outside the image")
        table_start, count, _ = _XATTR_TABLE.unpack(
            self._meta.image.pread(start, _XATTR_TABLE.size, "xattr id table")
        )
        if not sb.directory_table <= table_start <= start:
            raise SquashfsError(f"{self._path}: xattr table at {table_start} is out of place")
        bounds.add(table_start)
        self.xattr_ids = count
        self.xattr_blocks = self._index(
            "xattr id table", start + _XATTR_TABLE.size, count, 16, bounds
        )
        bounds.add(start)
        return int(table_start)

    def _read_ids(self, blocks: tuple[int, ...]) -> tuple[int, ...]:
        count = self._sb.id_count
        raw = self._table_bytes("id table", blocks, count * 4)
        return struct.unpack(f"<{count}I", raw)

    def _table_bytes(self, name: str, blocks: tuple[int, ...], size: int) -> bytes:
        parts = []
        for pos in blocks:
            end = self._next_bound(pos)
            data, _ = self._meta.block(Region(name, pos, end), pos)
            parts.append(data)
        raw = b"".join(parts)
        if len(raw) < size:
            raise SquashfsError(f"{self._path}: {name} is truncated")
        return raw[:size]

    def entry(
        self, name: str, blocks: tuple[int, ...], index: int, entry: struct.Struct
    ) -> tuple[int, ...]:
        """Entry `index` of the lookup table `name` whose blocks are at `blocks`."""
        per_block = META_SIZE // entry.size
        block, slot = divmod(index, per_block)
        if block >= len(blocks):
            raise SquashfsError(f"{self._path}: {name} has no entry {index}")
        pos = blocks[block]
        data, _ = self._meta.block(Region(name, pos, self._next_bound(pos)), pos)
        offset = slot * entry.size
        if offset + entry.size > len(data):
            raise SquashfsError(f"{self._path}: {name} entry {index} is truncated")
        return entry.unpack_from(data, offset)
