"""Reading a squashfs image's extended attributes (libsquashfs's ``xattr_reader``).

This module owns the xattr tables as the reader sees them: an inode's xattr index is looked
up in the xattr id table, and its key/value list is read from the key/value table, names
rebuilt from their prefix ids, out-of-line values followed, and every count, name length and
value size checked against Linux's own limits before it is used.
"""

from __future__ import annotations

from squashstore.squashfs import format
from squashstore.squashfs.inodes import SqInode
from squashstore.squashfs.meta import Cursor, MetaReader, Region, SquashfsError, Tables

_MAX_XATTR_NAME = 255
_MAX_XATTR_VALUE = 1 << 16
"""Linux's XATTR_SIZE_MAX: no larger value can have come from a real file."""
_MAX_XATTR_COUNT = 1 << 16
_XATTR_OOL = format.XATTR_VALUE_OOL
_XATTR_PREFIXES = {int(k): v.encode() for k, v in format.XATTR_PREFIXES.items()}
_XATTR_ID = format.XattrIdEntry.STRUCT
_XATTR_KEY = format.XattrKey.STRUCT
_U32 = format.XattrValue.STRUCT
_U64 = format.EXPORT_ENTRY


class XattrReader:
    """The extended attributes of one image's inodes."""

    def __init__(self, meta: MetaReader, tables: Tables) -> None:
        self._meta = meta
        self._tables = tables
        self._path = meta.image.path

    def xattrs(self, inode: SqInode) -> dict[bytes, bytes]:
        """An inode's extended attributes by full name (``b"user.x"``)."""
        if inode.xattr is None:
            return {}
        region = self._tables.xattrs
        if inode.xattr >= self._tables.xattr_ids or region is None:
            raise SquashfsError(f"{self._path}: inode {inode.number} has bad xattr index")
        ref, count, _size = self._tables.entry(
            "xattr id table", self._tables.xattr_blocks, inode.xattr, _XATTR_ID
        )
        if count > _MAX_XATTR_COUNT:
            raise SquashfsError(f"{self._path}: inode {inode.number} has {count} xattrs")
        cur = self._meta.cursor(region, ref)
        result: dict[bytes, bytes] = {}
        for _ in range(count):
            kind, name_size = _XATTR_KEY.unpack(cur.read(4))
            prefix = _XATTR_PREFIXES.get(kind & ~_XATTR_OOL)
            if prefix is None or name_size > _MAX_XATTR_NAME:
                raise SquashfsError(f"{self._path}: inode {inode.number} has a bad xattr key")
            name = prefix + cur.read(name_size)
            result[name] = self._value(cur, region, bool(kind & _XATTR_OOL), inode)
        return result

    def _value(self, cur: Cursor, region: Region, out_of_line: bool, inode: SqInode) -> bytes:
        (size,) = _U32.unpack(cur.read(4))
        if out_of_line:
            if size != 8:
                raise SquashfsError(f"{self._path}: inode {inode.number} has a bad xattr ref")
            (ref,) = _U64.unpack(cur.read(8))
            cur = self._meta.cursor(region, ref)
            (size,) = _U32.unpack(cur.read(4))
        if size > _MAX_XATTR_VALUE:
            raise SquashfsError(f"{self._path}: inode {inode.number} has an absurd xattr value")
        return cur.read(size)
