"""Mount commands: ``mount IMAGE [--backend B]``, ``umount IMAGE | --all``, ``mounts``.

Thin layer over `squashstore.mounts.Registry`: explicit mounts of a store image's squash file
over its layer's ``diff`` directory, and the listing of every mount this host/user has with
its state as `squashstore.cleanup` probes it (``alive``, ``dead``, ``hung`` or ``gone``).
"""

from __future__ import annotations

import argparse
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
        for record, ok in results:
            if ok:
                print(f"unmounted {record.image[:12]} {record.mountpoint}")
        failed = [r.mountpoint for r, ok in results if not ok]
        if failed:
            raise SquashstoreError(f"{len(failed)} mount(s) busy: {', '.join(failed)}")
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
