"""Random-access reading of squashfs 4.0 images: the `SquashReader` façade.

`SquashReader` is what the FUSE server, the CLI and the tests open: one object answering
every question about an image, safe to share between threads. It owns nothing of the
format itself; it assembles the layers the way libsquashfs does and delegates to them:
`meta` (the file, the superblock, metadata blocks and lookup tables), `inodes` (decoding
inodes, symlink targets), `dirs` (listings, lookups through the directory index, paths,
inode numbers, the checked walk), `data` (block lists, data blocks, fragments) and
`xattrs`. Its own work is the whole-image view: rebuilding the image as a
`squashstore.tree`. Every offset, count and size read from the image is checked before it
is used, so a corrupt or hostile image yields a `SquashfsError` naming the inode or block,
never a hang or an unbounded allocation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from squashstore import tree
from squashstore.image import SquashstoreError
from squashstore.squashfs import format
from squashstore.squashfs.data import DataReader
from squashstore.squashfs.dirs import DirEntry, DirReader
from squashstore.squashfs.inodes import DirIndex, InodeTable, SqInode
from squashstore.squashfs.meta import ByteSource, ImageFile, MetaReader, SquashfsError, Tables
from squashstore.squashfs.xattrs import XattrReader

__all__ = ["ByteSource", "DirEntry", "DirIndex", "SqInode", "SquashReader", "SquashfsError",
           "verify_file"]


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
        self.remote = source is not None
        """Whether reads go to a `source` (which may wait on a network) instead of a file."""
        self._image = ImageFile(self.path, source)
        try:
            self.superblock: format.Superblock = self._image.superblock
            self.block_size: int = self._image.block_size
            self.compression: str = self._image.compression
            meta = MetaReader(self._image, metadata_cache_blocks)
            tables = Tables(meta)
            self._inodes = InodeTable(meta, tables, max(1024, metadata_cache_blocks * 16))
            self._data = DataReader(meta, tables, data_cache_blocks)
            self._xattrs = XattrReader(meta, tables)
            self.root = self._inodes.get(self.superblock.root_inode)
            if self.root.kind is not tree.Kind.DIR:
                raise SquashfsError(f"{self.path}: root inode is not a directory")
            self._dirs = DirReader(
                meta, tables, self._inodes, self.root, max(64, metadata_cache_blocks // 4)
            )
        except BaseException:
            self._image.close()
            raise

    # -- context manager and lifetime --------------------------------------------------

    def __enter__(self) -> SquashReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file descriptor; the reader cannot be used afterwards."""
        self._image.close()

    # -- inodes ------------------------------------------------------------------------

    def inode(self, ref: int) -> SqInode:
        """The inode at inode reference `ref` (block << 16 | offset)."""
        return self._inodes.get(ref)

    def inode_by_number(self, number: int) -> SqInode:
        """The inode numbered `number` (1-based), via the export table when there is one."""
        return self._dirs.inode_by_number(number)

    # -- directories -------------------------------------------------------------------

    def readdir(self, directory: SqInode, offset: int = 0) -> Iterator[DirEntry]:
        """The entries of `directory` in name order, resuming after `offset` (a next_offset).

        Offsets are listing positions: the first entry's `next_offset` is at least 21.
        """
        return self._dirs.readdir(directory, offset)

    def lookup(self, directory: SqInode, name: bytes) -> SqInode | None:
        """The inode named `name` in `directory`, or None (a binary search, see `dirs`)."""
        return self._dirs.lookup(directory, name)

    def resolve(self, path: str | bytes) -> SqInode:
        """The inode at `path` (absolute or relative to the root); symlinks are not followed."""
        return self._dirs.resolve(path)

    # -- content -----------------------------------------------------------------------

    def readlink(self, inode: SqInode) -> bytes:
        """A symlink's target."""
        return self._inodes.readlink(inode)

    def read(self, inode: SqInode, offset: int, size: int) -> bytes:
        """Up to `size` bytes of a regular file's content from `offset`."""
        return self._data.read(inode, offset, size)

    def block_layout(self, inode: SqInode, index: int) -> tuple[int, int]:
        """The (image position, size word) of data block `index` of a regular file."""
        return self._data.block_layout(inode, index)

    def xattrs(self, inode: SqInode) -> dict[bytes, bytes]:
        """An inode's extended attributes by full name (``b"user.x"``)."""
        return self._xattrs.xattrs(inode)

    # -- whole-image views -------------------------------------------------------------

    def to_tree(self) -> tree.Inode:
        """The whole image as a `squashstore.tree` (hard links share one `tree.Inode`)."""
        root = self._tree_node(self.root)
        made: dict[int, tree.Inode] = {self.root.ref: root}
        for directory, name, inode in self._dirs.walk():
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


def verify_file(path: Path, source: ByteSource | None = None) -> list[str]:
    """Problems reading a squash file whole (empty when every directory, symlink and file
    byte reads): what ``squashstore verify`` reports for each image. With a `source` (a
    lazily pulled image not complete yet) only its metadata is read, not the file bytes."""
    try:
        with SquashReader(path, source=source) as reader:
            stack = [reader.root]
            while stack:
                directory = stack.pop()
                for entry in reader.readdir(directory):
                    child = reader.lookup(directory, entry.name)
                    if child is None:
                        return [f"{path}: {entry.name!r} listed but not found"]
                    if child.kind is tree.Kind.DIR:
                        stack.append(child)
                    elif child.kind is tree.Kind.SYMLINK:
                        reader.readlink(child)
                    elif child.kind is tree.Kind.FILE and source is None:
                        offset = 0
                        while offset < child.size:
                            offset += len(reader.read(child, offset, 1 << 20)) or child.size
    except (SquashstoreError, OSError) as exc:
        return [f"{path}: {exc}"]
    return []
