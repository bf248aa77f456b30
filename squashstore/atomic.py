"""Atomic file creation: write under a temporary name beside the target, fsync, rename.

Every file squashstore produces for a user or for the store goes through `atomic_output`
(a stream) or `atomic_write` (bytes; temporary names by `temp_name`, which name their writer
so leftover removal knows whose they are), so an interrupted or failed command never leaves a
half-written file under the real name. Imports little: the mount program writes its mount
record with `atomic_write` at every container start (so pathlib, json and contextlib are
imported only by the functions that need them).
"""

from __future__ import annotations

import errno
import os
import stat

from squashstore import host

TYPE_CHECKING = False  # not typing's: the mount program starts without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterator
    from contextlib import AbstractContextManager
    from pathlib import Path
    from typing import Any, BinaryIO

    StrPath = str | os.PathLike[str]

TMP_SUFFIX = ".sqtmp"
"""The suffix of `temp_name` names (a store's leftover removal looks for it)."""
PARTIAL_SUFFIX = ".tmp"
"""The suffix of a file being written by `atomic_output` or the squashfs writer (a
``mkstemp`` name, which does not name its writer: never a store's leftover to remove)."""


def atomic_output(dest: StrPath, mode: int = 0o644, durable: bool = True
                  ) -> AbstractContextManager[BinaryIO]:
    """A binary file that becomes `dest` only when the with-block ends without error.

    `durable` fsyncs the data and the directory too (the store needs it; a user's export,
    which can simply be made again, does not pay for it).
    """
    # imported when used: the mount program starts without them
    from contextlib import contextmanager
    from pathlib import Path

    return contextmanager(_atomic_output)(Path(dest), mode, durable)


def _atomic_output(dest: Path, mode: int, durable: bool) -> Iterator[BinaryIO]:
    import tempfile

    refuse_special(dest)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=PARTIAL_SUFFIX, dir=dest.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(dest)) from None
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fchmod(out.fileno(), mode & ~_umask())
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:  # noqa: SIM105 (contextlib is not on the mount program's path)
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(dest.parent)


def refuse_special(dest: StrPath) -> None:
    """An `OSError` when `dest` is a device, a FIFO or a socket: a rename over it would
    replace the node itself (``export -o /dev/null`` as root replaced /dev/null with a
    regular file)."""
    try:
        mode = os.stat(dest).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OSError(errno.EINVAL, "not a regular file: refusing to replace it", str(dest))


def fsync_dir(path: StrPath) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def temp_name(target: Path) -> Path:
    """A temporary sibling of ``target`` naming its writer (for leftover removal)."""
    return target.with_name(os.path.basename(temp_path(target)))


def temp_path(target: StrPath) -> str:
    """`temp_name` as a string."""
    directory, name = os.path.split(os.fspath(target))
    return os.path.join(directory, f".{name}.{host.me().tag()}.{os.urandom(4).hex()}"
                                   f"{TMP_SUFFIX}")


def atomic_write(path: StrPath, data: bytes, mode: int = 0o644, durable: bool = True
                 ) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the directory.

    Without `durable` the two fsyncs are left out: still atomic for every reader, but not
    ordered against a power loss. For runtime state a reboot makes meaningless anyway (the
    mount registry's records): an fsync costs 10-140 ms where ``/run`` is not a tmpfs."""
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:  # noqa: SIM105 (contextlib is not on the mount program's path)
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_json(path: StrPath, value: Any, durable: bool = True) -> None:
    import json

    atomic_write(path, (json.dumps(value, indent=1, sort_keys=False) + "\n").encode(),
                 durable=durable)
