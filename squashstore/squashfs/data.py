"""Reading a squashfs image's file content (libsquashfs's ``data_reader``).

This module owns the data area as the reader sees it: a regular file's block size list
(`BlockList`, decoded lazily in chunks so even a huge or hostile block count costs memory
only in proportion to what is read), its data blocks (sparse blocks as zeros, raw or
compressed, each checked to lie inside the data area and to decompress to the expected
size) and its tail in a fragment block (through the fragment table). `DataReader` keeps
decompressed data and fragment blocks in a bounded cache shared by threads.
"""

from __future__ import annotations

import struct
import threading
from array import array

from squashstore import tree
from squashstore.squashfs import format
from squashstore.squashfs.inodes import SqInode
from squashstore.squashfs.meta import LRU, Cursor, MetaReader, SquashfsError, Tables

_DATA_RAW = format.DATA_UNCOMPRESSED
_DATA_SIZE_MASK = format.DATA_SIZE_MASK
_FRAGMENT = format.FragmentEntry.STRUCT
_CHUNK = 2048
"""Block size words decoded at a time (one metadata block's worth)."""

_Chunk = tuple["array[int]", "array[int]"]
"""The (image positions, size words) of one chunk of a file's blocks."""


class BlockList:
    """A file's data block layout, decoded lazily in chunks from its block size list.

    Only a checkpoint per chunk (where its words are, where its data starts) is kept for
    good; decoded chunks live in the shared bounded `chunks` cache. So even a huge (or
    hostile) block count costs memory only in proportion to the metadata actually read.
    """

    def __init__(
        self, meta: MetaReader, tables: Tables, chunks: LRU[tuple[int, int], _Chunk],
        inode: SqInode,
    ) -> None:
        self._meta = meta
        self._tables = tables
        self._chunks = chunks
        self._inode = inode
        pos = tables.inodes.start + (inode.block_list_ref >> 16)
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

    def _decode(self, chunk: int) -> _Chunk:
        key = (self._inode.ref, chunk)
        cached = self._chunks.get(key)
        if cached is not None:
            return cached
        pos, offset, start = self._checkpoints[chunk]
        count = min(_CHUNK, self._inode.block_count - chunk * _CHUNK)
        cursor = Cursor(self._meta, self._tables.inodes, pos, offset)
        words = array("I", cursor.read(4 * count))
        if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover
            words.byteswap()
        starts = array("Q")
        for word in words:
            starts.append(start)
            start += word & _DATA_SIZE_MASK
        if start > self._meta.image.superblock.inode_table:
            raise SquashfsError(
                f"{self._meta.image.path}: inode {self._inode.number} has blocks beyond the"
                " data area"
            )
        if chunk + 1 == len(self._checkpoints):
            self._checkpoints.append((*cursor.position(), start))
        self._chunks.put(key, (starts, words))
        return starts, words


class DataReader:
    """The file content of one image; `cache_blocks` decompressed blocks are kept."""

    def __init__(self, meta: MetaReader, tables: Tables, cache_blocks: int) -> None:
        self._meta = meta
        self._tables = tables
        self._image = meta.image
        self._path = meta.image.path
        self._block_size = meta.image.block_size
        self._cache: LRU[tuple[int, int], bytes] = LRU(cache_blocks)
        self._block_lists: LRU[int, BlockList] = LRU(256)
        self._chunks: LRU[tuple[int, int], _Chunk] = LRU(64)

    def read(self, inode: SqInode, offset: int, size: int) -> bytes:
        """Up to `size` bytes of a regular file's content from `offset`."""
        if inode.kind is not tree.Kind.FILE:
            raise SquashfsError(f"{self._path}: inode {inode.number} is not a regular file")
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        end = min(inode.size, offset + size)
        bs = self._block_size
        parts = []
        while offset < end:
            index, within = divmod(offset, bs)
            block = self._file_block(inode, index)
            take = block[within : within + (end - offset)]
            if not take:
                raise SquashfsError(f"{self._path}: inode {inode.number} block {index} is short")
            parts.append(take)
            offset += len(take)
        return b"".join(parts)

    def block_layout(self, inode: SqInode, index: int) -> tuple[int, int]:
        """The (image position, size word) of data block `index` of a regular file."""
        if not 0 <= index < inode.block_count:
            raise IndexError(index)
        blocks = self._block_lists.get(inode.ref)
        if blocks is None:
            blocks = BlockList(self._meta, self._tables, self._chunks, inode)
            self._block_lists.put(inode.ref, blocks)
        return blocks.locate(index)

    def _file_block(self, inode: SqInode, index: int) -> bytes:
        """The uncompressed content of a file's block `index` (the tail for the fragment)."""
        bs = self._block_size
        if index >= inode.block_count:
            return self._tail(inode)
        expected = min(bs, inode.size - index * bs)
        pos, word = self.block_layout(inode, index)
        if word == 0:
            return bytes(expected)
        data = self._data_block(pos, word, f"inode {inode.number} block {index}")
        if len(data) != expected:
            raise SquashfsError(
                f"{self._path}: inode {inode.number} block {index} holds {len(data)} bytes,"
                f" expected {expected}"
            )
        return data

    def _tail(self, inode: SqInode) -> bytes:
        if inode.fragment is None:
            raise SquashfsError(f"{self._path}: inode {inode.number} reads past its blocks")
        start, word, _ = self._tables.entry(
            "fragment table", self._tables.fragment_blocks, inode.fragment, _FRAGMENT
        )
        data = self._data_block(start, word, f"fragment {inode.fragment}")
        tail = inode.size - inode.block_count * self._block_size
        piece = data[inode.fragment_offset : inode.fragment_offset + tail]
        if len(piece) != tail:
            raise SquashfsError(
                f"{self._path}: fragment {inode.fragment} is too short for inode {inode.number}"
            )
        return piece

    def _data_block(self, pos: int, word: int, what: str) -> bytes:
        key = (pos, word)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        size = word & _DATA_SIZE_MASK
        if size > self._block_size or pos < format.SUPERBLOCK_SIZE:
            raise SquashfsError(f"{self._path}: {what} has bad size {size} or position {pos}")
        if pos + size > self._image.superblock.inode_table:
            raise SquashfsError(f"{self._path}: {what} at {pos} lies outside the data area")
        raw = self._image.pread(pos, size, what)
        if word & _DATA_RAW:
            data = raw
        else:
            try:
                data = self._image.decompress(raw, self._block_size)
            except SquashfsError as exc:
                raise SquashfsError(f"{self._path}: {what} at {pos}: {exc}") from None
        self._cache.put(key, data)
        return data
