"""Cleanup commands: ``cleanup [--dry-run] [--grace SECONDS] [--format json]`` and ``slurm
prolog|epilog [--job ID]`` (what ``contrib/slurm/{prolog,epilog}`` run), over
`squashstore.cleanup` and `squashstore.slurm` (``hook poststop``, the OCI hook entry, is
`squashstore.cli.hook`'s, which also prints the outcomes: `report`).

``cleanup`` prints one line per mount it acted on (``--dry-run``: would act on) and exits 1 with
one ``squashstore: `` line per failure on stderr when any action failed. ``--format json``
prints every mount considered, kept ones included.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from squashstore import cleanup, config, slurm
from squashstore.cli.hook import report as report
from squashstore.cli.output import add_format_option, seconds
from squashstore.errors import SquashstoreError, printable
from squashstore.mounts import Registry
from squashstore.store import Store


def cmd_cleanup(args: argparse.Namespace) -> int:
    settings = config.load()
    grace = settings.cleanup.grace if args.grace is None else args.grace
    outcomes = cleanup.cleanup(Registry(), [Path(args.store)], grace, args.dry_run, settings)
    code = report(outcomes, args.format, args.dry_run)
    try:
        stale = _lazy_caches(settings, Path(args.store), grace, args.dry_run)
    except SquashstoreError as exc:
        sys.stderr.write(f"squashstore: {printable(str(exc))}\n")
        return 1
    for path in stale:
        if args.format != "json":
            verb = "would remove" if args.dry_run else "removed"
            sys.stdout.write(f"{verb} lazy cache {path}\n")
    return code


def _lazy_caches(settings: config.Config, store: Path, grace: float,
                 dry_run: bool) -> list[Path]:
    """Files of the node-local lazy cache (``[lazy] cache_dir``) no lazy image of `store`
    needs and no process has open, untouched for `grace` seconds: removed (listed when
    `dry_run`)."""
    directory = settings.lazy.cache_path()
    if directory is None or not os.path.lexists(directory):
        return []
    import time

    from squashstore import host
    from squashstore.lazy import image as lazy_image
    from squashstore.storelayout import META

    real = Path(os.path.realpath(directory))
    # The directory as configured is checked (no symlink, ours alone), then its real path
    # is listed and open files are looked for there.
    stale = lazy_image.stale_node_caches(
        directory, lazy_image.lazy_digests(store / META), host.open_files_under(str(real)),
        max(grace, settings.cleanup.min_age), time.time())
    if not dry_run:
        for path in stale:
            path.unlink(missing_ok=True)
    return stale


def cmd_slurm(args: argparse.Namespace) -> int:
    ctx = slurm.JobContext.from_env(os.environ, args.job)
    if args.stage == "prolog":
        result = slurm.prolog(ctx, Store(Path(args.store)))
        for mountpoint in result.mounted:
            sys.stdout.write(f"mounted {mountpoint} for job {ctx.job}\n")
        for error in result.errors:
            sys.stderr.write(f"squashstore: prolog of job {ctx.job}: {error}\n")
        return 1 if result.errors else 0
    return report(slurm.epilog(ctx, [Path(args.store)]), args.format, False)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("cleanup", help="unmount stale and dead squash mounts")
    p.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    p.add_argument("--grace", type=seconds, default=None, metavar="SECONDS",
                   help="unmount unused mounts older than this (default: config [cleanup] "
                   f"grace, else {config.DEFAULT_GRACE:.0f})")
    add_format_option(p)
    p.set_defaults(func=cmd_cleanup)

    p = subparsers.add_parser("slurm", help="Slurm node prolog/epilog (contrib/slurm/)")
    p.add_argument("stage", choices=("prolog", "epilog"),
                   help="prolog: mount the images the job's comment declares "
                   f"({slurm.COMMENT_KEY}=IMAGE,...); epilog: unmount what no container and "
                   "no other job on this node uses, at once")
    p.add_argument("--job", default=None, metavar="ID",
                   help="the job (default: $SLURM_JOB_ID, as slurmd sets it)")
    add_format_option(p)
    p.set_defaults(func=cmd_slurm)

