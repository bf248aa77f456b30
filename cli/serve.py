"""The ``serve SQUASHFILE MOUNTPOINT`` command: mount a squash file with the FUSE server.

Like ``squashfuse``: returns once the mount answers, the server detached in the background
(logging to syslog or --log-file); with ``-f`` the server runs in this process until the
mount goes away (SIGTERM/SIGINT unmount it). The work is `squashstore.fuse.daemon`'s.
"""

from __future__ import annotations

import argparse
from typing import Any


def cmd_serve(args: argparse.Namespace) -> int:
    from squashstore.fuse import daemon

    daemon.check_arguments(args)
    if args.foreground:
        code: int = daemon.run(args)
        return code
    daemon.start(args.squash, args.mountpoint, daemon.forwarded_arguments(args))
    return 0


def register(subparsers: Any) -> None:
    from squashstore.fuse import daemon

    p = subparsers.add_parser(
        "serve", help="mount a squash file read-only with squashstore's FUSE server",
        description="Mount SQUASHFILE on MOUNTPOINT with squashstore's FUSE server; returns "
        "once the mount answers (the server stays in the background unless -f).")
    daemon.add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
