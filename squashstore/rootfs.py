"""Reading a plain root-filesystem directory into a `squashstore.tree` tree.

`tree_from_directory` walks a directory without ever following a symlink, records each
entry's type, permission bits, owner, mtime, symlink target, device numbers and extended
attributes, makes hard links (same ``st_dev``/``st_ino``) one shared `Inode`, and feeds
each regular file's content, once, in name-byte order, to a sink such as
`SquashWriter.add_file`, keeping the handle it returns. This is the ``rootfs:DIR`` source of
``squashstore squash``; nothing here writes.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from squashstore.image import LayerError, SourceError
from squashstore.tree import Inode, Kind, count_links, name_str

FileSink = Callable[..., object]
"""Receives a regular file's content stream and size; returns the handle for `Inode.data`."""


def tree_from_directory(path: Path, add_file: FileSink, *, keep_holes: bool = False) -> Inode:
    """The tree of directory `path`, its files' content fed to `add_file`.

    With `keep_holes`, a file that is sparse on disk is fed as ``add_file(stream, size,
    sparse=True)`` (`SquashWriter.add_file` then reports its zero blocks as sparse, as
    mksquashfs does); the sink must accept that keyword.
    """
    top = os.fsencode(path)
    try:
        st = os.lstat(top)
    except OSError as exc:
        raise SourceError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(f"{path}: not a directory")
    root = _inode(top, st, add_file, keep_holes)
    links: dict[tuple[int, int], Inode] = {}
    stack: list[tuple[bytes, Inode]] = [(top, root)]
    while stack:
        dir_path, dir_inode = stack.pop()
        assert dir_inode.children is not None
        for raw in _names(dir_path):
            child_path = os.path.join(dir_path, raw)
            try:
                child_st = os.lstat(child_path)
            except OSError as exc:
                raise SourceError(f"{os.fsdecode(child_path)}: {exc.strerror}") from None
            key = (child_st.st_dev, child_st.st_ino)
            if not stat.S_ISDIR(child_st.st_mode) and child_st.st_nlink > 1 and key in links:
                child = links[key]
            else:
                child = _inode(child_path, child_st, add_file, keep_holes)
                if child.children is None and child_st.st_nlink > 1:
                    links[key] = child
            dir_inode.children[name_str(raw)] = child
            if child.children is not None:
                stack.append((child_path, child))
    count_links(root)
    return root


def _names(dir_path: bytes) -> list[bytes]:
    try:
        names = os.listdir(dir_path)
    except OSError as exc:
        raise SourceError(f"{os.fsdecode(dir_path)}: {exc.strerror}") from None
    return sorted(names)


def _inode(path: bytes, st: os.stat_result, add_file: FileSink, keep_holes: bool) -> Inode:
    kind = Kind.from_mode(st.st_mode)
    node = Inode(
        kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime=st.st_mtime_ns // 1_000_000_000,
        xattrs=_xattrs(path),
    )
    if kind is Kind.DIR:
        node.children = {}
    elif kind is Kind.FILE:
        node.size = st.st_size
        holes = keep_holes and st.st_blocks * 512 < st.st_size
        node.data = _content(path, st.st_size, add_file, holes)
    elif kind is Kind.SYMLINK:
        node.target = name_str(os.readlink(path))
    elif kind in (Kind.BLOCKDEV, Kind.CHARDEV):
        node.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return node


def _content(path: bytes, size: int, add_file: FileSink, holes: bool) -> object:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"{os.fsdecode(path)}: {exc.strerror}") from None
    with os.fdopen(fd, "rb", buffering=0) as stream:
        try:
            if holes:
                return add_file(stream, size, sparse=True)
            return add_file(stream, size)
        except LayerError as exc:  # the file shrank while it was read
            raise SourceError(f"{os.fsdecode(path)}: {exc}") from None


def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise SourceError(f"{os.fsdecode(path)}: {exc.strerror}") from None
    values: dict[str, bytes] = {}
    for name in names:  # listxattr order, as mksquashfs keeps it
        try:
            values[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue
            raise SourceError(f"{os.fsdecode(path)}: xattr {name}: {exc.strerror}") from None
    return values
