"""Squash mounts: the per-host mount registry and the mounter backends.

The registry lives in the runtime directory (see `squashstore.host.runtime_dir`): a lock
file and one JSON record per mount point (`squashstore.mountrecords` owns the records, the
lock and the use of a mount that is already live; they are re-exported here). Every mount and
unmount happens under the registry's lock, so an image's layer is mounted at most once however
many containers start together, and a dead FUSE mount (ENOTCONN) is lazily unmounted and
replaced. Backends implement the small `Mounter` interface: `fuse` (squashstore's own server,
the default; rootless), `kernel` (root: a read-only loop mount) and `squashfuse`
(``squashfuse_ll``, rootless).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from squashstore import config, host, trust
from squashstore.errors import SquashstoreError
from squashstore.lazy import paths as lazy_paths
from squashstore.mountrecords import FSTYPE_BACKENDS as FSTYPE_BACKENDS
from squashstore.mountrecords import MountRecord as MountRecord
from squashstore.mountrecords import RecordedUse as RecordedUse
from squashstore.mountrecords import RecordRegistry


class MountError(SquashstoreError):
    """A squash file could not be mounted or unmounted."""


TYPE_CHECKING = False  # not typing's: a first start need not import typing (~10 M instructions)
if TYPE_CHECKING:  # the protocol is for the type checker; nothing uses it at run time
    from typing import Protocol

    class Mounter(Protocol):
        """A way to serve a squash file read-only on a directory."""

        name: str

        def mount(self, squash: Path, mountpoint: Path) -> int | None:
            """Mount; return the server's pid (None for in-kernel mounts). Returns once
            mounted."""

        def umount(self, mountpoint: Path, lazy: bool) -> None:
            """Unmount; raise MountError (errno EBUSY on the cause) when it is busy."""

        def is_alive(self, mountpoint: Path) -> bool:
            """Whether a mount on ``mountpoint`` answers (False for a dead FUSE server)."""


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()
                 or f"exit status {proc.returncode}").splitlines()
        raise MountError(f"{what}: {lines[-1]}")


def fuse_unmount(mountpoint: Path, lazy: bool) -> None:
    """``fusermount3 -u [-z]``; a busy mount raises MountError caused by OSError(EBUSY)."""
    message = host.fusermount_unmount(mountpoint, lazy)
    if message is None:
        return
    error = MountError(f"fusermount3 -u {mountpoint}: {message}")
    if "busy" in message.lower():
        raise error from OSError(errno.EBUSY, message, str(mountpoint))
    raise error


class KernelMounter:
    """The kernel's squashfs on a loop device (root only)."""

    name = "kernel"

    def mount(self, squash: Path, mountpoint: Path) -> int | None:
        if not host.is_real_root():
            raise MountError("the kernel backend needs root; use --backend squashfuse")
        _run(["mount", "-t", "squashfs", "-o", "loop,ro,nosuid,nodev", str(squash),
              str(mountpoint)], f"mount {squash}")
        return None

    def umount(self, mountpoint: Path, lazy: bool) -> None:
        _run(["umount", *(["-l"] if lazy else []), str(mountpoint)], f"umount {mountpoint}")

    def is_alive(self, mountpoint: Path) -> bool:
        return host.answers(mountpoint)


class SquashfuseMounter:
    """``squashfuse_ll``, the C FUSE server (works rootless); unmounted by fusermount3."""

    name = "squashfuse"
    program = "squashfuse_ll"

    def mount(self, squash: Path, mountpoint: Path) -> int | None:
        import shutil

        binary = shutil.which(self.program)
        if binary is None:
            raise MountError(f"{self.program} not found on PATH")
        options = ["-o", "allow_other"] if host.is_real_root() else []
        log = host.server_log(mountpoint, self.name)
        with open(log, "wb") as err:
            server = subprocess.Popen(
                [binary, "-f", *options, str(squash), str(mountpoint)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True, close_fds=True)
        deadline = time.monotonic() + host.MOUNT_TIMEOUT
        while time.monotonic() < deadline:
            entry = host.mount_table().get(host.real_path(mountpoint))
            if entry is not None and entry.fstype.startswith("fuse"):
                return server.pid
            if server.poll() is not None:
                message = log.read_text(errors="replace").strip().splitlines()
                raise MountError(f"{self.program} {squash}: "
                                 + (message[-1] if message else f"exit {server.returncode}"))
            time.sleep(host.POLL_INTERVAL)
        server.kill()
        raise MountError(f"{self.program} {squash}: no mount after {host.MOUNT_TIMEOUT:.0f}s")

    def umount(self, mountpoint: Path, lazy: bool) -> None:
        fuse_unmount(mountpoint, lazy)

    def is_alive(self, mountpoint: Path) -> bool:
        return host.answers(mountpoint)


def _fuse_mounter() -> Mounter:
    # Imported when used (it brings pyfuse3 and the server); by name, since the fuse package
    # lives in fuse/ of the checkout and is mapped to squashstore.fuse only when installed.
    backend = importlib.import_module("squashstore.fuse.backend")
    mounter: Mounter = backend.FuseMounter()
    return mounter


BACKENDS: dict[str, Callable[[], Mounter]] = {
    "fuse": _fuse_mounter,
    "kernel": KernelMounter,
    "squashfuse": SquashfuseMounter,
}


def default_backend() -> str:
    """``[mount] backend`` of the config, else ``fuse``: the project's own server (it works
    without root, and answers the metadata storms of imports from its caches)."""
    return config.load().mount.backend


def mounter(name: str | None = None) -> Mounter:
    name = name or default_backend()
    if name not in BACKENDS:
        raise MountError(f"unknown mount backend {name!r} (known: {', '.join(BACKENDS)})")
    return BACKENDS[name]()


def mounter_for_fstype(fstype: str) -> Mounter:
    if fstype.startswith("fuse") and fstype not in FSTYPE_BACKENDS:
        return SquashfuseMounter()
    return mounter(FSTYPE_BACKENDS.get(fstype, "kernel"))


class Registry(RecordRegistry):
    """The mount registry of this host / user namespace: its records (`RecordRegistry`) and
    the mounts themselves."""

    def ensure_mounted(self, image: str, layer: str, squash: Path, mountpoint: Path,
                       backend: str | None = None,
                       user: RecordedUse | None = None,
                       using: Mounter | None = None) -> MountRecord:
        """Mount ``squash`` on ``mountpoint`` unless a live mount is there; record ``user``.
        `using`: this mounter instead of `backend`'s (a FUSE server with extra arguments)."""
        with self.locked():
            if user is not None and (used := self.use_if_live(mountpoint, user)) is not None:
                return used
            record = self._live_record(image, layer, squash, mountpoint)
            if record is None:
                trust.check_mountpoint(mountpoint)
                trust.check_squash_file(squash)
                # A lazily pulled image's squash file is sparse: only our server reads it.
                chosen = using or mounter("fuse" if lazy_paths.is_lazy(squash) else backend)
                pid = chosen.mount(squash, mountpoint)
                if pid is not None:
                    # The server serves every job's containers: it must not end with this one.
                    from squashstore import detach

                    detach.leave_job(pid)
                record = MountRecord(image, layer, str(squash), host.real_path(mountpoint),
                                     chosen.name, pid, time.time())
            if user is not None:
                self.add_user(record, user, host.mount_table())
            self.write(record)
            return record

    def _live_record(self, image: str, layer: str, squash: Path,
                     mountpoint: Path) -> MountRecord | None:
        """The record of a live mount on ``mountpoint``; dead mounts are removed."""
        trust.check_unmount(mountpoint, None)
        entry = host.mount_table().get(host.real_path(mountpoint))
        record = self.record(mountpoint)
        if entry is None:
            if record is not None:
                self.forget(mountpoint)
            return None
        trust.check_unmount(mountpoint, entry.fstype, FSTYPE_BACKENDS)
        existing = mounter_for_fstype(entry.fstype)
        if not existing.is_alive(mountpoint):
            existing.umount(mountpoint, lazy=True)
            self.forget(mountpoint)
            return None
        if record is None:
            record = MountRecord(image, layer, str(squash), host.real_path(mountpoint),
                                 existing.name, None, time.time())
        return record

    def umount(self, mountpoint: Path, lazy: bool = False) -> bool:
        """Unmount (if mounted) and forget; False when the mount is busy (or still there).

        Only a squash mount at a path reached without symlinks is unmounted
        (`trust.check_unmount`, `UnsafeStore` otherwise); success means it is gone."""
        with self.locked():
            return self._umount_locked(mountpoint, lazy)

    def _umount_locked(self, mountpoint: Path, lazy: bool) -> bool:
        trust.check_unmount(mountpoint, None)
        entry = host.mount_table().get(host.real_path(mountpoint))
        if entry is not None:
            trust.check_unmount(mountpoint, entry.fstype, FSTYPE_BACKENDS)
            existing = mounter_for_fstype(entry.fstype)
            alive = existing.is_alive(mountpoint)
            with contextlib.suppress(MountError):
                existing.umount(mountpoint, lazy=lazy or not alive)
            if self._squash_mounted(mountpoint):
                return False
        self.forget(mountpoint)
        return True

    @staticmethod
    def _squash_mounted(mountpoint: Path) -> bool:
        entry = host.mount_table().get(host.real_path(mountpoint))
        return entry is not None and entry.fstype in FSTYPE_BACKENDS

    def umount_all(self, lazy: bool = False) -> list[tuple[MountRecord, str]]:
        """Unmount every recorded mount; each record with "" when it is gone, else why not
        ("busy", or the refusal: a record naming /proc is refused and the others are still
        unmounted)."""
        out = []
        with self.locked():
            for record in self.records():
                try:
                    ok = self._umount_locked(Path(record.mountpoint), lazy)
                    out.append((record, "" if ok else "busy"))
                except SquashstoreError as exc:
                    text = " ".join(str(exc).split())
                    out.append((record, text.removeprefix(f"{record.mountpoint}: ")))
        return out
