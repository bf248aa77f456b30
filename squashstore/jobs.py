"""Batch jobs as users of a squash mount: job claims in the mount registry's records.

A mount made inside a Slurm job (the mount program under ``srun podman run``, ``squashstore
mount`` in a job script, or the node prolog for the images a job declares) is *claimed* by
that job: its record's ``claims`` list gets ``{"job": ID, "node": NODE, "since": T}``, apart
from the container starts the mount program records in ``users``. Cron's cleanup ignores
claims; the Slurm epilog (`squashstore.slurm`) keeps a mount
that a job still on the node claims, and drops the ending job's claims. Which jobs are still on
this node is read from ``/proc``: every Slurm job step has a ``slurmstepd: [JOB.STEP]`` process
on the node while it runs (no call to slurmctld: epilogs must not wait on it). Only the
processes in our UTS namespace count (one host; several slurmd on one machine give each its
own, see tests/support/slurm.py). This module is pure data and ``/proc`` reading: no mounts.
"""

from __future__ import annotations

import os
import time
from _collections_abc import Mapping  # not collections.abc: the mount program starts fast

from squashstore.slots import Slots

TYPE_CHECKING = False  # not typing's: the mount program starts without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterable

CLAIM_SETUP_SECONDS = 120.0
"""A claim this young counts even before its job has a step on the node (the prolog runs
before the first step's slurmstepd exists)."""

STEPD = rb"^slurmstepd: \[(\d+)(?:_\d+)?\.[^\]]+\]"
"""A job step's process title (compiled where used: the mount program imports no re)."""


class JobClaim(Slots):
    """A job's claim on a mount (an entry of `squashstore.mounts.MountRecord.claims`)."""

    __slots__ = ("job", "node", "since")
    job: str
    node: str
    since: float

    def __init__(self, job: str, node: str = "", since: float = 0.0) -> None:
        self.job = job
        self.node = node
        self.since = since

    def to_json(self) -> dict[str, object]:
        return {"job": self.job, "node": self.node, "since": self.since}

    @classmethod
    def from_json(cls, value: object) -> JobClaim | None:
        """A claim as the record stores it; None for anything else."""
        if not isinstance(value, Mapping) or not isinstance(value.get("job"), str):
            return None
        node, since = value.get("node"), value.get("since")
        return cls(value["job"], node if isinstance(node, str) else "",
                   float(since) if isinstance(since, int | float)
                   and not isinstance(since, bool) else 0.0)


def current_job(env: Mapping[str, str] | None = None) -> JobClaim | None:
    """The job this process runs in (``SLURM_JOB_ID``), None outside Slurm."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or ""
    if not (job.isascii() and job.isdigit()):
        return None
    return JobClaim(job, env.get("SLURMD_NODENAME", ""), time.time())


def add_claim(claims: list[JobClaim], claim: JobClaim | None) -> list[JobClaim]:
    """``claims`` with ``claim`` in it (one claim per job, the newest)."""
    if claim is None:
        return claims
    return [*(c for c in claims if c.job != claim.job), claim]


def drop_claims(claims: list[JobClaim], job: str) -> list[JobClaim]:
    return [c for c in claims if c.job != job]


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def jobs_on_node() -> set[str]:
    """Ids of the jobs with a running step (a ``slurmstepd``, which runs as root) on this
    host. Any user can name a process ``slurmstepd: [JOB.0]``: only root's count, or a
    user could keep another job's mounts claimed for as long as they like."""
    import re

    stepd = re.compile(STEPD)
    uts = _readlink("/proc/self/ns/uts")
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as file:
                title = file.read()
            if not title.startswith(b"slurmstepd:") or entry.stat().st_uid != 0:
                continue
        except OSError:
            continue
        match = stepd.match(title)
        if match and _readlink(f"/proc/{entry.name}/ns/uts") == uts:
            found.add(match.group(1).decode())
    return found


def live_claims(claims: Iterable[JobClaim], running: set[str], now: float) -> list[JobClaim]:
    """The claims of jobs still on the node (or claimed moments ago)."""
    return [c for c in claims if c.job in running or now - c.since < CLAIM_SETUP_SECONDS]
