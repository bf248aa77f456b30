"""The host squashstore runs on, as the kernel shows it: /proc, mount tables, processes.

This module owns every fact squashstore reads about the running system and every wait on
it: the per-host state directory (`runtime_dir`: ``$SQUASHSTORE_RUNTIME_DIR``, else
``/run/squashstore`` for real root, else ``$XDG_RUNTIME_DIR/squashstore`` or
``/run/user/UID/squashstore``) and the log files of the FUSE servers in it; user namespaces
(``/proc/self/uid_map``: real root, the uid outside); every scan of ``/proc`` (process
command lines, mount namespaces, this process's descriptors); the mount table (the one
``mountinfo`` parser, this namespace's mounts, the devices other namespaces mount);
process identity that survives pid reuse (`ProcessId`: host, pid, kernel start time) and
process age; whether a mount still answers (`probe`, statfs in a thread); the one
``fusermount3 -u`` command; and each timeout and window, defined once: `MOUNT_TIMEOUT`,
`LIVENESS_TIMEOUT`, `STARTING_WINDOW`.
"""

from __future__ import annotations

import _thread
import errno
import os

from squashstore.slots import Slots

TYPE_CHECKING = False  # not typing's: the mount program starts without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    StrPath = str | os.PathLike[str]

MOUNT_TIMEOUT = 30.0
"""Seconds a FUSE server may take until its mount appears and answers."""
LIVENESS_TIMEOUT = 5.0
"""Seconds a mount gets to answer statfs before it counts as hung (dead)."""
POLL_INTERVAL = 0.02
"""Seconds between two looks while waiting for a mount to appear or a server to exit."""
STARTING_WINDOW = 120.0
"""Seconds a container start the mount program recorded counts as a use before its overlay
is mounted (the mount program records the use, then podman mounts the overlay)."""


# ---------------------------------------------------------------------------------------
# User namespaces and the per-host state directory.


def outside_uid(uid_map: str) -> int | None:
    """The uid outside a user namespace that uid 0 inside maps to (``/proc/self/uid_map``)."""
    for line in uid_map.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == "0":
            return int(fields[1])
    return None


def own_uid_map() -> str | None:
    """This process's ``/proc/self/uid_map``, None when it cannot be read."""
    try:
        with open("/proc/self/uid_map") as file:
            return file.read()
    except OSError:
        return None


_OWN_UID_MAP: list[str | None] = []
"""`own_uid_map`, read once: a process's user namespace never changes (squashstore enters
podman's by re-exec'ing itself), and root's checks ask at every path they check."""


def is_real_root() -> bool:
    """Root in the initial user namespace (not root inside a rootless user namespace)."""
    if os.geteuid() != 0:
        return False
    if not _OWN_UID_MAP:
        _OWN_UID_MAP.append(own_uid_map())
    uid_map = _OWN_UID_MAP[0]
    if uid_map is None:
        return True
    return uid_map.split()[:3] == ["0", "0", "4294967295"]


def runtime_dir() -> Path:
    """Per-host (per user namespace) state: the mount registry lives here."""
    from pathlib import Path  # the mount program asks `runtime_path`

    return Path(runtime_path())


def runtime_path() -> str:
    """`runtime_dir` as a string (the mount program starts without pathlib)."""
    env = os.environ.get("SQUASHSTORE_RUNTIME_DIR")
    if env:
        return env
    if is_real_root():
        return "/run/squashstore"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "squashstore")
    return f"/run/user/{os.getuid()}/squashstore"


def server_log(mountpoint: Path, backend: str) -> Path:
    """Where the FUSE server of `backend` for `mountpoint` logs when nothing else is asked:
    ``<runtime dir>/logs/<backend>-<key>.log`` (the directory is made)."""
    from pathlib import Path

    directory = Path(runtime_path()) / "logs"
    directory.mkdir(parents=True, exist_ok=True)
    import hashlib  # imported when used: the mount program starts fast

    key = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:24]
    return directory / f"{backend}-{key}.log"


# ---------------------------------------------------------------------------------------
# Processes.


class ProcessId(Slots):
    """A process identity that survives pid reuse: host, pid and kernel start time."""

    __slots__ = ("host", "pid", "start")
    host: str
    pid: int
    start: int

    def __init__(self, host: str, pid: int, start: int) -> None:
        self.host = host
        self.pid = pid
        self.start = start

    def tag(self) -> str:
        return f"{self.host}.{self.pid}.{self.start}"

    @classmethod
    def parse(cls, tag: str) -> ProcessId | None:
        host, _, rest = tag.rpartition(".")
        host, _, pid = host.rpartition(".")
        try:
            return cls(host, int(pid), int(rest))
        except ValueError:
            return None

    def is_alive(self) -> bool:
        """Whether this process still runs (unknown for other hosts: assumed alive)."""
        if self.host != hostname():
            return True
        return process_start(self.pid) == self.start


def hostname() -> str:
    # uname's nodename is what gethostname(2) returns on Linux; importing socket for it
    # cost ~15 M instructions of every container start (the mount program's temp names)
    return os.uname().nodename.replace(".", "_") or "localhost"


def process_start(pid: int) -> int | None:
    """The kernel start time (clock ticks since boot) of ``pid``, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            stat = file.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def me() -> ProcessId:
    start = process_start(os.getpid())
    return ProcessId(hostname(), os.getpid(), start or 0)


def process_age(pid: int) -> float | None:
    """Seconds since ``pid`` started (None when it is gone)."""
    start = process_start(pid)
    if start is None:
        return None
    try:
        with open("/proc/uptime") as file:
            uptime = float(file.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start / os.sysconf("SC_CLK_TCK")


def pids() -> Iterator[int]:
    """The ids of the processes visible in ``/proc`` now."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def cmdline(pid: int) -> list[bytes] | None:
    """A process's command line (arguments as bytes), None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            raw = file.read()
    except OSError:
        return None
    return raw.split(b"\0")[:-1] if raw.endswith(b"\0") else raw.split(b"\0")


def commands_named(program: str) -> list[list[str]]:
    """The command lines of the processes whose ``argv[0]`` has basename `program`."""
    out = []
    for pid in pids():
        argv = cmdline(pid)
        if argv and os.path.basename(argv[0]) == program.encode():
            out.append([a.decode(errors="surrogateescape") for a in argv])
    return out


def names_argument(pid: int, argument: str) -> bool:
    """Whether process `pid` runs with `argument` among its arguments (a FUSE server serving
    that mount point, and not a recycled pid)."""
    argv = cmdline(pid)
    return argv is not None and argument.encode() in argv


def server_pid(mountpoint: str) -> int | None:
    """The pid of a FUSE server whose command line names ``mountpoint`` (adopted mounts)."""
    for pid in pids():
        if pid != os.getpid() and names_argument(pid, mountpoint):
            return pid
    return None


def open_files_under(directory: str) -> set[str]:
    """The paths below `directory` any process we can see has open (``/proc/PID/fd``)."""
    prefix = directory.rstrip("/") + "/"
    found = set()
    for pid in pids():
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith(prefix):
                found.add(target)
    return found


def open_descriptors_of(target: str) -> list[int]:
    """This process's file descriptors open on `target` (e.g. ``/dev/fuse``)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == target:
                found.append(int(name))
        except OSError:
            continue
    return found


# ---------------------------------------------------------------------------------------
# Mount tables.


def _unescape_mountinfo(field: str) -> str:
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


class MountEntry(Slots):
    """One line of a ``mountinfo`` file; `device` is ``major:minor`` of the mounted file
    system (the same in every mount namespace)."""

    __slots__ = ("device", "fstype", "mount_id", "mountpoint", "source", "super_options")
    mountpoint: str
    fstype: str
    source: str
    mount_id: int
    device: str
    super_options: str

    def __init__(self, mountpoint: str, fstype: str, source: str, mount_id: int = 0,
                 device: str = "", super_options: str = "") -> None:
        self.mountpoint = mountpoint
        self.fstype = fstype
        self.source = source
        self.mount_id = mount_id
        self.device = device
        self.super_options = super_options


def parse_mountinfo(text: str) -> list[MountEntry]:
    """The lines of a ``/proc/PID/mountinfo`` file."""
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 2:
            continue
        out.append(MountEntry(_unescape_mountinfo(fields[4]), rfields[0],
                              _unescape_mountinfo(rfields[1]), int(fields[0]), fields[2],
                              rfields[2] if len(rfields) > 2 else ""))
    return out


def read_mountinfo(pid: int | str = "self") -> list[MountEntry]:
    """A process's mount table (empty when it is gone or not ours to read)."""
    try:
        with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as file:
            return parse_mountinfo(file.read())
    except OSError:
        return []


def mount_table() -> dict[str, MountEntry]:
    """The current mount namespace's mounts by mount point (the topmost one wins)."""
    return {entry.mountpoint: entry for entry in read_mountinfo()}


def is_mountpoint(path: StrPath) -> bool:
    """Whether ``path`` is a mount point; unlike os.path.ismount, true for dead FUSE mounts."""
    return real_path(path) in mount_table()


def real_path(path: StrPath) -> str:
    """``path`` with its parent's symlinks resolved, never stat-ing ``path`` itself."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(parent), name)


def other_namespace_devices() -> dict[str, int]:
    """Device numbers mounted in mount namespaces other than ours, with how many namespaces.

    One process per namespace is read (``/proc/PID/ns/mnt`` tells them apart).
    """
    try:
        mine = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return {}
    seen = {mine}
    counts: dict[str, int] = {}
    for pid in pids():
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            continue
        if namespace in seen:
            continue
        seen.add(namespace)
        for device in {m.device for m in read_mountinfo(pid)}:
            counts[device] = counts.get(device, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------
# Whether a mount answers, and FUSE unmounts.


def probe(mountpoint: StrPath, timeout: float = LIVENESS_TIMEOUT) -> bool | None:
    """Whether a mount serves: True, False when dead (a FUSE mount whose server died gives
    ENOTCONN), None when it gave no answer within `timeout` (a hung server; the call would
    block forever, so it runs in a thread). Other errors count as serving: never unmount
    blindly.

    statfs, not stat: with long attribute timeouts the kernel answers stat of a dead
    server's root from its cache, while statfs always reaches the server.
    """
    answer: list[bool] = []
    done = _thread.allocate_lock()  # _thread, not threading: the mount program starts fast
    done.acquire()

    def ask() -> None:
        try:
            os.statvfs(mountpoint)
        except OSError as exc:
            answer.append(exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO))
        else:
            answer.append(True)
        finally:
            done.release()

    # a daemon thread: the interpreter never waits for it at exit (a hung statfs)
    _thread.start_new_thread(ask, ())
    done.acquire(timeout=timeout)
    return answer[0] if answer else None


def answers(mountpoint: StrPath) -> bool:
    """Whether a mount serves within `LIVENESS_TIMEOUT` (dead and hung mounts do not)."""
    return probe(mountpoint) is True


def fusermount_unmount(mountpoint: Path, lazy: bool, quiet: bool = False) -> str | None:
    """``fusermount3 -u [-z] [-q] MOUNTPOINT``: None when it worked, else its last error line."""
    argv = ["fusermount3", "-u", *(["-z"] if lazy else []), *(["-q"] if quiet else []),
            str(mountpoint)]
    import subprocess  # imported when used: the mount program starts fast

    proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    if proc.returncode == 0:
        return None
    lines = (proc.stderr.strip() or f"exit status {proc.returncode}").splitlines()
    return lines[-1]
