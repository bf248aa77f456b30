"""File locks: the project's own store lock and containers/storage's ``*.lock`` files.

Every lock here is a POSIX record lock (``fcntl(F_SETLKW)`` over the whole file), the kind
containers/storage 1.43 takes on ``overlay-layers/layers.lock`` and
``overlay-images/images.lock``, so podman readers and squashstore writers exclude each other.
containers/storage notices that a store changed when the lock file's first 64 bytes (a random
"last writer" id of 64 hex digits, written at offset 0 by ``Touch``) differ from what it saw
last; `touch_token` writes a fresh one. Record locks belong to a (process, file) pair: closing
ANY descriptor of the file releases them, so each lock file is opened exactly once per holder
and this module never opens a locked file a second time.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from squashstore.errors import SquashstoreError


class LockError(SquashstoreError):
    """A lock file could not be opened or locked."""


TOKEN_LENGTH = 64
"""containers/storage's last-writer id: 64 hex digits at offset 0 of the lock file."""


def _open(path: Path, create: bool) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise LockError(f"cannot write to the store: {path}: {exc.strerror}") from exc
        raise
    if create:
        # umask may have removed the world-readable bit: read-only sharers must open it.
        os.fchmod(fd, 0o644)
    return fd


@contextmanager
def exclusive(path: Path, create: bool = True) -> Iterator[int]:
    """Hold a write (exclusive) record lock on ``path``; yields the descriptor."""
    fd = _open(path, create)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


_THREAD_LOCKS: dict[str, threading.RLock] = {}
_DEPTH: dict[str, int] = {}
_GUARD = threading.Lock()


@contextmanager
def reentrant(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` that other processes AND other threads wait for, and
    that the holding thread may take again (nested use does nothing). A record lock alone
    excludes neither the process's other threads nor survives a nested open and close."""
    key = os.path.abspath(path)
    with _GUARD:
        thread_lock = _THREAD_LOCKS.setdefault(key, threading.RLock())
    with thread_lock:
        if _DEPTH.get(key, 0):
            _DEPTH[key] += 1
            try:
                yield
            finally:
                _DEPTH[key] -= 1
            return
        with exclusive(path):
            _DEPTH[key] = 1
            try:
                yield
            finally:
                _DEPTH[key] = 0


def touch_token(fd: int) -> None:
    """Write a new last-writer id into a held containers/storage lock file."""
    token = os.urandom(TOKEN_LENGTH // 2).hex().encode()
    written = os.pwrite(fd, token, 0)
    if written != len(token):
        raise OSError(errno.ENOSPC, "short write to lock file")


def read_token(path: Path) -> bytes:
    """The lock file's current last-writer id (empty when never written)."""
    try:
        with open(path, "rb") as file:
            return file.read(TOKEN_LENGTH)
    except FileNotFoundError:
        return b""
