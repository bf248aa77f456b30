"""Slurm's node prolog and epilog for squash mounts (``contrib/slurm/{prolog,epilog}``).

slurmd runs the prolog and the epilog as root on every node of a job, at its start and end,
with ``SLURM_JOB_ID``, ``SLURM_JOB_UID``, ``SLURM_JOB_USER``, ``SLURMD_NODENAME`` and (22.05)
``SLURM_JOB_COMMENT`` in an otherwise almost empty environment (no ``PATH``; the job's own
environment is not there). `epilog` drops the ending job's claims (see `squashstore.jobs`) and,
under the mount registry's lock, unmounts every squash mount of this node that no running,
paused or starting container and no other job still on the node uses, at once (no grace
period: the node is held until the epilog ends), and recovers dead mounts (a killed server:
unmounted, record dropped). `prolog` mounts the images a job declares in its comment
(``sbatch --comment "squashstore=IMAGE[,IMAGE...]"``, see `declared_images`) and claims them
for the job, so its first container starts on a mounted image; a declaration it cannot honour
is reported on stderr (slurmd's log) and never fails the job: the mount program mounts on
demand anyway, and a failing prolog would drain the node.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from squashstore import cleanup, jobs
from squashstore import config as configuration
from squashstore.errors import printable
from squashstore.image import SquashstoreError
from squashstore.mounts import Registry
from squashstore.store import Store

COMMENT_KEY = "squashstore"
"""``squashstore=IMAGE[,IMAGE...]`` in a job's comment declares the images to premount."""
MAX_DECLARED = 16
"""The most images one job's comment premounts: each mount is a FUSE server of its own
(tens of MB), and any user writes the comment."""


class SlurmError(SquashstoreError):
    """Not run the way slurmd runs a prolog or an epilog."""


@dataclass(frozen=True)
class JobContext:
    """What slurmd tells a prolog or epilog about the job."""

    job: str
    uid: int = 0
    user: str = ""
    node: str = ""
    comment: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str], job: str | None = None) -> JobContext:
        given = job is not None
        job = job or env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or ""
        if not job:
            raise SlurmError("no Slurm job: SLURM_JOB_ID is not set (run by slurmd as "
                             "Prolog=/Epilog=, or give --job)")
        if not (job.isascii() and job.isdigit()):
            where = "--job" if given else "SLURM_JOB_ID"
            raise SlurmError(f"{where} {' '.join(job.split())[:40]!r} is not a Slurm job id "
                             "(digits)")
        uid = env.get("SLURM_JOB_UID", "0")
        return cls(job, int(uid) if uid.isascii() and uid.isdigit() else 0,
                   env.get("SLURM_JOB_USER", ""), env.get("SLURMD_NODENAME", ""),
                   env.get("SLURM_JOB_COMMENT", ""))


def declared_images(comment: str) -> list[str]:
    """The images a job comment declares: ``squashstore=A,B`` (also ``squashstore:A``),
    among other words of the comment separated by blanks or ``;``."""
    out: list[str] = []
    for word in re.split(r"[\s;]+", comment):
        key, sep, value = word.partition("=")
        if not sep:
            key, sep, value = word.partition(":")
        if sep and key == COMMENT_KEY:
            out += [v for v in value.split(",") if v and v not in out]
    return out


@dataclass
class PrologResult:
    mounted: list[str]
    """Mount points now claimed by the job."""
    errors: list[str]
    """One line per declared image that could not be mounted."""


def prolog(ctx: JobContext, store: Store, registry: Registry | None = None) -> PrologResult:
    """Mount and claim every image ``ctx``'s comment declares (from ``store``)."""
    registry = registry or Registry()
    claim = jobs.JobClaim(ctx.job, ctx.node, time.time())
    result = PrologResult([], [])
    declared = declared_images(ctx.comment)
    if len(declared) > MAX_DECLARED:
        result.errors.append(f"{len(declared)} images declared: only the first "
                             f"{MAX_DECLARED} are premounted")
    for name in declared[:MAX_DECLARED]:
        try:
            image = store.resolve(name)
            with registry.locked():
                record = registry.ensure_mounted(image.id, image.layer, image.squash,
                                                 image.diff)
                record.claims = jobs.add_claim(record.claims, claim)
                registry.write(record)
            result.mounted.append(record.mountpoint)
        except (SquashstoreError, OSError) as exc:
            line = printable(f"{name}: {exc}")  # names come from a comment any user writes
            result.errors.append(line if len(line) <= 300 else line[:300] + "...")
    return result


def release(registry: Registry, job: str) -> None:
    """Drop ``job``'s claims from every record (call under the registry's lock)."""
    for record in registry.records():
        if any(c.job == job for c in record.claims):
            record.claims = jobs.drop_claims(record.claims, job)
            registry.write(record)


def claimed(registry: Registry, now: float) -> dict[str, list[jobs.JobClaim]]:
    """Mount point -> the claims of jobs still on this node."""
    running = jobs.jobs_on_node()
    out = {}
    for record in registry.records():
        live = jobs.live_claims(record.claims, running, now)
        if live:
            out[record.mountpoint] = live
    return out


def epilog(ctx: JobContext, store_roots: Iterable[Path] = (),
           registry: Registry | None = None,
           settings: configuration.Config | None = None) -> list[cleanup.Outcome]:
    """Unmount at once what no container and no other job on this node uses; recover dead
    mounts; forget the ending job."""
    registry = registry or Registry()
    settings = configuration.load() if settings is None else settings
    with registry.locked():
        now = time.time()
        release(registry, ctx.job)
        owned = claimed(registry, now)
        states = cleanup.observe(registry, store_roots, settings, now)
        kept, rest = [], []
        for state in states:
            owners = owned.get(state.mountpoint)
            if owners and state.fstype is not None and state.alive and not state.users:
                names = ", ".join(f"job {c.job}" for c in owners)
                kept.append(cleanup.Decision(state, cleanup.KEEP, f"claimed by {names}"))
            else:
                rest.append(state)
        decisions = kept + cleanup.decide(rest, now, grace=0.0, min_age=0.0)
        return [cleanup.carry_out(registry, d, now) for d in decisions]

