"""Mount commands: ``mount IMAGE [--backend B]``, ``umount IMAGE | --all``, ``mounts``,
``record IMAGE -- COMMAND...``.

Thin layer over `squashstore.mounts.Registry`: explicit mounts of a store image's squash file
over its layer's ``diff`` directory, the listing of every mount this host/user has with
its state as `squashstore.cleanup` probes it (``alive``, ``dead``, ``hung`` or ``gone``), and
`record`: the image mounted afresh by a FUSE server that notes which chunks of the squash
file are read while COMMAND runs (typically ``podman run --rm IMAGE ...``), kept in the
store as the image's start-up prefetch list (`squashstore.lazy.prefetch`), which `push`
sends with the image and `pull --lazy` fetches first.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from squashstore import cleanup, host
from squashstore.cli.output import add_format_option, print_json, print_table
from squashstore.image import SquashstoreError
from squashstore.mounts import BACKENDS, Registry
from squashstore.store import Store


def cmd_mount(args: argparse.Namespace) -> int:
    store = Store(Path(args.store))
    image = store.resolve(args.image)
    record = Registry().ensure_mounted(image.id, image.layer, image.squash, image.diff,
                                       backend=args.backend)
    print(record.mountpoint)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    registry = Registry()
    if args.all:
        results = registry.umount_all(lazy=args.lazy)
        for record, problem in results:
            if not problem:
                print(f"unmounted {record.image[:12]} {record.mountpoint}")
        failed = [f"{r.mountpoint} ({problem})" for r, problem in results if problem]
        if failed:
            raise SquashstoreError(f"{len(failed)} mount(s) not unmounted: "
                                   f"{'; '.join(failed)}")
        return 0
    if args.image is None:
        raise SquashstoreError("umount: give IMAGE or --all")
    image = Store(Path(args.store)).resolve(args.image)
    was_mounted = host.is_mountpoint(image.diff)
    if not registry.umount(image.diff, lazy=args.lazy):
        raise SquashstoreError(f"{image.diff}: busy (try --lazy)")
    print(f"{'unmounted' if was_mounted else 'not mounted:'} {image.id[:12]} {image.diff}")
    return 0


def cmd_mounts(args: argparse.Namespace) -> int:
    """Every recorded mount with its state as cleanup sees it (`cleanup.mount_state`)."""
    records = Registry().records()
    table = host.mount_table()  # read-only: no lock, so no container start waits on a probe
    states = [cleanup.mount_state(table.get(r.mountpoint)) for r in records]
    if args.format == "json":
        print_json([{**r.to_json(), "state": state} for r, state in zip(records, states,
                                                                        strict=True)])
        return 0
    rows = [[r.image[:12], r.backend, r.pid if r.pid is not None else "-",
             datetime.fromtimestamp(r.since, UTC).strftime("%Y-%m-%d %H:%M:%S"),
             len(r.users), state, r.mountpoint] for r, state in zip(records, states,
                                                                    strict=True)]
    print_table(["image", "backend", "pid", "since", "users", "state", "mount point"], rows)
    return 0


def _squash_digest(squash: Path) -> str:
    """The digest of an image's squash file (a lazy one's is the registry's)."""
    from squashstore.lazy import image as lazy_image
    from squashstore.registry.artifact import file_digest

    status = lazy_image.status(squash)
    return status.remote.digest if status is not None else file_digest(squash)


def cmd_record(args: argparse.Namespace) -> int:
    from squashstore.lazy import prefetch
    from squashstore.lazy.ranges import coalesce
    from squashstore.progress import human

    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SquashstoreError("record: give the COMMAND to record, after IMAGE and --")
    store = Store(Path(args.store))
    image = store.resolve(args.image)
    registry = Registry()
    if not registry.umount(image.diff):
        raise SquashstoreError(f"{image.id[:12]} is in use ({image.diff} is busy): stop its "
                               "containers first; a recording needs a fresh mount")
    fd, name = tempfile.mkstemp(prefix="squashstore-record-", suffix=".chunks")
    os.close(fd)
    recording = Path(name)
    try:
        backend = importlib.import_module("squashstore.fuse.backend")
        registry.ensure_mounted(image.id, image.layer, image.squash, image.diff,
                                using=backend.FuseMounter((f"--record={recording}",)))
        try:
            # With --format json, stdout is ours alone: COMMAND's goes to stderr.
            out = sys.stderr.fileno() if args.format == "json" else None
            code = subprocess.run(command, check=False, stdout=out).returncode
        finally:
            # Ends the recording (podman's poststop hook may have unmounted it already);
            # a mount still busy (a detached container) keeps serving, unrecorded.
            registry.umount(image.diff)
        chunks = prefetch.read_recording(recording)
    finally:
        recording.unlink(missing_ok=True)
    if code != 0:
        raise SquashstoreError(f"record: {shlex.join(command)} exited with status {code}; "
                               "nothing recorded")
    size = image.squash.stat().st_size
    listed = prefetch.from_chunks(chunks, prefetch.RECORD_CHUNK, _squash_digest(image.squash),
                                  size, shlex.join(command))
    if args.add and (old := prefetch.load(image.squash)) is not None and \
            (old.digest, old.size) == (listed.digest, listed.size):
        listed = prefetch.PrefetchList(listed.digest, size,
                                       tuple(coalesce([*old.spans, *listed.spans])),
                                       f"{old.command}; {listed.command}")
    prefetch.save(image.squash, listed)
    if args.format == "json":
        print_json({"id": image.id, "ranges": len(listed.spans), "bytes": listed.total,
                    "squash_bytes": size, "command": listed.command})
    else:
        share = 100 * listed.total / size if size else 0.0
        print(f"{image.id[:12]}: recorded {human(listed.total)} in {len(listed.spans)} "
              f"range(s), {share:.1f} % of the squash file; push sends the list with the "
              "image, pull --lazy fetches it first")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("mount", help="mount a store image's squash file")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--backend", choices=tuple(BACKENDS), default=None,
                   help="mounter (default: [mount] backend of the config, else fuse)")
    p.set_defaults(func=cmd_mount)

    p = subparsers.add_parser("umount", help="unmount a store image, or all (--all)")
    p.add_argument("image", metavar="IMAGE", nargs="?")
    p.add_argument("--all", action="store_true", help="every mount of this host/user")
    p.add_argument("--lazy", action="store_true", help="detach even when busy")
    p.set_defaults(func=cmd_umount)

    p = subparsers.add_parser("mounts", help="list this host's squash mounts")
    add_format_option(p)
    p.set_defaults(func=cmd_mounts)

    p = subparsers.add_parser(
        "record", help="record what a container start reads: the image's prefetch list",
        description="Mount IMAGE afresh with a server that notes which parts of its squash "
        "file are read while COMMAND runs (typically `podman run --rm IMAGE ...`: one "
        "container start), and keep that as the image's start-up prefetch list: `push` "
        "sends it with the image and `pull --lazy` fetches it first, in bulk. The image "
        "must not be in use.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")
    p.add_argument("--add", action="store_true",
                   help="add to the image's list instead of replacing it")
    add_format_option(p)
    p.set_defaults(func=cmd_record)
