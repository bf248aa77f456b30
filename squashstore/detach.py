"""Leaving the caller's process tracking: a FUSE server outlives the job that started it.

A squash mount is shared by every container on a host, but its FUSE server is started by
whichever container start (the mount program, inside some batch job) needed the image first.
A batch system that tracks a job's processes by cgroup (Slurm's ``proctrack/cgroup``, on
cgroup v1 by the ``freezer`` hierarchy, on v2 by ``system.slice/slurmstepd.scope/job_N``) kills
every process in the job's cgroups when the job ends, the server included, and every other
job's container reading from that mount then gets ENOTCONN (or SIGBUS on a mapped file).
`leave_job` moves a freshly started server out: in every cgroup hierarchy (each v1 hierarchy and
the v2 tree) in which the server sits below a Slurm cgroup (a path component ``slurm``,
``slurm_<node>`` or ``slurmstepd.scope``), it is written into the sibling cgroup
`CGROUP_NAME` next to Slurm's top cgroup (``/sys/fs/cgroup/freezer/squashstore`` when Slurm's
is ``/sys/fs/cgroup/freezer/slurm``), which no job owns. That needs real root; an ordinary user
cannot move a process out of cgroups root made, so a rootless server stays in the job
(the mount registry's dead-mount recovery then replaces it at the next container start; see
NOTES.md). ``proctrack/linuxproc`` and ``proctrack/pgid`` track by process ancestry and
process group: the server is already out of both (its own session, and orphaned once the mount
program exits), so nothing is needed there. Failing to move is never fatal: the mount works,
only its lifetime stays tied to the job; the reason is returned for the record and the log.
"""

from __future__ import annotations

from pathlib import Path

from squashstore import host
from squashstore.slots import Slots

CGROUP_NAME = "squashstore"
"""The cgroup, next to Slurm's top cgroup, that holds the servers moved out of jobs."""

JOB_CGROUPS = ("slurm", "slurmstepd.scope")
"""Path components where a job tracker's cgroups begin (``slurm_<node>`` too: several slurmd
on one host name theirs so)."""


class Membership(Slots):
    """One line of ``/proc/PID/cgroup``: a hierarchy and the process's cgroup in it (a
    `Slots` record: the mount program calls `leave_job` at every first start of an image on
    a FUSE backend, and ``dataclasses`` costs ~41 M instructions to import)."""

    __slots__ = ("controllers", "hierarchy", "path")
    hierarchy: int
    controllers: tuple[str, ...]
    """The v1 controllers (``("cpu", "cpuacct")``, ``("name=systemd",)``); () for v2."""
    path: str

    def __init__(self, hierarchy: int, controllers: tuple[str, ...], path: str) -> None:
        self.hierarchy = hierarchy
        self.controllers = controllers
        self.path = path


def parse_cgroups(text: str) -> list[Membership]:
    out = []
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number.isdigit() and path.startswith("/"):
            out.append(Membership(int(number), tuple(c for c in controllers.split(",") if c),
                                  path))
    return out


def memberships(pid: int | str = "self") -> list[Membership]:
    try:
        return parse_cgroups(Path(f"/proc/{pid}/cgroup").read_text())
    except OSError:
        return []


def job_parent(path: str) -> str | None:
    """The cgroup to move to from ``path``: `CGROUP_NAME` beside the first job tracker
    component (None when ``path`` is in no job's cgroup)."""
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        if part in JOB_CGROUPS or part.startswith("slurm_"):
            return "/" + "/".join([*parts[:i], CGROUP_NAME])
    return None


def hierarchy_root(membership: Membership,
                   entries: list[host.MountEntry]) -> Path | None:
    """Where the hierarchy of ``membership`` is mounted (v1: the ``cgroup`` mount whose
    options name its controllers; v2: the ``cgroup2`` mount)."""
    for entry in entries:
        if not membership.controllers and entry.fstype == "cgroup2":
            return Path(entry.mountpoint)
        if membership.controllers and entry.fstype == "cgroup":
            options = set(entry.super_options.split(","))
            if set(membership.controllers) <= options:
                return Path(entry.mountpoint)
    return None


def moves(pid: int, entries: list[host.MountEntry] | None = None
          ) -> list[tuple[Membership, Path]]:
    """The ``cgroup.procs`` files ``pid`` must be written to, to leave every job's cgroup."""
    entries = host.read_mountinfo() if entries is None else entries
    out = []
    for membership in memberships(pid):
        target = job_parent(membership.path)
        root = hierarchy_root(membership, entries) if target else None
        if target and root is not None:
            out.append((membership, root / target.lstrip("/") / "cgroup.procs"))
    return out


def leave_job(pid: int) -> str:
    """Move process ``pid`` (and its threads) out of every job cgroup it is in; returns ""
    when done or nothing was needed, else why it stays in the job (never raises)."""
    planned = moves(pid)
    if not planned:
        return ""
    if not host.is_real_root():
        return "not root: the server stays in the job's cgroups"
    failed = []
    for membership, procs in planned:
        try:
            procs.parent.mkdir(mode=0o755, exist_ok=True)
            with open(procs, "w") as file:
                file.write(f"{pid}\n")
        except OSError as exc:
            failed.append(f"{','.join(membership.controllers) or 'v2'}: "
                          f"{exc.strerror or exc}")
    return ("cannot leave the job's cgroups (" + "; ".join(failed) + ")") if failed else ""


def in_job(pid: int | str = "self") -> bool:
    """Whether a process is in some job tracker's cgroup."""
    return any(job_parent(m.path) for m in memberships(pid))


def describe(pid: int) -> str:
    """``pid``'s cgroups, one ``controllers:path`` per hierarchy (for messages)."""
    return " ".join(f"{','.join(m.controllers) or 'v2'}:{m.path}" for m in memberships(pid))

