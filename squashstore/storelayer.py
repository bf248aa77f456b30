"""A squash store's layer read as a layer tar: its tar-split with the squash file's content.

A squash store (this project's, listed in storage.conf like any additional store) keeps a
layer as ``squashstore/squash/<LID>.sqfs`` plus the tar-split of the layer's canonical tar;
its ``overlay/<LID>/diff`` holds the files only while mounted. A source reader that meets such
a layer (``migrate`` of a name podman resolves to a store's copy, or re-squashing with other
options) reads the squash file itself through this module, never the mount point: the
tar-split's segments are copied and each file's content is read from the squash file (by
path, never following a symlink) and checked against the CRC-64 tar-split recorded, so the
stream is the layer's tar byte for byte. `layer_digest` also holds the squash file's whole
tree to that tar (every entry, its type, mode, owner, size, link target, device and extended
attributes, hard links), so a squash file with anything more or other than the layer
(an extra file, a setuid bit, a symlink aimed elsewhere) never passes for it.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

from squashstore import tree
from squashstore.image import SourceError, SquashstoreError
from squashstore.squashfs.reader import SquashReader
from squashstore.tar import format as f
from squashstore.tar.reader import Header, TarError, TarReader
from squashstore.tar.split import CHUNK, crc_checked, rebuild_tar

KINDS = {f.TYPE_REG: tree.Kind.FILE, f.TYPE_CONT: tree.Kind.FILE, f.TYPE_DIR: tree.Kind.DIR,
         f.TYPE_SYMLINK: tree.Kind.SYMLINK, f.TYPE_CHAR: tree.Kind.CHARDEV,
         f.TYPE_BLOCK: tree.Kind.BLOCKDEV, f.TYPE_FIFO: tree.Kind.FIFO}
"""A layer tar's entry types as the squash file's inode kinds (hard links apart)."""


def _content(reader: SquashReader, name: bytes, size: int, crc: bytes | None,
             where: str) -> Iterator[bytes]:
    """`size` bytes of the file `name` (relative, checked by `rebuild_tar`) in `reader`."""
    inode = reader.root
    for part in name.split(b"/"):
        found = reader.lookup(inode, part) if inode.kind is tree.Kind.DIR else None
        if found is None:
            raise SourceError(f"{where}: {name.decode(errors='replace')} is not in "
                              f"{reader.path}")
        inode = found
    if inode.kind is not tree.Kind.FILE or inode.size < size:
        raise SourceError(f"{where}: {name.decode(errors='replace')} in {reader.path} is "
                          f"not the {size}-byte file the layer recorded")
    found = inode

    def chunks() -> Iterator[bytes]:
        offset = 0
        while offset < size:
            data = reader.read(found, offset, min(CHUNK, size - offset))
            if not data:
                raise SourceError(f"{where}: {reader.path}: short read")
            offset += len(data)
            yield data

    return crc_checked(chunks(), crc, f"{where}: file integrity checksum failed for "
                                      f"{name.decode(errors='replace')} in {reader.path}")


def tar_from_squash(tar_split: Path, squash: Path, where: str) -> Iterator[bytes]:
    """The layer tar rebuilt from `tar_split` and the squash file `squash`."""
    try:
        with SquashReader(squash) as reader:

            def content_of(name: bytes, size: int, crc: bytes | None) -> Iterator[bytes]:
                return _content(reader, name, size, crc, where)

            yield from rebuild_tar(tar_split, content_of, where)
    except SourceError:
        raise
    except (OSError, EOFError, SquashstoreError) as exc:
        raise SourceError(f"{where}: cannot read {squash}: {exc}") from exc


class _Hashed(io.RawIOBase):
    """`chunks` as a stream, hashed and counted as they are read."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks, self._pending = chunks, b""
        self.digest, self.size = hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self.digest.update(chunk)
            self.size += len(chunk)
            self._pending = chunk
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def layer_digest(tar_split: Path, squash: Path, where: str) -> tuple[str, int]:
    """``("sha256:...", size)`` of the layer tar rebuilt from `tar_split` and `squash`:
    what a layer's diff id and size must be when the two hold the layer they claim; a
    `SourceError` when the squash file's tree holds anything else (`tree_problem`)."""
    stream = _Hashed(tar_from_squash(tar_split, squash, where))
    buffered = io.BufferedReader(stream, CHUNK)
    headers = []
    try:
        reader = TarReader(buffered)
        while (header := reader.next()) is not None:
            headers.append(header)
    except TarError as exc:
        raise SourceError(f"{where}: the layer rebuilt from its tar-split is no tar: "
                          f"{exc}") from exc
    while buffered.read(CHUNK):
        pass
    try:
        with SquashReader(squash) as squash_reader:
            problem = tree_problem(headers, squash_reader.to_tree())
    except (OSError, EOFError, SquashstoreError) as exc:
        raise SourceError(f"{where}: cannot read {squash}: {exc}") from exc
    if problem:
        raise SourceError(f"{where}: does not hold the layer it claims: {problem}")
    return "sha256:" + stream.digest.hexdigest(), stream.size


def _path(name: str) -> str:
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def _paths(root: tree.Inode) -> dict[str, tree.Inode]:
    """Every entry of a tree by its path (the root: "")."""
    out = {"": root}
    stack = [("", root)]
    while stack:
        prefix, node = stack.pop()
        for name, child in (node.children or {}).items():
            path = f"{prefix}/{name}" if prefix else name
            out[path] = child
            if child.children is not None:
                stack.append((path, child))
    return out


def tree_problem(headers: list[Header], root: tree.Inode) -> str:
    """Why the squash file's tree (`root`) is not the layer tar's entries (`headers`): an
    entry of one the other lacks, or one whose type, mode, owner, size, symlink target,
    device numbers, extended attributes or hard link differ; "" when it is the same tree
    (modification times apart)."""
    nodes = _paths(root)
    seen = {""}
    for header in headers:
        path = _path(header.name)
        node = nodes.get(path)
        shown = tree.name_bytes(path).decode(errors="replace")
        if node is None:
            return f"{shown} is not in the squash file"
        seen.add(path)
        if header.typeflag == f.TYPE_LINK:
            if nodes.get(_path(header.linkname)) is not node:
                return f"{shown} is not the hard link the layer has"
            continue
        kind = KINDS.get(header.typeflag)
        if kind is None:
            continue  # a global header and the like: no entry of the tree
        if node.kind is not kind or (node.mode & 0o7777, node.uid, node.gid) != \
                (header.mode & 0o7777, header.uid, header.gid) or \
                (kind is tree.Kind.FILE and node.size != header.size) or \
                (kind is tree.Kind.SYMLINK and node.target != header.linkname) or \
                (kind in (tree.Kind.CHARDEV, tree.Kind.BLOCKDEV) and
                 node.rdev != (header.devmajor, header.devminor)) or \
                node.xattrs != header.xattrs:
            return f"{shown} differs from the layer's entry (type, mode, owner, size, " \
                "target, device or xattrs)"
    extra = sorted(set(nodes) - seen)
    if extra:
        shown = tree.name_bytes(extra[0]).decode(errors="replace")
        return f"{shown} is in the squash file but not in the layer"
    return ""
