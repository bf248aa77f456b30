"""`squashstore export SOURCE -o FILE`: an image's flattened root filesystem as one tar."""

from __future__ import annotations

import argparse
import stat
import sys
from pathlib import Path
from typing import Any

from squashstore.atomic import atomic_output
from squashstore.cli.registry import add_registry_options, registry_options
from squashstore.flatten import export_image
from squashstore.sources import open_image


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "export", help="write an image's flattened root filesystem as one tar",
        description="Flatten SOURCE's layers (whiteouts, opaque directories, hard links, "
        "xattrs, owners) and write the result as one tar, like `podman export` of a "
        "container, straight from the image.")
    parser.add_argument("source", metavar="SOURCE",
                        help="image reference (containers-storage:NAME, oci:DIR[:TAG], "
                        "oci-archive:FILE[:TAG], docker-archive:FILE[:NAME], "
                        "docker://HOST/REPO[:TAG|@DIGEST])")
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="the tar to write; - for stdout")
    parser.add_argument("--platform", help="os/arch[/variant] to choose from a multi-arch "
                        "index (default: this host's)")
    add_registry_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    image = open_image(args.source, platform=args.platform, registry=registry_options(args))
    if args.output == "-":
        if sys.stdout.isatty():
            raise SystemExit("squashstore: refusing to write a tar to a terminal")
        result = export_image(image, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    elif _special(Path(args.output)):  # /dev/null, a FIFO: written as they are
        with Path(args.output).open("wb") as out:
            result = export_image(image, out)
    else:
        with atomic_output(Path(args.output), durable=False) as out:
            result = export_image(image, out)
        sys.stderr.write(f"exported {image.reference}: {result.files} files, "
                         f"{result.bytes_in} bytes of content, {result.size} bytes of tar "
                         f"({result.digest})\n")
    return 0


def _special(path: Path) -> bool:
    """A device or a FIFO (never replaced by a file: `atomic_output` refuses them)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISBLK(mode)
