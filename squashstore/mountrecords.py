"""The mount registry's records and lock, importing little (the mount program's fast path).

The registry lives in the runtime directory (see `squashstore.host.runtime_dir`): a lock
file and one JSON record per mount point (`MountRecord`: image id, layer id, squash file,
mount point, backend, server pid, since, and the container starts the mount program recorded
as `RecordedUse`). This module owns that format, the lock, which recorded uses are kept
(`add_user`), the file systems squashstore mounts (`FSTYPE_BACKENDS`, the only ones it ever
unmounts) and `use_if_live`: the whole of a container start whose layer is already mounted,
live and recorded. Mounting, unmounting and replacing dead mounts are
`squashstore.mounts.Registry`'s (a subclass), which needs the mounter backends. Paths are
strings inside (`path`, `records_path`, `lock_path`; the `Path` properties `dir`,
`records_dir` and `lock_file` are for other modules) and records are read and written with
`squashstore.jsonfast`: that fast path imports neither pathlib nor json (nor re).
"""

from __future__ import annotations

import errno
import os
import stat
import time

from squashstore import host, jobs, jsonfast, locking, trust
from squashstore.atomic import atomic_write
from squashstore.slots import Slots

TYPE_CHECKING = False  # not typing's: the mount program starts without importing typing
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path
    from typing import Any

    StrPath = str | os.PathLike[str]

FSTYPE_BACKENDS = {"fuse.squashstore": "fuse", "squashfs": "kernel",
                   "fuse.squashfuse_ll": "squashfuse", "fuse.squashfuse": "squashfuse"}
"""The file systems squashstore mounts: the only ones it ever unmounts."""


class RecordedUse(Slots):
    """A container start the mount program recorded on a mount (one entry of a record's
    ``users``): its overlay's merged directory and upperdir, the mount program's pid (which
    becomes the overlay's server) and when; a field an older record lacks is empty."""

    __slots__ = ("merged", "pid", "since", "upperdir")
    merged: str
    upperdir: str
    pid: int | None
    since: float | None

    def __init__(self, merged: str = "", upperdir: str = "", pid: int | None = None,
                 since: float | None = None) -> None:
        self.merged = merged
        self.upperdir = upperdir
        self.pid = pid
        self.since = since

    def to_json(self) -> dict[str, object]:
        return {"merged": self.merged, "upperdir": self.upperdir, "pid": self.pid,
                "since": self.since}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> RecordedUse:
        merged, upperdir = value.get("merged"), value.get("upperdir")
        pid, since = value.get("pid"), value.get("since")
        return cls(merged if isinstance(merged, str) else "",
                   upperdir if isinstance(upperdir, str) else "",
                   pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
                   float(since) if isinstance(since, int | float)
                   and not isinstance(since, bool) else None)


class MountRecord(Slots):
    """The registry's knowledge of one mount; `claims` are the batch jobs that claim it
    (see `squashstore.jobs`)."""

    __slots__ = (
        "backend",
        "claims",
        "image",
        "layer",
        "mountpoint",
        "pid",
        "since",
        "squash",
        "users",
    )
    image: str
    layer: str
    squash: str
    mountpoint: str
    backend: str
    pid: int | None
    since: float
    users: list[RecordedUse]
    claims: list[jobs.JobClaim]

    def __init__(self, image: str, layer: str, squash: str, mountpoint: str, backend: str,
                 pid: int | None, since: float, users: list[RecordedUse] | None = None,
                 claims: list[jobs.JobClaim] | None = None) -> None:
        self.image = image
        self.layer = layer
        self.squash = squash
        self.mountpoint = mountpoint
        self.backend = backend
        self.pid = pid
        self.since = since
        self.users = [] if users is None else users
        self.claims = [] if claims is None else claims

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass without frozen

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "layer": self.layer, "squash": self.squash,
                "mountpoint": self.mountpoint, "backend": self.backend, "pid": self.pid,
                "since": self.since, "users": [u.to_json() for u in self.users],
                "claims": [c.to_json() for c in self.claims]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MountRecord:
        """A record as `to_json` wrote it (TypeError when it is not one)."""
        users = data.get("users") or []
        if not isinstance(users, list):
            raise TypeError("users is not a list")
        claims = data.get("claims") or []
        if not isinstance(claims, list):
            raise TypeError("claims is not a list")
        fields = {k: v for k, v in data.items() if k not in ("users", "claims")}
        return cls(**fields, users=[RecordedUse.from_json(u) for u in users
                                    if isinstance(u, dict)],
                   claims=[c for c in map(jobs.JobClaim.from_json, claims) if c is not None])


_RECORD_TEXT = ("image", "layer", "squash", "mountpoint", "backend")


def parse_record(data: object) -> MountRecord | None:
    """A record file's JSON as a `MountRecord`, None when it is not one: wrong types, an
    empty or relative mount point, a NUL in a path (a damaged file must not make every
    command that lists mounts fail, nor hand cleanup an int where it expects a path)."""
    if not isinstance(data, dict):
        return None
    for key in _RECORD_TEXT:
        value = data.get(key)
        if not isinstance(value, str) or "\0" in value:
            return None
    pid, since = data.get("pid"), data.get("since")
    if not data["mountpoint"].startswith("/") or isinstance(pid, bool) or \
            not (pid is None or (isinstance(pid, int) and 0 < pid < 1 << 22)) or \
            isinstance(since, bool) or not isinstance(since, int | float) or \
            not 0 <= since < 1e11:
        return None
    known = {"users", "claims", *_RECORD_TEXT, "pid", "since"}
    try:
        return MountRecord.from_json({k: v for k, v in data.items() if k in known})
    except (TypeError, ValueError, AttributeError):
        return None


LOCK_MODE = locking.PRIVATE_MODE
"""The registry lock's mode: root's registry is in /run/squashstore (0755), and a local user
holding a read lock would hang every container start, cleanup and mount."""
RECORD_MAX = 16 << 20
"""Bytes of a record file read at most (a record grows by one entry per live container)."""


def _read_record(path: StrPath) -> MountRecord | None:
    """The record in `path` if it is a regular file of at most `RECORD_MAX` bytes (not
    through a symlink, never blocking on a FIFO); None when it is no record. OSError when it
    cannot be opened."""
    try:
        data = trust.read_regular(path, RECORD_MAX)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EFBIG):  # a FIFO, a huge file: no record
            return None
        raise
    if data is None:
        raise FileNotFoundError(errno.ENOENT, "gone", str(path))
    try:
        return parse_record(jsonfast.loads(data))
    except (ValueError, RecursionError):
        return None


def _may_still_use(user: RecordedUse, mounted: Mapping[str, object]) -> bool:
    """Whether a recorded use may still be live: its overlay is mounted, or it is recent.
    (The mount program records a use before the overlay exists; uses never pruned would
    grow the record with every container start.)"""
    if not user.merged or host.real_path(user.merged) in mounted:
        return True
    return user.since is None or time.time() - user.since < host.STARTING_WINDOW


class RecordRegistry:
    """The records and lock of the mount registry of this host / user namespace."""

    def __init__(self, directory: StrPath | None = None) -> None:
        self.path = os.fspath(directory) if directory else host.runtime_path()
        self.records_path = os.path.join(self.path, "mounts")
        self.lock_path = os.path.join(self.path, "lock")

    @property
    def dir(self) -> Path:
        from pathlib import Path

        return Path(self.path)

    @property
    def records_dir(self) -> Path:
        from pathlib import Path

        return Path(self.records_path)

    @property
    def lock_file(self) -> Path:
        from pathlib import Path

        return Path(self.lock_path)

    def _key(self, mountpoint: StrPath) -> str:
        try:  # hashlib loads OpenSSL: ~11 M instructions of every container start
            from _sha256 import sha256  # type: ignore[import-not-found]
        except ImportError:  # an interpreter without that module (3.12 has _sha2)
            from hashlib import sha256
        digest: str = sha256(host.real_path(mountpoint).encode()).hexdigest()
        return digest[:32]

    def _record_file(self, mountpoint: StrPath) -> str:
        return os.path.join(self.records_path, f"{self._key(mountpoint)}.json")

    def _record_path(self, mountpoint: StrPath) -> Path:
        from pathlib import Path

        return Path(self._record_file(mountpoint))

    def locked(self) -> locking.reentrant:
        """The registry's lock (``with registry.locked():``): other processes and threads
        wait; nesting is allowed.

        As root, only a registry nobody else can change is used (`trust.check_top`); its
        lock file is its owner's alone (`LOCK_MODE`)."""
        os.makedirs(self.records_path, mode=0o755, exist_ok=True)
        trust.check_top(self.path, ("lock", "mounts"), what="a mount registry")
        return locking.reentrant(self.lock_path, mode=LOCK_MODE)

    def record(self, mountpoint: StrPath) -> MountRecord | None:
        try:
            with open(self._record_file(mountpoint), "rb") as file:
                return parse_record(jsonfast.loads(file.read()))
        except (OSError, ValueError, RecursionError):
            return None

    def _files(self) -> list[tuple[str, MountRecord | None]]:
        """Every regular ``*.json`` file of the records directory with its record (None:
        not one); symlinks, FIFOs and the like are never opened through."""
        out: list[tuple[str, MountRecord | None]] = []
        try:
            names = sorted(os.listdir(self.records_path))
        except FileNotFoundError:
            return out
        for name in names:
            if name.endswith(".json"):
                try:  # noqa: SIM105 (contextlib is not on the mount program's path)
                    out.append((name, _read_record(os.path.join(self.records_path, name))))
                except OSError:
                    pass
        return out

    def records(self) -> list[MountRecord]:
        return [record for _, record in self._files() if record is not None]

    def tidy(self) -> list[str]:
        """With `locked` held: deal with record files not named by their mount point's key,
        which `forget` would never remove: one whose key has no record is renamed to it (the
        mount stays known), any other is removed, as is a file that is no record at all.
        Only regular files this user owns, directly in the records directory, are touched
        (a rename or unlink never follows a symlink). Returns what it did, one line each."""
        done = []
        for name, record in self._files():
            path = os.path.join(self.records_path, name)
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    continue
                if record is not None:
                    right = self._record_file(record.mountpoint)
                    right_name = os.path.basename(right)
                    if right_name == name:
                        continue
                    if not os.path.lexists(right):
                        os.rename(path, right)
                        done.append(f"renamed stray record {name} to {right_name}")
                        continue
                os.unlink(path)
                done.append(f"removed {'stray' if record else 'damaged'} record {name}")
            except OSError as exc:
                done.append(f"stray record {name}: {exc.strerror}")
        return done

    def write(self, record: MountRecord) -> None:
        """Store a record (call with `locked` held): one line of JSON. Not fsynced: a record
        describes mounts and processes a reboot erases, and a torn record reads as absent."""
        atomic_write(self._record_file(record.mountpoint),
                     (jsonfast.dumps(record.to_json()) + "\n").encode(), durable=False)

    def forget(self, mountpoint: StrPath) -> None:
        """Drop the record of ``mountpoint`` (call with `locked` held)."""
        try:  # noqa: SIM105 (contextlib is not on the mount program's path)
            os.unlink(self._record_file(mountpoint))
        except FileNotFoundError:
            pass

    @staticmethod
    def add_user(record: MountRecord, user: RecordedUse,
                 mounted: Mapping[str, object]) -> None:
        """Record a container start `user` on `record` (dropping its earlier entry and uses
        no longer live); inside a batch job, the job claims the mount until its epilog
        (`squashstore.jobs`)."""
        record.users = [u for u in record.users
                        if u.merged != user.merged and _may_still_use(u, mounted)]
        record.users.append(user)
        record.claims = jobs.add_claim(record.claims, jobs.current_job())

    def use_if_live(self, mountpoint: StrPath, user: RecordedUse) -> MountRecord | None:
        """With `locked` held: when a squash mount that this registry recorded is on
        `mountpoint` and answers (`host.answers`), record `user` on it and return the
        record. None otherwise: the caller mounts, adopts or replaces a dead mount
        (`squashstore.mounts.Registry.ensure_mounted`). A mount point reached through a
        symlink, or a file system other than a squash mount there, raises `UnsafeStore`."""
        trust.check_unmount(mountpoint, None)
        mounted = host.mount_table()
        entry = mounted.get(host.real_path(mountpoint))
        record = self.record(mountpoint) if entry is not None else None
        if entry is None or record is None:
            return None
        trust.check_unmount(mountpoint, entry.fstype, FSTYPE_BACKENDS)
        if not host.answers(mountpoint):
            return None
        self.add_user(record, user, mounted)
        self.write(record)
        return record
