"""When root may act on a store, and which paths below it root may mount on or unmount.

Root acting on a store that another user can write would follow that user's symlinks: mount a
squash file over ``/etc`` through a planted ``overlay/<LID>/diff -> /etc``, unmount or delete
what the link points at. So, like ssh's StrictModes and containers/storage's refusal of unsafe
permissions, real root (`host.is_real_root`) acts on a store only when nobody else can
change what it uses: every directory from ``/`` down to the store root is owned by root
and writable by no one else (a world-writable directory is allowed only with the sticky bit,
as ``/tmp``), and every entry inside the store is owned by root, has no group or other write
bit, and is a directory or a regular file, except the layer links ``overlay/l/*`` (symlinks).
Mount points are not entered (and never stat-ed: a dead FUSE server would hang us), nor are
layers' ``diff``, ``empty`` and ``merged`` directories. Like ssh's StrictModes this is checked
on what an operation touches, in a few stats (`check_top` when a store is opened: ancestors,
root and fixed directories; `check_entry`, `check_mountpoint`, `check_squash_file`,
`check_unmount` on the layer paths used: a container start costs O(1) extra stats), and on
the whole tree (`check_tree`) only by what may touch every file: the writers' lock (publish,
rmi, gc, whose leftover removal walks the store) and ``verify``. The same rule holds for root's
runtime directory (the mount registry). An ordinary user acts on their own files, so the rule
is root's only. On top of it, as defence in depth for everyone, a mount point must be a real
directory reached without any symlink (`check_mountpoint`), and only a squash file system
at such a path is ever unmounted (`check_unmount`).
"""

from __future__ import annotations

import os
import stat

from squashstore import host
from squashstore.errors import SquashstoreError

TYPE_CHECKING = False  # not typing's: the mount program starts without importing typing
if TYPE_CHECKING:
    from collections.abc import Container, Iterable
    from pathlib import Path

    StrPath = str | os.PathLike[str]

LINK_DIR = ("overlay", "l")
"""The one directory of a store whose entries are symlinks (``overlay/l/<short>``)."""
LAYER_DIRS = ("diff", "empty", "merged")
"""A store layer's directories: diff (the squash mount point), and empty and merged, on
which podman mounts the layer read-only (lowerdir=diff:empty) when it commits a container
built FROM the image."""
UNENTERED = frozenset(LAYER_DIRS)
"""A layer directory's children that are checked but never entered."""
FIX = "chown -R root and chmod -R go-w it"


class UnsafeStore(SquashstoreError):
    """Root was asked to act on a store (or path) other users can change."""


def _problem(st: os.stat_result, symlink_ok: bool) -> str:
    if stat.S_ISLNK(st.st_mode) and not symlink_ok:
        return "is a symlink"
    if st.st_uid != 0:
        return f"is owned by uid {st.st_uid}, not root"
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        return "is neither a file nor a directory"
    return ""


def _refuse(path: StrPath, problem: str, what: str) -> UnsafeStore:
    return UnsafeStore(f"{path} {problem}: refusing to act as root on {what} other users can "
                       f"change ({FIX})")


def check_ancestors(path: StrPath, what: str) -> None:
    """Every directory above `path` is root's and writable by no one else (sticky allowed)."""
    parents = []
    child = os.path.realpath(path)
    while child != "/":
        child = os.path.dirname(child)
        parents.append(child)
    for parent in reversed(parents):
        st = os.lstat(parent)
        sticky = bool(st.st_mode & stat.S_ISVTX)
        if st.st_uid != 0 or (st.st_mode & 0o022 and not sticky):
            raise _refuse(parent, f"(owner uid {st.st_uid}, mode "
                          f"{stat.S_IMODE(st.st_mode):04o}) is not root's alone", what)


def check_entry(path: StrPath, symlink_ok: bool = False, what: str = "a store") -> None:
    """As real root: one path, lstat-ed: root's, no group or other write bit, a directory or
    a regular file (or a symlink when `symlink_ok`). `UnsafeStore` otherwise."""
    if host.is_real_root():
        _check_entry(path, symlink_ok, what)


def _check_entry(path: StrPath, symlink_ok: bool, what: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    problem = _problem(st, symlink_ok)
    if problem:
        raise _refuse(path, problem, what)


def check_top(root: StrPath, parts: Iterable[str], what: str = "a store") -> None:
    """As real root, in O(1) stats: the ancestors of `root`, `root` and its fixed entries
    `parts` (relative paths). What an operation then touches below is checked by it
    (`check_entry`, `check_mountpoint`, ...); `check_tree` walks everything."""
    if not host.is_real_root() or not os.path.lexists(root):
        return
    check_ancestors(root, what)
    _check_entry(root, False, what)
    for part in parts:
        _check_entry(os.path.join(root, part), False, what)


def check_tree(root: StrPath, mounted: Container[str] | None = None, what: str = "a store"
               ) -> None:
    """As real root: raise `UnsafeStore` unless only root can change `root` (see the module
    docstring). Does nothing for other users or when `root` does not exist yet."""
    if not host.is_real_root() or not os.path.lexists(root):
        return
    from pathlib import Path  # not on the mount program's path

    root = Path(root)
    mounted = host.mount_table() if mounted is None else mounted
    check_ancestors(root, what)
    st = os.lstat(root)
    problem = _problem(st, symlink_ok=False)
    if problem:
        raise _refuse(root, problem, what)
    stack = [root]
    while stack:
        directory = stack.pop()
        for name in _listdir(directory):
            path = directory / name
            if str(path) in mounted:
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # removed meanwhile (a writer's temporary file)
            in_links = path.parent.relative_to(root).parts == LINK_DIR
            problem = _problem(st, symlink_ok=in_links)
            if problem:
                raise _refuse(path, problem, what)
            layer_child = len(path.relative_to(root).parts) == 3 and \
                path.relative_to(root).parts[0] == "overlay" and name in UNENTERED
            if stat.S_ISDIR(st.st_mode) and not layer_child:
                stack.append(path)


def _listdir(directory: Path) -> Iterable[str]:
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return ()


def parent_has_no_symlinks(path: StrPath) -> bool:
    """Whether no directory above the absolute `path` is, or passes through, a symlink.

    `path` itself is never stat-ed (it may be a dead or hung FUSE mount)."""
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.realpath(parent) == parent


def check_mountpoint(path: StrPath) -> None:
    """A mount point is a real directory reached without symlinks, owned as its parent
    (the layer directory) is, and as root both are root's alone; `UnsafeStore` if not."""
    if not parent_has_no_symlinks(path):
        raise UnsafeStore(f"{path}: a symlink leads elsewhere: refusing to mount there")
    parent_dir = os.path.dirname(os.path.abspath(path))
    check_entry(parent_dir)
    check_entry(path)
    try:
        st = os.lstat(path)
        parent = os.lstat(parent_dir)
    except OSError as exc:
        raise UnsafeStore(f"{path}: cannot use as a mount point: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeStore(f"{path}: is a symlink: refusing to mount there")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeStore(f"{path}: not a directory: refusing to mount there")
    if st.st_uid != parent.st_uid:
        raise UnsafeStore(f"{path}: owned by uid {st.st_uid}, its layer by uid "
                          f"{parent.st_uid}: refusing to mount there")


def check_squash_file(path: StrPath) -> None:
    """A squash file to mount or read is a regular file reached without symlinks."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UnsafeStore(f"{path}: {exc.strerror}") from None
    if not parent_has_no_symlinks(path) or not stat.S_ISREG(st.st_mode):
        raise UnsafeStore(f"{path}: not a regular file reached without symlinks: refusing "
                          "to use it")
    check_entry(path)


def check_unmount(path: StrPath, fstype: str | None = None,
                  squash_fstypes: Container[str] = ()) -> None:
    """Only a squash file system (`fstype` as the mount table has it at `path`, one of
    `squash_fstypes`; None when nothing is mounted there) at a path reached without
    symlinks is unmounted."""
    if not parent_has_no_symlinks(path):
        raise UnsafeStore(f"{path}: a symlink leads elsewhere: refusing to unmount there")
    if fstype is not None and fstype not in squash_fstypes:
        raise UnsafeStore(f"{path}: a {fstype} file system, not a squash mount: refusing to "
                          "unmount it")
    if fstype is not None:
        check_entry(os.path.dirname(os.path.abspath(path)))


def read_regular(path: StrPath, limit: int, owner: int | None = None,
                 follow: bool = False) -> bytes | None:
    """The bytes of the regular file `path`; None when there is none. Not through a
    symlink unless `follow`; never blocking on a FIFO (a planted one would hang the reader);
    `OSError` when it is something else, larger than `limit` bytes (a file that says so is
    refused unread: a symlink to a huge sparse file would be read whole), or (with `owner`)
    another uid's."""
    import errno

    nofollow = 0 if follow else os.O_NOFOLLOW
    try:
        fd = os.open(path, os.O_RDONLY | nofollow | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if owner is not None and st.st_uid != owner:
            raise OSError(errno.EPERM, f"owned by uid {st.st_uid}, not {owner}", str(path))
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        parts = []  # bounded too: a file that grows meanwhile
        total = 0
        while data := os.read(fd, min(limit + 1 - total, 1 << 20)):
            parts.append(data)
            total += len(data)
            if total > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return b"".join(parts)
    finally:
        os.close(fd)
