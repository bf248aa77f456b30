"""Decoding a squashfs image's inodes (libsquashfs's ``read_inode``).

This module owns the inode table as the reader sees it: `SqInode`, the one decoded form of
every inode type (basic and extended), `DirIndex` (an extended directory's index entries),
and `InodeTable`, which decodes an inode by its reference with every field checked (type,
number, id indexes, sizes, fragment, directory offset), keeps decoded inodes in a bounded
cache, maps inode numbers to references through the export table, and reads symlink
targets (which live in the inode table).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

from squashstore import tree
from squashstore.squashfs import format
from squashstore.squashfs.meta import LRU, META_SIZE, Cursor, MetaReader, SquashfsError, Tables

_NO_FRAGMENT = format.INVALID_FRAG
_NO_XATTR = format.INVALID_XATTR
_MAX_NAME = format.NAME_MAX
_MAX_SYMLINK = 65535
"""Longest symlink target accepted (Linux allows 4095; tar archives may carry more)."""
_HEADER = format.InodeHeader.STRUCT
_U32 = format.SYMLINK_XATTR
_U64 = format.EXPORT_ENTRY
_DIR_INDEX = format.DirIndex.STRUCT
_INODE_BODY = {int(t): body.STRUCT for t, body in format.INODE_BODY.items()}
KINDS = {int(k): k for k in tree.Kind}
"""The tree kind of each basic inode type number (what directory entries carry)."""


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


class _Common(TypedDict):
    """The fields every inode has (its header), passed on to `SqInode` by each parser."""

    ref: int
    number: int
    kind: tree.Kind
    mode: int
    uid: int
    gid: int
    mtime: int
    extended: bool


class InodeTable:
    """The inodes of one image, decoded on demand and cached (`cache_entries` of them)."""

    def __init__(self, meta: MetaReader, tables: Tables, cache_entries: int) -> None:
        self._meta = meta
        self._tables = tables
        self._path = meta.image.path
        self._sb = meta.image.superblock
        self._cache: LRU[int, SqInode] = LRU(cache_entries)

    def get(self, ref: int) -> SqInode:
        """The inode at inode reference `ref` (block << 16 | offset)."""
        cached = self._cache.get(ref)
        if cached is not None:
            return cached
        try:
            inode = self._parse(ref)
        except struct.error as exc:  # pragma: no cover - lengths are always checked
            raise SquashfsError(f"{self._path}: inode {ref:#x}: {exc}") from None
        self._cache.put(ref, inode)
        return inode

    def exported(self, number: int) -> int | None:
        """The reference of inode `number` from the export table; None without one."""
        if not 1 <= number <= self._sb.inode_count:
            raise SquashfsError(f"{self._path}: no inode number {number}")
        blocks = self._tables.export_blocks
        if blocks is None:
            return None
        (ref,) = self._tables.entry("export table", blocks, number - 1, _U64)
        return ref

    def readlink(self, inode: SqInode) -> bytes:
        """A symlink's target."""
        if inode.kind is not tree.Kind.SYMLINK:
            raise SquashfsError(f"{self._path}: inode {inode.number} is not a symlink")
        return self._meta.cursor(self._tables.inodes, inode.target_ref).read(inode.size)

    # -- decoding ----------------------------------------------------------------------

    def _parse(self, ref: int) -> SqInode:
        if ref < 0 or ref >> 48:
            raise SquashfsError(f"{self._path}: bad inode reference {ref:#x}")
        cur = self._meta.cursor(self._tables.inodes, ref)
        itype, mode, uid_index, gid_index, mtime, number = _HEADER.unpack(cur.read(16))
        body = _INODE_BODY.get(itype)
        if body is None:
            raise SquashfsError(f"{self._path}: inode {ref:#x} has unknown type {itype}")
        fields = body.unpack(cur.read(body.size))
        if number == 0 or number > self._sb.inode_count:
            raise SquashfsError(f"{self._path}: inode {ref:#x} has bad number {number}")
        common: _Common = {
            "ref": ref,
            "number": number,
            "kind": KINDS[(itype - 1) % 7 + 1],
            "mode": mode & 0o7777,
            "uid": self._id(uid_index, ref),
            "gid": self._id(gid_index, ref),
            "mtime": mtime,
            "extended": itype > 7,
        }
        parse = _PARSERS[itype]
        return parse(self, cur, fields, common)

    def _id(self, index: int, ref: int) -> int:
        ids = self._tables.ids
        if index >= len(ids):
            raise SquashfsError(f"{self._path}: inode {ref:#x} has bad id index {index}")
        return ids[index]

    def _ref_here(self, cur: Cursor) -> int:
        """The inode-table reference of the cursor's next byte."""
        block_pos, block_off = cur.position()
        return (block_pos - self._tables.inodes.start) << 16 | block_off

    def _parse_dir(self, cur: Cursor, f: tuple[int, ...], c: _Common) -> SqInode:
        if len(f) == 5:  # basic
            start, nlink, size, offset, parent = f
            xattr, index = _NO_XATTR, tuple[DirIndex, ...]()
        else:
            nlink, size, start, parent, count, offset, xattr = f
            if count > size // 21 + 1:  # each index entry names a header of >= 21 bytes
                raise SquashfsError(
                    f"{self._path}: directory inode {c['ref']:#x} has {count} index entries"
                )
            index = self._parse_dir_index(cur, count, c["ref"])
        if offset >= META_SIZE:
            raise SquashfsError(f"{self._path}: directory inode {c['ref']:#x} has bad offset")
        return SqInode(
            nlink=nlink, size=size, dir_block=start, dir_offset=offset, parent=parent,
            dir_index=index, xattr=_xattr(xattr), **c,
        )

    def _parse_dir_index(self, cur: Cursor, count: int, ref: int) -> tuple[DirIndex, ...]:
        entries = []
        for _ in range(count):
            index, start, name_size = _DIR_INDEX.unpack(cur.read(12))
            if name_size + 1 > _MAX_NAME:
                raise SquashfsError(f"{self._path}: directory inode {ref:#x} has a bad index")
            entries.append(DirIndex(index, start, cur.read(name_size + 1)))
        return tuple(entries)

    def _parse_file(self, cur: Cursor, f: tuple[int, ...], c: _Common) -> SqInode:
        if len(f) == 4:
            start, fragment, frag_offset, size = f
            nlink, xattr = 1, _NO_XATTR
        else:
            start, size, _sparse, nlink, fragment, frag_offset, xattr = f
        bs = self._sb.block_size
        has_fragment = fragment != _NO_FRAGMENT
        count = format.block_count(size, bs, has_fragment)
        if size >> 62 or start > self._sb.bytes_used:
            raise SquashfsError(f"{self._path}: file inode {c['ref']:#x} has bad size or start")
        if has_fragment:
            if fragment >= self._sb.fragment_count:
                raise SquashfsError(
                    f"{self._path}: file inode {c['ref']:#x} has bad fragment {fragment}"
                )
            if frag_offset + size % bs > bs:
                raise SquashfsError(
                    f"{self._path}: file inode {c['ref']:#x} has a bad fragment offset"
                )
        return SqInode(
            nlink=nlink, size=size, xattr=_xattr(xattr), blocks_start=start, block_count=count,
            block_list_ref=self._ref_here(cur), fragment=fragment if has_fragment else None,
            fragment_offset=frag_offset, **c,
        )

    def _parse_symlink(self, cur: Cursor, f: tuple[int, ...], c: _Common) -> SqInode:
        nlink, size = f
        if size > _MAX_SYMLINK:
            raise SquashfsError(f"{self._path}: symlink inode {c['ref']:#x} has absurd size")
        target_ref = self._ref_here(cur)
        xattr = _NO_XATTR
        if c["extended"]:
            cur.skip(size)
            (xattr,) = _U32.unpack(cur.read(4))
        return SqInode(nlink=nlink, size=size, xattr=_xattr(xattr), target_ref=target_ref, **c)

    def _parse_device(self, cur: Cursor, f: tuple[int, ...], c: _Common) -> SqInode:
        nlink, rdev = f[0], f[1]
        xattr = f[2] if len(f) == 3 else _NO_XATTR
        return SqInode(nlink=nlink, size=0, rdev=format.decode_rdev(rdev), xattr=_xattr(xattr), **c)

    def _parse_ipc(self, cur: Cursor, f: tuple[int, ...], c: _Common) -> SqInode:
        xattr = f[1] if len(f) == 2 else _NO_XATTR
        return SqInode(nlink=f[0], size=0, xattr=_xattr(xattr), **c)


_Parser = Callable[[InodeTable, Cursor, tuple[int, ...], _Common], SqInode]
_PARSERS: dict[int, _Parser] = {
    1: InodeTable._parse_dir,
    8: InodeTable._parse_dir,
    2: InodeTable._parse_file,
    9: InodeTable._parse_file,
    3: InodeTable._parse_symlink,
    10: InodeTable._parse_symlink,
    4: InodeTable._parse_device,
    5: InodeTable._parse_device,
    11: InodeTable._parse_device,
    12: InodeTable._parse_device,
    6: InodeTable._parse_ipc,
    7: InodeTable._parse_ipc,
    13: InodeTable._parse_ipc,
    14: InodeTable._parse_ipc,
}


def _xattr(index: int) -> int | None:
    return None if index == _NO_XATTR else index
