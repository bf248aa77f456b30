"""Squash mounts: the per-host mount registry and the mounter backends.

The registry lives in the runtime directory (see `squashstore.runtime.runtime_dir`): a lock
file and one JSON record per mount point (image id, layer id, squash file, mount point,
backend, server pid, since, and the users the mount program recorded). Every mount and
unmount happens under the registry's lock, so an image's layer is mounted at most once however
many containers start together, and a dead FUSE mount (ENOTCONN) is lazily unmounted and
replaced. Backends implement the small `Mounter` interface: `fuse` (squashstore's own server,
the default; rootless), `kernel` (root: a read-only loop mount) and `squashfuse`
(``squashfuse_ll``, rootless).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from squashstore import detach, jobs, locking, runtime, trust
from squashstore.image import SquashstoreError
from squashstore.store import atomic_write_json

MOUNT_TIMEOUT = 30.0
"""Seconds a FUSE server may take before its mount appears."""


class MountError(SquashstoreError):
    """A squash file could not be mounted or unmounted."""


class Mounter(Protocol):
    """A way to serve a squash file read-only on a directory."""

    name: str

    def mount(self, squash: Path, mountpoint: Path) -> int | None:
        """Mount; return the server's pid (None for in-kernel mounts). Returns once mounted."""

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


ANSWER_TIMEOUT = 5.0
"""How long a mount may take to answer statfs before it counts as hung."""


def probe(mountpoint: Path, timeout: float = ANSWER_TIMEOUT) -> bool | None:
    """Whether a mount serves: True, False when dead (a FUSE mount whose server died gives
    ENOTCONN), None when it gave no answer within `timeout` (a hung server; the call would
    block forever, so it runs in a thread). Other errors count as serving: never unmount
    blindly.

    statfs, not stat: with long attribute timeouts the kernel answers stat of a dead
    server's root from its cache, while statfs always reaches the server.
    """
    answer: list[bool] = []

    def ask() -> None:
        try:
            os.statvfs(mountpoint)
        except OSError as exc:
            answer.append(exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO))
            return
        answer.append(True)

    thread = threading.Thread(target=ask, name="statfs", daemon=True)
    thread.start()
    thread.join(timeout)
    return answer[0] if answer else None


def answers(mountpoint: Path) -> bool:
    """Whether a mount serves within `ANSWER_TIMEOUT` (dead and hung mounts do not)."""
    return probe(mountpoint) is True


def fuse_unmount(mountpoint: Path, lazy: bool) -> None:
    """``fusermount3 -u [-z]``; a busy mount raises MountError caused by OSError(EBUSY)."""
    proc = subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)],
                          capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    if proc.returncode == 0:
        return
    message = (proc.stderr.strip() or f"exit status {proc.returncode}").splitlines()[-1]
    error = MountError(f"fusermount3 -u {mountpoint}: {message}")
    if "busy" in message.lower():
        raise error from OSError(errno.EBUSY, message, str(mountpoint))
    raise error


class KernelMounter:
    """The kernel's squashfs on a loop device (root only)."""

    name = "kernel"

    def mount(self, squash: Path, mountpoint: Path) -> int | None:
        if not runtime.is_real_root():
            raise MountError("the kernel backend needs root; use --backend squashfuse")
        _run(["mount", "-t", "squashfs", "-o", "loop,ro,nosuid,nodev", str(squash),
              str(mountpoint)], f"mount {squash}")
        return None

    def umount(self, mountpoint: Path, lazy: bool) -> None:
        _run(["umount", *(["-l"] if lazy else []), str(mountpoint)], f"umount {mountpoint}")

    def is_alive(self, mountpoint: Path) -> bool:
        return answers(mountpoint)


class SquashfuseMounter:
    """``squashfuse_ll``, the C FUSE server (works rootless); unmounted by fusermount3."""

    name = "squashfuse"
    program = "squashfuse_ll"

    def mount(self, squash: Path, mountpoint: Path) -> int | None:
        binary = shutil.which(self.program)
        if binary is None:
            raise MountError(f"{self.program} not found on PATH")
        options = ["-o", "allow_other"] if runtime.is_real_root() else []
        log_dir = runtime.runtime_dir() / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / (hashlib.sha256(str(mountpoint).encode()).hexdigest()[:24] + ".log")
        with open(log, "wb") as err:
            server = subprocess.Popen(
                [binary, "-f", *options, str(squash), str(mountpoint)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True, close_fds=True)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while time.monotonic() < deadline:
            entry = runtime.mount_table().get(runtime.real_path(mountpoint))
            if entry is not None and entry.fstype.startswith("fuse"):
                return server.pid
            if server.poll() is not None:
                message = log.read_text(errors="replace").strip().splitlines()
                raise MountError(f"{self.program} {squash}: "
                                 + (message[-1] if message else f"exit {server.returncode}"))
            time.sleep(0.02)
        server.kill()
        raise MountError(f"{self.program} {squash}: no mount after {MOUNT_TIMEOUT:.0f}s")

    def umount(self, mountpoint: Path, lazy: bool) -> None:
        fuse_unmount(mountpoint, lazy)

    def is_alive(self, mountpoint: Path) -> bool:
        return answers(mountpoint)


def _fuse_mounter() -> Mounter:
    # Imported when used (it brings pyfuse3 and trio); by name, since the fuse package
    # lives in fuse/ of the checkout and is mapped to squashstore.fuse only when installed.
    backend = importlib.import_module("squashstore.fuse.backend")
    mounter: Mounter = backend.FuseMounter()
    return mounter


BACKENDS: dict[str, Callable[[], Mounter]] = {
    "fuse": _fuse_mounter,
    "kernel": KernelMounter,
    "squashfuse": SquashfuseMounter,
}
FSTYPE_BACKENDS = {"fuse.squashstore": "fuse", "squashfs": "kernel",
                   "fuse.squashfuse_ll": "squashfuse", "fuse.squashfuse": "squashfuse"}
"""The file systems squashstore mounts: the only ones it ever unmounts."""


def default_backend() -> str:
    """``[mount] backend`` of the config, else ``fuse``: the project's own server (it works
    without root, and answers the metadata storms of imports from its caches)."""
    return runtime.config_value("mount", "backend", "fuse", tuple(BACKENDS))


def mounter(name: str | None = None) -> Mounter:
    name = name or default_backend()
    if name not in BACKENDS:
        raise MountError(f"unknown mount backend {name!r} (known: {', '.join(BACKENDS)})")
    return BACKENDS[name]()


def mounter_for_fstype(fstype: str) -> Mounter:
    if fstype.startswith("fuse") and fstype not in FSTYPE_BACKENDS:
        return SquashfuseMounter()
    return mounter(FSTYPE_BACKENDS.get(fstype, "kernel"))


@dataclass
class MountRecord:
    """The registry's knowledge of one mount."""

    image: str
    layer: str
    squash: str
    mountpoint: str
    backend: str
    pid: int | None
    since: float
    users: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


USER_SETUP_SECONDS = 120.0
"""How long a recorded use counts without its overlay being mounted (a starting container)."""


def _may_still_use(user: dict[str, Any], mounted: Mapping[str, object]) -> bool:
    """Whether a recorded use may still be live: its overlay is mounted, or it is recent.
    (The mount program records a use before the overlay exists; uses never pruned would
    grow the record with every container start.)"""
    merged = user.get("merged")
    if not isinstance(merged, str) or runtime.real_path(Path(merged)) in mounted:
        return True
    since = user.get("since")
    return not isinstance(since, int | float) or time.time() - since < USER_SETUP_SECONDS


class Registry:
    """The mount registry of this host / user namespace."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = directory or runtime.runtime_dir()
        self.records_dir = self.dir / "mounts"
        self.lock_file = self.dir / "lock"

    def _key(self, mountpoint: Path) -> str:
        return hashlib.sha256(runtime.real_path(mountpoint).encode()).hexdigest()[:32]

    def _record_path(self, mountpoint: Path) -> Path:
        return self.records_dir / f"{self._key(mountpoint)}.json"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The registry's lock: other processes and threads wait; nesting is allowed.

        As root, only a registry nobody else can change is used (`trust.check_top`)."""
        self.records_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        trust.check_top(self.dir, ("lock", "mounts"), what="a mount registry")
        with locking.reentrant(self.lock_file):
            yield

    def record(self, mountpoint: Path) -> MountRecord | None:
        try:
            data = json.loads(self._record_path(mountpoint).read_bytes())
            return MountRecord(**data)
        except (OSError, ValueError, TypeError):
            return None

    def records(self) -> list[MountRecord]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(self.records_dir.iterdir()):
                if entry.suffix != ".json":
                    continue
                with contextlib.suppress(OSError, ValueError, TypeError):
                    out.append(MountRecord(**json.loads(entry.read_bytes())))
        return out

    def write(self, record: MountRecord) -> None:
        """Store a record (call with `locked` held)."""
        atomic_write_json(self._record_path(Path(record.mountpoint)), record.to_json())

    def forget(self, mountpoint: Path) -> None:
        """Drop the record of ``mountpoint`` (call with `locked` held)."""
        with contextlib.suppress(FileNotFoundError):
            self._record_path(mountpoint).unlink()

    def ensure_mounted(self, image: str, layer: str, squash: Path, mountpoint: Path,
                       backend: str | None = None,
                       user: dict[str, Any] | None = None) -> MountRecord:
        """Mount ``squash`` on ``mountpoint`` unless a live mount is there; record ``user``."""
        with self.locked():
            record = self._live_record(image, layer, squash, mountpoint)
            if record is None:
                trust.check_mountpoint(mountpoint)
                trust.check_squash_file(squash)
                chosen = mounter(backend)
                pid = chosen.mount(squash, mountpoint)
                if pid is not None:
                    # The server serves every job's containers: it must not end with this one.
                    detach.leave_job(pid)
                record = MountRecord(image, layer, str(squash), runtime.real_path(mountpoint),
                                     chosen.name, pid, time.time())
            if user is not None:
                key = user.get("merged")
                mounted = runtime.mount_table()
                record.users = [u for u in record.users
                                if u.get("merged") != key and _may_still_use(u, mounted)]
                record.users.append(user)
            # Inside a batch job, the job claims the mount until its epilog (jobs.py).
            record.users = jobs.add_claim(record.users, jobs.current_job())
            self.write(record)
            return record

    def _live_record(self, image: str, layer: str, squash: Path,
                     mountpoint: Path) -> MountRecord | None:
        """The record of a live mount on ``mountpoint``; dead mounts are removed."""
        trust.check_unmount(mountpoint, None)
        entry = runtime.mount_table().get(runtime.real_path(mountpoint))
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
            record = MountRecord(image, layer, str(squash), runtime.real_path(mountpoint),
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
        entry = runtime.mount_table().get(runtime.real_path(mountpoint))
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
        entry = runtime.mount_table().get(runtime.real_path(mountpoint))
        return entry is not None and entry.fstype in FSTYPE_BACKENDS

    def umount_all(self, lazy: bool = False) -> list[tuple[MountRecord, bool]]:
        with self.locked():
            return [(r, self._umount_locked(Path(r.mountpoint), lazy)) for r in self.records()]

    def is_mounted(self, mountpoint: Path) -> bool:
        return runtime.is_mountpoint(mountpoint)
