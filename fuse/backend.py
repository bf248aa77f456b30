"""The ``fuse`` mount backend: squashstore's own FUSE server behind the `Mounter` protocol.

This module owns how the mount registry (`squashstore.mounts`) starts, stops and checks the
project's FUSE server: `FuseMounter.mount` starts a detached server (see
`squashstore.fuse.spawn.start`) and returns its pid once the mount answers, `umount` runs
``fusermount3 -u`` (``-z`` when lazy; a busy mount raises `MountError` whose cause has errno
EBUSY), and `is_alive` tells a serving mount from a dead one (ENOTCONN after the server was
killed; asked with statfs, which the kernel never answers from its caches). The registry
knows it as the backend ``fuse``, its default.
"""

from __future__ import annotations

from pathlib import Path

from squashstore import host, mounts
from squashstore.fuse import spawn

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
            pid: int = spawn.start(squash, mountpoint, self.extra_args,
                                    timeout=host.MOUNT_TIMEOUT)
        except spawn.ServeError as exc:
            raise mounts.MountError(f"serve {squash}: {exc}") from None
        return pid

    def umount(self, mountpoint: Path, lazy: bool) -> None:
        mounts.fuse_unmount(mountpoint, lazy)

    def is_alive(self, mountpoint: Path) -> bool:
        return host.answers(mountpoint)
