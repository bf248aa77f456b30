"""Reading a squashfs image's directories (libsquashfs's ``dir_reader``).

This module owns the directory table as the reader sees it: `DirEntry`, and `DirReader`,
which lists a directory in name order (resuming at a listing offset, as FUSE's readdir
does), looks a name up through the directory index (reading about one metadata block, kept
parsed in a bounded cache, so repeated lookups are a binary search), resolves paths, finds
inodes by number (the export table, else one walk of the tree), and walks the whole tree
with loops and overlapping listings rejected, so a small hostile image cannot expand into
an enormous tree.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from squashstore import tree
from squashstore.squashfs import format
from squashstore.squashfs.inodes import KINDS, InodeTable, SqInode
from squashstore.squashfs.meta import LRU, META_SIZE, Cursor, MetaReader, SquashfsError, Tables

_MAX_NAME = format.NAME_MAX
_MAX_DIR_COUNT = format.DIR_HEADER_MAX_ENTRIES
_DIR_HEADER = format.DirHeader.STRUCT
_DIR_ENTRY = format.DirEntry.STRUCT


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


class DirReader:
    """The directories of one image below `root`; parsed listing parts are cached."""

    def __init__(
        self,
        meta: MetaReader,
        tables: Tables,
        inodes: InodeTable,
        root: SqInode,
        cache_segments: int,
    ) -> None:
        self._meta = meta
        self._tables = tables
        self._inodes = inodes
        self._path = meta.image.path
        self.root = root
        self._segments: LRU[tuple[int, int], _Segment] = LRU(cache_segments)
        self._number_index: dict[int, int] | None = None
        self._number_lock = threading.Lock()
        self._dir_bytes: int | None = None

    # -- listings ----------------------------------------------------------------------

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
            return self.child(directory, segment.entries[i])
        return None

    def child(self, directory: SqInode, entry: DirEntry) -> SqInode:
        """The inode of `entry`, checked against what the entry says of it."""
        inode = self._inodes.get(entry.ref)
        if inode.kind is not entry.kind or inode.number != entry.inode_number:
            raise SquashfsError(
                f"{self._path}: entry {entry.name!r} of directory {directory.number} "
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
            raise SquashfsError(f"{self._path}: parent of {directory.number} is not a directory")
        return parent

    # -- inode numbers -----------------------------------------------------------------

    def inode_by_number(self, number: int) -> SqInode:
        """The inode numbered `number` (1-based), via the export table when there is one."""
        ref = self._inodes.exported(number)
        if ref is None:
            ref = self._numbers().get(number)
            if ref is None:
                raise SquashfsError(
                    f"{self._path}: inode number {number} is not in any directory"
                )
        inode = self._inodes.get(ref)
        if inode.number != number:
            raise SquashfsError(
                f"{self._path}: export table entry {number} points to inode {inode.number}"
            )
        return inode

    def _numbers(self) -> dict[int, int]:
        with self._number_lock:
            if self._number_index is None:
                index = {self.root.number: self.root.ref}
                for _, _, inode in self.walk():
                    index.setdefault(inode.number, inode.ref)
                self._number_index = index
            return self._number_index

    # -- the whole tree ----------------------------------------------------------------

    def walk(self) -> Iterator[tuple[SqInode, bytes, SqInode]]:
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
                    f"{self._path}: directory listings add up to more than the directory table"
                )
            for entry in self.readdir(directory):
                child = self.child(directory, entry)
                yield directory, entry.name, child
                if child.kind is tree.Kind.DIR:
                    if child.ref in seen:
                        raise SquashfsError(
                            f"{self._path}: directory loop at {entry.name!r} in directory"
                            f" {directory.number}"
                        )
                    seen.add(child.ref)
                    stack.append(child)

    def _dir_table_bytes(self) -> int:
        """The uncompressed size of the whole directory table (read once)."""
        if self._dir_bytes is None:
            dirs = self._tables.dirs
            total, pos = 0, dirs.start
            while pos < dirs.end:
                data, pos = self._meta.block(dirs, pos)
                total += len(data)
            self._dir_bytes = total
        return self._dir_bytes

    # -- listing parts -----------------------------------------------------------------

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
                raise SquashfsError(f"{self._path}: directory {directory.number} has a bad index")
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
            offset = (directory.dir_offset + pos) % META_SIZE
            cur = self._meta.cursor(self._tables.dirs, block << 16 | offset)
            entries = list(self._scan(directory, cur, pos, end))
        segment = _Segment([e.name for e in entries], [e.next_offset for e in entries], entries)
        self._segments.put(key, segment)
        return segment

    def _scan(self, directory: SqInode, cur: Cursor, pos: int, end: int) -> Iterator[DirEntry]:
        """The entries of the listing part from `pos` to `end` (header boundaries)."""
        while pos < end:
            if pos + 12 > end:
                raise SquashfsError(f"{self._path}: directory {directory.number} is truncated")
            count, start, base = _DIR_HEADER.unpack(cur.read(12))
            pos += 12
            if count + 1 > _MAX_DIR_COUNT:
                raise SquashfsError(
                    f"{self._path}: directory {directory.number} has a header of {count + 1}"
                )
            for _ in range(count + 1):
                offset, delta, itype, size = _DIR_ENTRY.unpack(cur.read(8))
                pos += 8 + size + 1
                if pos > end or size + 1 > _MAX_NAME:
                    raise SquashfsError(
                        f"{self._path}: directory {directory.number} has a bad entry size"
                    )
                if not 1 <= itype <= 7 or offset >= META_SIZE:
                    raise SquashfsError(
                        f"{self._path}: directory {directory.number} has a bad entry"
                    )
                name = cur.read(size + 1)
                if b"/" in name or b"\0" in name or name in (b".", b".."):
                    raise SquashfsError(
                        f"{self._path}: directory {directory.number} has an invalid name {name!r}"
                    )
                yield DirEntry(name, start << 16 | offset, KINDS[itype], base + delta, pos)
