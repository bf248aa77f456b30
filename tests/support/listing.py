"""The canonical listing of a file-system tree, the yardstick every comparison in the tests uses.

A listing maps a normalised absolute path (``"/"`` for the root, ``"/a/b"``) to an `Entry`:
type, permission bits, owner, size and SHA-256 of a regular file's content, integer mtime,
symlink target, device numbers, extended attributes (``system.*`` skipped: ACLs and the
like are not image content) and the hard-link group (the sorted tuple of every path in the
listing that shares the inode, for non-directories reachable under more than one name).
`canonical_from_tar` reads a tar (path or file object, any compression) with extraction
semantics: a later member with the same path wins, a hard-link member joins the inode that
its target path holds at that point (keeping that inode's metadata: note that
containers/storage instead applies the link member's own mode and owner to the shared
inode when it extracts a layer), and parent directories not in the tar are not invented.
`canonical_from_dir` reads a directory with ``lstat`` only (safe on read-only squashfs and
FUSE mounts). `diff_listings` explains differences in words. `normalise_podman_export`
removes what ``podman export`` of a never-started container adds to an image's root
filesystem (measured with podman 4.3.1 here: nothing at all; see its docstring).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote

CHUNK = 1 << 20

DIR = "dir"
FILE = "file"
SYMLINK = "symlink"
CHARDEV = "chardev"
BLOCKDEV = "blockdev"
FIFO = "fifo"
SOCKET = "socket"


@dataclass(frozen=True)
class Entry:
    """One path's canonical metadata. Fields that do not apply to the type keep defaults."""

    type: str
    mode: int
    """Permission bits only (``0o7777``)."""
    uid: int = 0
    gid: int = 0
    size: int = 0
    """Content length (regular files only)."""
    mtime: int = 0
    """Modification time in whole seconds (floored)."""
    sha256: str = ""
    """Hex SHA-256 of the content (regular files only)."""
    target: str = ""
    """A symlink's target."""
    rdev: tuple[int, int] = (0, 0)
    """A device's (major, minor)."""
    xattrs: Mapping[str, bytes] = field(default_factory=dict, hash=False)
    """Extended attributes by full name, ``system.*`` excluded."""
    hardlinks: tuple[str, ...] = ()
    """Sorted paths sharing this inode, when more than one path in the listing does."""


Listing = dict[str, Entry]


def norm_path(name: str) -> str:
    """`name` from a tar member or a relative path as ``/a/b`` (``/`` for the root)."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"path with '..' in listing input: {name!r}")
    return "/" + "/".join(parts)


def _with_groups(listing: Listing, inode_of: Mapping[str, object]) -> Listing:
    """`listing` with `hardlinks` filled from the path -> inode-identity map `inode_of`."""
    groups: dict[object, list[str]] = {}
    for path, ident in inode_of.items():
        if path in listing and listing[path].type != DIR:
            groups.setdefault(ident, []).append(path)
    out = dict(listing)
    for paths in groups.values():
        if len(paths) > 1:
            group = tuple(sorted(paths))
            for path in paths:
                out[path] = replace(out[path], hardlinks=group)
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- tar


_TAR_TYPES = {
    tarfile.DIRTYPE: DIR,
    tarfile.REGTYPE: FILE,
    tarfile.AREGTYPE: FILE,
    tarfile.CONTTYPE: FILE,
    tarfile.GNUTYPE_SPARSE: FILE,
    tarfile.SYMTYPE: SYMLINK,
    tarfile.CHRTYPE: CHARDEV,
    tarfile.BLKTYPE: BLOCKDEV,
    tarfile.FIFOTYPE: FIFO,
}


def _tar_xattrs(info: tarfile.TarInfo) -> dict[str, bytes]:
    """The extended attributes of a member (SCHILY and LIBARCHIVE PAX records)."""
    xattrs: dict[str, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            xattrs[key.removeprefix("SCHILY.xattr.")] = value.encode("utf-8", "surrogateescape")
    for key, value in info.pax_headers.items():
        if key.startswith("LIBARCHIVE.xattr."):
            raw = key.removeprefix("LIBARCHIVE.xattr.")
            name = unquote(raw)
            xattrs.setdefault(name, base64.b64decode(value + "=" * (-len(value) % 4)))
    return {k: v for k, v in xattrs.items() if not k.startswith("system.")}


def _hash_stream(f: IO[bytes]) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while chunk := f.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _tar_entry(tf: tarfile.TarFile, info: tarfile.TarInfo) -> Entry:
    kind = _TAR_TYPES.get(info.type)
    if kind is None:
        raise ValueError(f"unsupported tar member type {info.type!r} for {info.name!r}")
    sha, size = "", 0
    if kind == FILE:
        f = tf.extractfile(info)
        assert f is not None
        with f:
            sha, size = _hash_stream(f)
    return Entry(
        type=kind,
        mode=info.mode & 0o7777,
        uid=info.uid,
        gid=info.gid,
        size=size,
        mtime=int(info.mtime // 1),
        sha256=sha,
        target=info.linkname if kind == SYMLINK else "",
        rdev=(info.devmajor, info.devminor) if kind in (CHARDEV, BLOCKDEV) else (0, 0),
        xattrs=_tar_xattrs(info),
    )


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _Prefixed(io.RawIOBase):
    """A readable stream: `head` bytes already read from `rest`, then the rest of `rest`."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(view))
        view[: len(data)] = data
        return len(data)


def _decompressed(f: IO[bytes]) -> IO[bytes]:
    """`f`, or its zstd decompression when it starts with the zstd magic (tarfile's own
    ``r|*`` handles gzip, bzip2 and xz)."""
    head = f.read(4)
    stream: IO[bytes] = io.BufferedReader(_Prefixed(head, f))
    if head == ZSTD_MAGIC:
        import zstandard

        reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(stream)
        return reader
    return stream


def canonical_from_tar(source: str | Path | IO[bytes]) -> Listing:
    """The canonical listing of a tar file (path or readable binary file object; plain,
    gzip, bzip2, xz or zstd), read as a stream with extraction semantics."""
    with contextlib.ExitStack() as stack:
        if isinstance(source, str | Path):
            source = stack.enter_context(open(source, "rb"))
        return _listing_of_tar_stream(_decompressed(source))


def _listing_of_tar_stream(stream: IO[bytes]) -> Listing:
    listing: Listing = {}
    inode_of: dict[str, int] = {}
    counter = 0
    with tarfile.open(fileobj=stream, mode="r|*") as tf:
        for info in tf:
            path = norm_path(info.name)
            if info.type == tarfile.LNKTYPE:
                target = norm_path(info.linkname)
                if target not in listing or listing[target].type == DIR:
                    raise ValueError(f"hard link {path} to missing or directory {target}")
                listing[path] = listing[target]
                inode_of[path] = inode_of[target]
                continue
            listing[path] = _tar_entry(tf, info)
            counter += 1
            inode_of[path] = counter
    return _with_groups(listing, inode_of)


# ----------------------------------------------------------------------------- directories


def _dir_xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in names:
        if name.startswith("system."):
            continue
        out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _hash_file(path: str) -> tuple[str, int]:
    with open(path, "rb") as f:
        return _hash_stream(f)


def _stat_type(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, DIR),
        (stat.S_ISREG, FILE),
        (stat.S_ISLNK, SYMLINK),
        (stat.S_ISCHR, CHARDEV),
        (stat.S_ISBLK, BLOCKDEV),
        (stat.S_ISFIFO, FIFO),
        (stat.S_ISSOCK, SOCKET),
    ):
        if test(mode):
            return kind
    raise ValueError(f"unknown file type {mode:#o}")


def dir_entry(path: str, st: os.stat_result) -> Entry:
    """The `Entry` for the object at `path` whose ``lstat`` is `st`."""
    kind = _stat_type(st.st_mode)
    sha, size = _hash_file(path) if kind == FILE else ("", 0)
    if kind == FILE and size != st.st_size:
        raise ValueError(f"{path}: read {size} bytes but st_size is {st.st_size}")
    return Entry(
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=size,
        mtime=st.st_mtime_ns // 1_000_000_000,  # the float st_mtime rounds .999999999 up
        sha256=sha,
        target=os.readlink(path) if kind == SYMLINK else "",
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev))
        if kind in (CHARDEV, BLOCKDEV)
        else (0, 0),
        xattrs=_dir_xattrs(path),
    )


def _walk(top: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """(relative path, absolute path, lstat) of everything below `top`, not following
    symlinks and not crossing into nothing: plain recursive scandir."""
    stack = [("", top)]
    while stack:
        rel, absdir = stack.pop()
        with os.scandir(absdir) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            st = e.stat(follow_symlinks=False)
            child_rel = f"{rel}/{e.name}"
            yield child_rel, e.path, st
            if stat.S_ISDIR(st.st_mode):
                stack.append((child_rel, e.path))


def canonical_from_dir(path: Path | str) -> Listing:
    """The canonical listing of the directory tree at `path` (``lstat`` based, read-only)."""
    top = os.fspath(path)
    root_st = os.lstat(top)
    listing: Listing = {"/": dir_entry(top, root_st)}
    inode_of: dict[str, tuple[int, int]] = {}
    for rel, abspath, st in _walk(top):
        listing[rel] = dir_entry(abspath, st)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            inode_of[rel] = (st.st_dev, st.st_ino)
    return _with_groups(listing, inode_of)


# ----------------------------------------------------------------------------- comparing


def _describe(entry: Entry) -> str:
    return f"{entry.type} {entry.mode:04o}"


def _field_diffs(path: str, a: Entry, b: Entry, skip_mtime: bool) -> list[str]:
    out = []
    if a.type != b.type:
        return [f"{path}: type {a.type} != {b.type}"]
    for name in ("mode", "uid", "gid", "size", "mtime", "sha256", "target", "rdev"):
        if name == "mtime" and skip_mtime:
            continue
        va, vb = getattr(a, name), getattr(b, name)
        if va != vb:
            shown = (f"{va:04o}", f"{vb:04o}") if name == "mode" else (repr(va), repr(vb))
            out.append(f"{path}: {name} {shown[0]} != {shown[1]}")
    if dict(a.xattrs) != dict(b.xattrs):
        for key in sorted(set(a.xattrs) | set(b.xattrs)):
            if a.xattrs.get(key) != b.xattrs.get(key):
                out.append(f"{path}: xattr {key} {a.xattrs.get(key)!r} != {b.xattrs.get(key)!r}")
    if a.hardlinks != b.hardlinks:
        out.append(f"{path}: hard-link group {a.hardlinks!r} != {b.hardlinks!r}")
    return out


def diff_listings(
    a: Mapping[str, Entry],
    b: Mapping[str, Entry],
    *,
    ignore_root_mtime: bool = False,
    ignore_mtime: Collection[str] = (),
    compare_mtime: bool = True,
    ignore_paths: Collection[str] = (),
) -> list[str]:
    """Human-readable differences between listings `a` and `b` (empty when equal).

    `ignore_root_mtime` and `ignore_mtime` (paths) skip those mtimes; `compare_mtime=False`
    skips every mtime; `ignore_paths` drops those paths from both sides entirely."""
    skip = set(ignore_mtime) | ({"/"} if ignore_root_mtime else set())
    dropped = set(ignore_paths)
    out: list[str] = []
    for path in sorted(set(a) | set(b)):
        if path in dropped:
            continue
        if path not in b:
            out.append(f"only in first: {path} ({_describe(a[path])})")
        elif path not in a:
            out.append(f"only in second: {path} ({_describe(b[path])})")
        else:
            out += _field_diffs(path, a[path], b[path], not compare_mtime or path in skip)
    return out


# ----------------------------------------------------------------------------- podman export


PODMAN_EXPORT_ADDITIONS: frozenset[str] = frozenset()
"""Paths that ``podman export`` of a created, never-started container shows although the
image does not have them. Measured with podman 4.3.1 (tests/test_harness.py proves it for
every fixture image against ``podman image mount``): none, and nothing is changed either;
only the root directory itself has no entry in the export tar (it is not in the listing).

A container that has been *started* is different (hence `Podman.export` never starts one):
its export also has /etc/hosts, /etc/hostname, /etc/group (mode 0600, when missing),
/etc/mtab (symlink), /run/.containerenv and the mount points /dev, /proc, /sys, /run, a
rewritten /etc/passwd (a line for the image's User is added) and new mtimes on /etc and
/run. Those cannot be undone exactly from a listing, so no helper pretends to.

Images built with ``podman build`` and a ``RUN`` step do contain /dev, /proc, /sys, /run
and an empty /etc/hostname (mode 0755) in that RUN layer (buildah leaves them): that is
image content, not an export addition."""


def normalise_podman_export(listing: Mapping[str, Entry]) -> Listing:
    """`listing` (of a ``Podman.export`` tar) without what podman adds to an image's root
    filesystem on export: exactly `PODMAN_EXPORT_ADDITIONS`."""
    return {p: e for p, e in listing.items() if p not in PODMAN_EXPORT_ADDITIONS}


def tar_of_dir_gnu(src: Path, dest: Path) -> Path:
    """`src` as a tar made by GNU tar with xattrs (``--xattrs --xattrs-include='*'``)."""
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--format=posix",
         "-C", str(src), "-cf", str(dest), "."],
        check=True,
        capture_output=True,
    )
    return dest


def tar_of_dir_python(src: Path, dest: Path) -> Path:
    """`src` as a PAX tar made by Python's `tarfile` (hard links, devices, fifos), with each
    entry's xattrs added as ``SCHILY.xattr.*`` records (tarfile itself keeps none)."""

    def with_xattrs(info: tarfile.TarInfo) -> tarfile.TarInfo:
        full = os.path.join(src, info.name)
        xattrs = _dir_xattrs(full)
        info.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
        }
        info.uname = info.gname = ""
        return info

    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(src, arcname=".", filter=with_xattrs)
    return dest
