"""File locks: the project's own store lock and containers/storage's ``*.lock`` files.

Every lock here is a POSIX record lock (``fcntl(F_SETLKW)`` over the whole file), the kind
containers/storage 1.43 takes on ``overlay-layers/layers.lock`` and
``overlay-images/images.lock``, so podman readers and squashstore writers exclude each other.
containers/storage notices that a store changed when the lock file's first 64 bytes (a random
"last writer" id of 64 hex digits, written at offset 0 by ``Touch``) differ from what it saw
last; `touch_token` writes a fresh one. Record locks belong to a (process, file) pair: closing
ANY descriptor of the file releases them, so each lock file is opened exactly once per holder
and this module never opens a locked file a second time. The context managers are classes, and
the thread locks ``_thread``'s: the mount program takes the registry's lock at every
container start, without importing contextlib or threading.
"""

from __future__ import annotations

import _thread
import errno
import os

from squashstore.errors import SquashstoreError

TYPE_CHECKING = False  # not typing's: the mount program starts without importing typing
if TYPE_CHECKING:
    StrPath = str | os.PathLike[str]


class LockError(SquashstoreError):
    """A lock file could not be opened or locked."""


TOKEN_LENGTH = 64
"""containers/storage's last-writer id: 64 hex digits at offset 0 of the lock file."""


SHARED_MODE = 0o644
"""A lock file's mode: read-only sharers (podman reading a store) open it too."""
PRIVATE_MODE = 0o600
"""The mode of a lock only its owner's writers take (the mount registry's, the store's own
project and pull locks): anyone who can open a lock file can hold a read lock on it, which
a write lock waits for, so another local user could hang every writer for as long as they
like. Nobody else opens these."""


def _open(path: StrPath, create: bool, mode: int = SHARED_MODE) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise LockError(f"cannot write to the store: {path}: {exc.strerror}") from exc
        raise
    if create:
        # umask may have removed the world-readable bit: read-only sharers must open it
        # (and a private lock an older version made with SHARED_MODE becomes private).
        os.fchmod(fd, mode)
    return fd


class exclusive:
    """Hold a write (exclusive) record lock on ``path``; ``with`` gives the descriptor."""

    def __init__(self, path: StrPath, create: bool = True, mode: int = SHARED_MODE
                 ) -> None:
        self.path = path
        self.create = create
        self.mode = mode
        self.fd = -1

    def __enter__(self) -> int:
        fd = _open(self.path, self.create, self.mode)
        try:
            # glibc's lockf(F_LOCK, 0) is fcntl(F_SETLKW) with a write lock from the offset
            # (0: just opened) to the end and beyond, the lock fcntl.lockf(LOCK_EX) takes; os
            # has it built in, the fcntl module is one more shared object to load. Unlike
            # fcntl.lockf, os.lockf does not retry EINTR (PEP 475): a signal whose Python
            # handler returns would fail the wait, so retry here (a handler that raises,
            # as SIGINT's, still ends it: it runs before the next call).
            while True:
                try:
                    os.lockf(fd, os.F_LOCK, 0)
                    break
                except InterruptedError:
                    continue
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return fd

    def __exit__(self, *exc: object) -> None:
        fd, self.fd = self.fd, -1
        os.close(fd)  # releases the lock


_THREAD_LOCKS: dict[str, _thread.RLock] = {}
_DEPTH: dict[str, int] = {}
_GUARD = _thread.allocate_lock()


class reentrant:
    """An exclusive lock on ``path`` that other processes AND other threads wait for, and
    that the holding thread may take again (nested use does nothing). A record lock alone
    excludes neither the process's other threads nor survives a nested open and close."""

    def __init__(self, path: StrPath, mode: int = SHARED_MODE) -> None:
        self.path = path
        self.mode = mode
        self.key = os.path.abspath(path)
        self._thread_lock: _thread.RLock | None = None
        self._file: exclusive | None = None

    def __enter__(self) -> None:
        key = self.key
        with _GUARD:
            thread_lock = _THREAD_LOCKS.setdefault(key, _thread.RLock())
        thread_lock.acquire()
        try:
            if _DEPTH.get(key, 0):
                _DEPTH[key] += 1
                self._file = None
            else:
                file = exclusive(self.path, mode=self.mode)
                file.__enter__()
                _DEPTH[key] = 1
                self._file = file
        except BaseException:
            thread_lock.release()
            raise
        self._thread_lock = thread_lock

    def __exit__(self, *exc: object) -> None:
        thread_lock, file = self._thread_lock, self._file
        assert thread_lock is not None
        self._thread_lock = self._file = None
        try:
            if file is None:
                _DEPTH[self.key] -= 1
            else:
                _DEPTH[self.key] = 0
                file.__exit__()
        finally:
            thread_lock.release()


def touch_token(fd: int) -> None:
    """Write a new last-writer id into a held containers/storage lock file."""
    token = os.urandom(TOKEN_LENGTH // 2).hex().encode()
    written = os.pwrite(fd, token, 0)
    if written != len(token):
        raise OSError(errno.ENOSPC, "short write to lock file")


def read_token(path: StrPath) -> bytes:
    """The lock file's current last-writer id (empty when never written)."""
    try:
        with open(path, "rb") as file:
            return file.read(TOKEN_LENGTH)
    except FileNotFoundError:
        return b""
