"""Writing the inode table (libsquashfs's ``serialize_fstree`` and ``write_inode``).

This module owns how a tree becomes inodes: `scan` walks it children-first without
recursion (the order mksquashfs writes inodes in, root last), numbers the inodes, counts
hard links and sorts each directory's names; `InodeWriter` writes each inode in its basic
or extended form by mksquashfs's rules (extended for hard links, xattrs, sparse files,
positions beyond 4 GiB, indexed or large directories), asking the id table for owners, the
xattr writer for xattr ids and the directory writer for listings, and keeps every inode's
reference for listings and the export table.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from squashstore.squashfs import format as fmt
from squashstore.squashfs.compress import Codec
from squashstore.squashfs.datawriter import file_data
from squashstore.squashfs.dirwriter import DirWriter
from squashstore.squashfs.idtable import IdTable
from squashstore.squashfs.metawriter import MetadataWriter, WriterError, clamp32
from squashstore.squashfs.xattrwriter import XattrWriter
from squashstore.tree import Inode, Kind, name_bytes

_INODE_HEADER = fmt.InodeHeader.STRUCT
_BASIC_FILE = struct.Struct("<" + _INODE_HEADER.format[1:] + fmt.FileInode.STRUCT.format[1:])
"""A basic file inode's header and body in one pack (the commonest inode)."""


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
class TreeInfo:
    """What the pre-pass learns: write order, inode numbers, name counts, parents."""

    order: list[Inode]
    number: dict[int, int]
    links: dict[int, int]
    parent: dict[int, int]
    listing: dict[int, list[tuple[bytes, Inode]]]


def scan(root: Inode) -> TreeInfo:
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
    return TreeInfo(order, number, links, parent, listing)


class InodeWriter:
    """The inode table of one image, with the id, xattr and directory tables it feeds."""

    def __init__(self, codec: Codec, compress: bool, xattrs: bool) -> None:
        self.inodes = MetadataWriter(codec, compress)
        self.dirs = DirWriter(codec, compress)
        self.ids = IdTable()
        self.xattrs = XattrWriter(codec, compress, xattrs)
        self.refs: dict[int, int] = {}
        self.file_totals = (0, 0)
        self._refs_in_order = array("Q")

    def write_inodes(self, info: TreeInfo) -> int:
        """Writes every inode and listing; returns the root's reference."""
        files = 0
        bytes_in = 0
        root_number = len(info.order)
        refs, links, numbers, parents = self.refs, info.links, info.number, info.parent
        in_order = self._refs_in_order
        # Inode numbers are the write order (`scan` numbers them so), from 1.
        for number, node in enumerate(info.order, 1):
            key = id(node)
            kind = node.kind
            if kind is Kind.DIR:
                parent = parents.get(key)
                parent_number = root_number + 1 if parent is None else numbers[parent]
                ref = self._write_dir(node, number, parent_number, info)
            else:
                ref = self._write_other(node, number, links[key])
                if kind is Kind.FILE:
                    files += 1
                    bytes_in += file_data(node).size
            refs[key] = ref
            in_order.append(ref)
        self.file_totals = (files, bytes_in)
        return self.refs[id(info.order[-1])]

    def export_table(self) -> bytes:
        """The export table's entries: each inode's reference, by inode number."""
        if sys.byteorder == "little":
            return self._refs_in_order.tobytes()
        swapped = array("Q", self._refs_in_order)
        swapped.byteswap()
        return swapped.tobytes()

    def _header(self, node: Inode, inode_type: fmt.InodeType, number: int) -> bytes:
        # Packed straight from the fields: this runs once per inode (~20 % of finish).
        index = self.ids.index
        mtime = node.mtime
        return _INODE_HEADER.pack(
            inode_type,
            node.mode & 0o7777,
            index(node.uid),
            index(node.gid),
            mtime if 0 <= mtime <= 0xFFFF_FFFF else clamp32(mtime),
            number,
        )

    def _write_other(self, node: Inode, number: int, nlink: int) -> int:
        xattr = self.xattrs.index(node)
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
        data = file_data(node)
        blocks = _little_endian(data.blocks)
        basic = (
            nlink == 1
            and xattr == fmt.INVALID_XATTR
            and data.sparse == 0
            and data.size <= fmt.BASIC_FILE_MAX
            and data.start <= fmt.BASIC_FILE_MAX
        )
        if basic:
            index = self.ids.index
            mtime = node.mtime
            return _BASIC_FILE.pack(
                fmt.InodeType.FILE,
                node.mode & 0o7777,
                index(node.uid),
                index(node.gid),
                mtime if 0 <= mtime <= 0xFFFF_FFFF else clamp32(mtime),
                number,
                data.start,
                data.fragment,
                data.offset,
                data.size,
            ) + blocks
        else:
            header = self._header(node, fmt.InodeType.LFILE, number)
            sparse = min(data.sparse, data.size - 1) if data.sparse else 0
            body = fmt.LFileInode(
                data.start, data.size, sparse, nlink, data.fragment, data.offset, xattr
            ).pack()
        return header + body + blocks

    def _write_dir(self, node: Inode, number: int, parent_number: int, info: TreeInfo) -> int:
        entries = info.listing[id(node)]
        listing = self.dirs.add(entries, self.refs, info.number)
        xattr = self.xattrs.index(node)
        nlink = 2 + sum(1 for _raw, child in entries if child.kind is Kind.DIR)
        ref = self.inodes.tell_ref()
        if (
            not listing.index_count
            and listing.file_size <= fmt.BASIC_DIR_MAX_SIZE
            and xattr == fmt.INVALID_XATTR
        ):
            header = self._header(node, fmt.InodeType.DIR, number)
            body = fmt.DirInode(
                listing.block, nlink, listing.file_size, listing.offset, parent_number
            ).pack()
            self.inodes.write(header + body)
            return ref
        header = self._header(node, fmt.InodeType.LDIR, number)
        body = fmt.LDirInode(
            nlink,
            listing.file_size,
            listing.block,
            parent_number,
            listing.index_count,
            listing.offset,
            xattr,
        ).pack()
        self.inodes.write(header + body + listing.index)
        return ref


def _little_endian(words: array[int]) -> bytes:
    """The on-disk (little-endian) bytes of an array of u32."""
    if sys.byteorder == "little":
        return words.tobytes()
    swapped = array("I", words)
    swapped.byteswap()
    return swapped.tobytes()
