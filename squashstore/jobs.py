"""Batch jobs as users of a squash mount: job claims in the mount registry's records.

A mount made inside a Slurm job (the mount program under ``srun podman run``, ``squashstore
mount`` in a job script, or the node prolog for the images a job declares) is *claimed* by
that job: its record's ``users`` list gets ``{"job": ID, "node": NODE, "since": T}`` beside
the containers the mount program records. A claim is not a container and existing cleanup
ignores it (no ``merged``, no ``pid``); the Slurm epilog (`squashstore.slurm`) keeps a mount
that a job still on the node claims, and drops the ending job's claims. Which jobs are still on
this node is read from ``/proc``: every Slurm job step has a ``slurmstepd: [JOB.STEP]`` process
on the node while it runs (no call to slurmctld: epilogs must not wait on it). Only the
processes in our UTS namespace count (one host; several slurmd on one machine give each its
own, see tests/support/slurm.py). This module is pure data and ``/proc`` reading: no mounts.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLAIM_SETUP_SECONDS = 120.0
"""A claim this young counts even before its job has a step on the node (the prolog runs
before the first step's slurmstepd exists)."""

_STEPD = re.compile(rb"^slurmstepd: \[(\d+)(?:_\d+)?\.[^\]]+\]")


@dataclass(frozen=True)
class JobClaim:
    """A job's claim on a mount."""

    job: str
    node: str = ""
    since: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "node": self.node, "since": self.since}


def current_job(env: Mapping[str, str] | None = None) -> JobClaim | None:
    """The job this process runs in (``SLURM_JOB_ID``), None outside Slurm."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or ""
    if not job.isdigit():
        return None
    return JobClaim(job, env.get("SLURMD_NODENAME", ""), time.time())


def is_claim(user: Mapping[str, Any]) -> bool:
    return isinstance(user.get("job"), str) and "merged" not in user


def claims(users: Iterable[Mapping[str, Any]]) -> list[JobClaim]:
    out = []
    for user in users:
        if is_claim(user):
            since = user.get("since")
            out.append(JobClaim(str(user["job"]), str(user.get("node", "")),
                                float(since) if isinstance(since, int | float) else 0.0))
    return out


def add_claim(users: list[dict[str, Any]], claim: JobClaim | None) -> list[dict[str, Any]]:
    """``users`` with ``claim`` in it (one claim per job, the newest)."""
    if claim is None:
        return users
    kept = [u for u in users if not (is_claim(u) and u.get("job") == claim.job)]
    return [*kept, claim.to_json()]


def drop_claims(users: list[dict[str, Any]], job: str) -> list[dict[str, Any]]:
    return [u for u in users if not (is_claim(u) and u.get("job") == job)]


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def jobs_on_node() -> set[str]:
    """Ids of the jobs with a running step (a ``slurmstepd``) on this host."""
    uts = _readlink("/proc/self/ns/uts")
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            title = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        match = _STEPD.match(title)
        if match and _readlink(f"/proc/{entry.name}/ns/uts") == uts:
            found.add(match.group(1).decode())
    return found


def live_claims(users: Iterable[Mapping[str, Any]], running: set[str],
                now: float) -> list[JobClaim]:
    """The claims of jobs still on the node (or claimed moments ago)."""
    return [c for c in claims(users)
            if c.job in running or now - c.since < CLAIM_SETUP_SECONDS]
