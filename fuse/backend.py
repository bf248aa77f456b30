"""The ``fuse`` mount backend: squashstore's own FUSE server behind the `Mounter` protocol.

This module owns how the mount registry (`squashstore.mounts`) starts, stops and checks the
project's FUSE server: `FuseMounter.mount` starts a detached server (see
`squashstore.fuse.daemon.start`) and returns its pid once the mount answers, `umount` runs
``fusermount3 -u`` (``-z`` when lazy; a busy mount raises `MountError` whose cause has errno
EBUSY), and `is_alive` tells a serving mount from a dead one (ENOTCONN after the server was
killed; asked with statfs, which the kernel never answers from its caches). `register`
adds the backend to the registry under the name ``fuse``.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

from squashstore import mounts
from squashstore.fuse import daemon

FSTYPE = "fuse.squashstore"
"""How /proc/self/mountinfo shows this server's mounts (``subtype=squashstore``)."""


class FuseMounter:
    """squashstore's pyfuse3 server (works rootless; unmounted with fusermount3)."""

    name = "fuse"

    def __init__(self, extra_args: tuple[str, ...] = ()) -> None:
        self.extra_args = extra_args
        """Further server arguments, e.g. ``("--cache-size=64",)``."""

    def mount(self, squash: Path, mountpoint: Path) -> int | None:
        try:
            pid: int = daemon.start(squash, mountpoint, self.extra_args,
                                    timeout=mounts.MOUNT_TIMEOUT)
        except daemon.ServeError as exc:
            raise mounts.MountError(f"serve {squash}: {exc}") from None
        return pid

    def umount(self, mountpoint: Path, lazy: bool) -> None:
        proc = subprocess.run(
            ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)],
            capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
        if proc.returncode == 0:
            return
        message = (proc.stderr.strip() or f"exit status {proc.returncode}").splitlines()[-1]
        error = mounts.MountError(f"fusermount3 -u {mountpoint}: {message}")
        if "busy" in message.lower():
            raise error from OSError(errno.EBUSY, message, str(mountpoint))
        raise error

    def is_alive(self, mountpoint: Path) -> bool:
        """statfs always reaches the server; stat does not (the kernel keeps the root's
        attributes for the long attribute timeout, even after the server died)."""
        try:
            os.statvfs(mountpoint)
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
                return False
            raise
        return True


def register() -> None:
    """Make ``fuse`` a backend of `squashstore.mounts` (by name and by mount type)."""
    mounts.register_backend("fuse", FuseMounter, fstype=FSTYPE)
