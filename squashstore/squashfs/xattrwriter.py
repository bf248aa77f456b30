"""Writing extended attributes (libsquashfs's ``xattr_writer``): the xattr key/value
table and the xattr id table.

This module owns how an inode's xattrs are stored: each distinct set once (inodes with
the same set share its id), names split into a prefix kind and the rest, and values out of
line by mksquashfs's rule (values over 128 bytes, a lower limit down to 8 while a set would
exceed 64 KiB, and values of 8 bytes or more already stored elsewhere, since a reference is
then smaller). `XattrWriter.index` gives an inode its xattr id; `write` appends both tables.
"""

from __future__ import annotations

from typing import BinaryIO

from squashstore.squashfs import format as fmt
from squashstore.squashfs.compress import Codec
from squashstore.squashfs.metawriter import MetadataWriter, write_lookup_table
from squashstore.tree import Inode, name_bytes

XATTR_OOL_SIZE = 8
"""Size of an out-of-line value reference; shorter values are never shared."""
XATTR_INLINE_MAX = 128
XATTR_TARGET_MAX = 65536


class XattrWriter:
    """The xattr sets of one image (none at all when `enabled` is false)."""

    def __init__(self, codec: Codec, compress: bool, enabled: bool) -> None:
        self._codec = codec
        self._compress = compress
        self._enabled = enabled
        self.kv = MetadataWriter(codec, compress)
        self.ids: dict[tuple[tuple[str, bytes], ...], int] = {}
        self.entries: list[fmt.XattrIdEntry] = []
        self.values: dict[bytes, int] = {}
        """Reference of the stored value record of each value of 8 bytes or more."""

    def index(self, node: Inode) -> int:
        """The xattr id of `node`'s xattrs (stored if new), or `INVALID_XATTR`."""
        if not self._enabled or not node.xattrs:
            return fmt.INVALID_XATTR
        # In the tree's order, as mksquashfs 4.5 keeps the source's listxattr order.
        items = tuple(
            (name, bytes(value))
            for name, value in node.xattrs.items()
            if fmt.split_xattr_name(name) is not None
        )
        if not items:
            return fmt.INVALID_XATTR
        known = self.ids.get(items)
        if known is not None:
            return known
        ool = self._out_of_line(items)
        for value, is_ool in zip((value for _n, value in items), ool, strict=True):
            if is_ool and value not in self.values:
                self.values[value] = self.kv.tell_ref()
                self.kv.write(fmt.XattrValue(len(value)).pack() + value)
        ref = self.kv.tell_ref()
        size = 0
        for (name, value), is_ool in zip(items, ool, strict=True):
            split = fmt.split_xattr_name(name)
            assert split is not None
            kind, rest = split
            flag = fmt.XATTR_VALUE_OOL if is_ool else 0
            self.kv.write(fmt.XattrKey(kind | flag, len(rest)).pack() + rest)
            if is_ool:
                target = fmt.TABLE_POINTER.pack(self.values[value])
                self.kv.write(fmt.XattrValue(len(target)).pack() + target)
            else:
                if len(value) >= XATTR_OOL_SIZE:
                    self.values.setdefault(value, self.kv.tell_ref())
                self.kv.write(fmt.XattrValue(len(value)).pack() + value)
            size += len(name_bytes(name)) + 1 + len(value)
        index = self.ids[items] = len(self.entries)
        self.entries.append(fmt.XattrIdEntry(ref, len(items), size))
        return index

    def write(self, out: BinaryIO, position: int) -> tuple[int, int]:
        """Appends the key/value and xattr id tables at `position`; returns (the xattr id
        table's position or `INVALID_BLK` when no inode has xattrs, position after)."""
        if not self.entries:
            return fmt.INVALID_BLK, position
        kv_start = position
        blob = self.kv.finish()
        out.write(blob)
        position += len(blob)
        id_entries = b"".join(entry.pack() for entry in self.entries)
        header = fmt.XattrTableHeader(kv_start, len(self.entries)).pack()
        return write_lookup_table(out, position, id_entries, self._codec, self._compress, header)

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
            out or (len(value) >= XATTR_OOL_SIZE and value in self.values)
            for (_name, value), out in zip(items, ool, strict=True)
        ]
