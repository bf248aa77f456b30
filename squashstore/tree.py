"""The flattened filesystem tree: the plain data types every part of squashstore shares.

An `Inode` is one file-system object (directory, regular file, symlink, device, fifo,
socket) with its metadata; a directory's `children` map names to inodes, and a hard link is
simply the same `Inode` object reachable under two names. File *content* is never held
here: a regular file carries only `data`, an opaque handle that the sink which received the
bytes (the squashfs writer, a tar writer) gave back. The layer merge builds this tree, the
squashfs writer serialises it, the reader rebuilds it; names are `str` decoded from bytes
with UTF-8 and ``surrogateescape`` so that any byte string survives the round trip
(`name_bytes`).
"""

from __future__ import annotations

import enum
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field


class Kind(enum.IntEnum):
    """An inode's type; the values are squashfs's basic inode type numbers."""

    DIR = 1
    FILE = 2
    SYMLINK = 3
    BLOCKDEV = 4
    CHARDEV = 5
    FIFO = 6
    SOCKET = 7

    @property
    def ifmt(self) -> int:
        """The `stat.S_IF*` bits of this type."""
        return _IFMT[self]

    @classmethod
    def from_mode(cls, mode: int) -> Kind:
        """The kind named by the `S_IFMT` bits of a full `st_mode`."""
        try:
            return _FROM_IFMT[stat.S_IFMT(mode)]
        except KeyError:
            raise ValueError(f"unknown file type in mode {mode:#o}") from None


_IFMT = {
    Kind.DIR: stat.S_IFDIR,
    Kind.FILE: stat.S_IFREG,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.BLOCKDEV: stat.S_IFBLK,
    Kind.CHARDEV: stat.S_IFCHR,
    Kind.FIFO: stat.S_IFIFO,
    Kind.SOCKET: stat.S_IFSOCK,
}
_FROM_IFMT = {v: k for k, v in _IFMT.items()}


@dataclass(eq=False, slots=True)
class Inode:
    """One file-system object. Identity (``is``) is what makes two names hard links."""

    kind: Kind
    mode: int = 0o755
    """Permission bits only (``0o7777``: setuid, setgid, sticky and rwx)."""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    size: int = 0
    """Byte length of a regular file's content (0 for every other kind)."""
    target: str = ""
    """A symlink's target."""
    rdev: tuple[int, int] = (0, 0)
    """A device's (major, minor)."""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    """Extended attributes by full name (``user.x``, ``security.capability``)."""
    data: object = None
    """For a regular file: the handle its content sink returned."""
    children: dict[str, Inode] | None = None
    """For a directory: its entries by name (never ``.`` or ``..``)."""
    nlink: int = 1
    """Number of names of a non-directory; set by `count_links`."""

    @property
    def st_mode(self) -> int:
        """The full ``st_mode``: type bits and permission bits."""
        return self.kind.ifmt | (self.mode & 0o7777)

    def is_dir(self) -> bool:
        return self.kind is Kind.DIR


def new_dir(mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int = 0) -> Inode:
    """An empty directory inode."""
    return Inode(Kind.DIR, mode=mode, uid=uid, gid=gid, mtime=mtime, children={})


def name_bytes(name: str) -> bytes:
    """The on-disk bytes of a name or path held as a surrogate-escaped `str`."""
    return name.encode("utf-8", "surrogateescape")


def name_str(raw: bytes) -> str:
    """The `str` form of an on-disk name, reversible by `name_bytes`."""
    return raw.decode("utf-8", "surrogateescape")


def walk(root: Inode, prefix: str = "") -> Iterator[tuple[str, Inode]]:
    """Every (path, inode) below `root`, depth first, children in name-byte order.

    Paths are relative without a leading slash; the root itself is yielded as ``""``.
    A hard-linked inode is yielded once for each of its names.
    """
    yield prefix, root
    if root.children is None:
        return
    for name in sorted(root.children, key=name_bytes):
        child = root.children[name]
        path = f"{prefix}/{name}" if prefix else name
        if child.children is not None:
            yield from walk(child, path)
        else:
            yield path, child


def count_links(root: Inode) -> None:
    """Set `nlink` of every non-directory to the number of names it has in the tree."""
    seen: dict[int, Inode] = {}
    counts: dict[int, int] = {}
    for _path, inode in walk(root):
        if inode.children is None:
            seen[id(inode)] = inode
            counts[id(inode)] = counts.get(id(inode), 0) + 1
    for key, inode in seen.items():
        inode.nlink = counts[key]


def lookup(root: Inode, path: str) -> Inode | None:
    """The inode at a relative or absolute `path` (no symlinks followed), or None."""
    node = root
    for part in path.strip("/").split("/"):
        if not part or part == ".":
            continue
        if node.children is None or part not in node.children:
            return None
        node = node.children[part]
    return node
