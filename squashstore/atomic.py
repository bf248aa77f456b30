"""Atomic file creation: write under a temporary name beside the target, fsync, rename.

Every file squashstore produces for a user or for the store goes through `atomic_output`,
so an interrupted or failed command never leaves a half-written file under the real name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_output(dest: Path, mode: int = 0o644, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file that becomes `dest` only when the with-block ends without error.

    `durable` fsyncs the data and the directory too (the store needs it; a user's export,
    which can simply be made again, does not pay for it).
    """
    dest = Path(dest)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
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
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(dest.parent)


def fsync_dir(path: Path) -> None:
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
