"""`squash`, `ls` and `cat`: write one squash file from any source, and look inside one.

`squash SOURCE OUTPUT` takes an image reference (any transport), `rootfs:DIR` (a root
filesystem directory) or `tar:FILE` (one tar stream, ``-`` for stdin) and writes the squash
file atomically, printing one summary line. `ls` prints `ls -l`-like columns read through
squashstore's own reader; `cat` copies a file's bytes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from squashstore.image import Image, Layer, SquashstoreError
from squashstore.squashfs.compress import WRITABLE
from squashstore.squashfs.reader import SqInode, SquashReader
from squashstore.squashfs.writer import SquashOptions, SquashWriter, parse_size
from squashstore.tree import Kind

CHUNK = 1 << 20


def add_squash_options(parser: argparse.ArgumentParser, zstd_level: int | None = None) -> None:
    """The squash options of cli.md, the same wherever a squash file is written."""
    level = f"{zstd_level} for zstd, else the codec's" if zstd_level else "the codec's"
    parser.add_argument("--compression", choices=WRITABLE, default="zstd",
                        help="compressor (default: zstd)")
    parser.add_argument("--level", type=int, default=None,
                        help=f"compression level (default: {level}, as mksquashfs)")
    parser.add_argument("--block-size", default="128K", metavar="SIZE",
                        help="data block size, a power of two from 4K to 1M (default: 128K)")
    parser.add_argument("--jobs", type=int, default=0, metavar="N",
                        help="compression threads (default: all cores)")


def squash_options(args: argparse.Namespace, zstd_level: int | None = None) -> SquashOptions:
    """The writer's options from parsed `add_squash_options` arguments."""
    level = args.level
    if level is None and args.compression == "zstd":
        level = zstd_level
    return SquashOptions(compression=args.compression, level=level,
                         block_size=parse_size(args.block_size), jobs=args.jobs)


def register(sub: Any) -> None:
    parser = sub.add_parser("squash", help="write one squash file from an image or tree",
                            description="Flatten SOURCE and write it as one squashfs file.")
    parser.add_argument("source", metavar="SOURCE",
                        help="an image reference, rootfs:DIR, or tar:FILE (- for stdin)")
    parser.add_argument("output", metavar="OUTPUT", type=Path)
    parser.add_argument("--platform", help="os/arch[/variant] from a multi-arch index")
    add_squash_options(parser)
    from squashstore.cli.registry import add_registry_options

    add_registry_options(parser)
    parser.set_defaults(func=run_squash)

    parser = sub.add_parser("ls", help="list a directory of a squash file",
                            description="List PATH (default /) of SQUASHFILE like `ls -l`.")
    parser.add_argument("squashfile", type=Path, metavar="SQUASHFILE")
    parser.add_argument("path", nargs="?", default="/", metavar="PATH")
    parser.add_argument("-R", "--recursive", action="store_true", help="list subdirectories")
    parser.set_defaults(func=run_ls)

    parser = sub.add_parser("cat", help="print a file of a squash file",
                            description="Copy the bytes of PATH in SQUASHFILE to stdout.")
    parser.add_argument("squashfile", type=Path, metavar="SQUASHFILE")
    parser.add_argument("path", metavar="PATH")
    parser.set_defaults(func=run_cat)


# -- squash ------------------------------------------------------------------------------


def tar_image(spec: str) -> Image:
    """A one-layer pseudo image whose layer is the tar at `spec` (``-``: stdin)."""
    if spec != "-" and not Path(spec).is_file():
        raise SquashstoreError(f"tar:{spec}: no such file")

    @contextlib.contextmanager
    def opener() -> Iterator[BinaryIO]:
        if spec == "-":
            yield sys.stdin.buffer
        else:
            with open(spec, "rb") as handle:
                yield handle

    layer = Layer(0, "", "", "application/x-tar", -1, opener, label=f"tar:{spec}")
    return Image(f"tar:{spec}", (), b"", "", b"", "", (layer,))


def run_squash(args: argparse.Namespace) -> int:
    from squashstore.atomic import refuse_special

    refuse_special(args.output)  # the writer renames over OUTPUT: never over /dev/null
    options = squash_options(args)
    started = time.monotonic()
    source: str = args.source
    if source.startswith("rootfs:"):
        files, bytes_in, bytes_out = _squash_rootfs(Path(source[len("rootfs:"):]),
                                                    args.output, options)
    else:
        from squashstore.cli.registry import registry_options
        from squashstore.flatten import squash_image
        from squashstore.sources import open_image

        image = tar_image(source[4:]) if source.startswith("tar:") else open_image(
            source, platform=args.platform, registry=registry_options(args))
        result = squash_image(image, args.output, options, progress=sys.stderr.isatty())
        files, bytes_in, bytes_out = result.files, result.bytes_in, result.bytes_out
    seconds = time.monotonic() - started
    print(f"{args.output}: {files} files, {bytes_in} bytes in, {bytes_out} bytes out "
          f"({options.compression}), {seconds:.1f} s")
    return 0


def _squash_rootfs(root: Path, output: Path, options: SquashOptions) -> tuple[int, int, int]:
    from squashstore.rootfs import tree_from_directory

    if not root.is_dir():
        raise SquashstoreError(f"rootfs:{root}: not a directory")
    with SquashWriter(output, options) as writer:
        tree = tree_from_directory(root, writer.add_file, keep_holes=True)
        summary = writer.finish(tree)
    return summary.files, summary.bytes_in, summary.bytes_out


# -- ls and cat --------------------------------------------------------------------------

_TYPE_CHAR = {Kind.DIR: "d", Kind.FILE: "-", Kind.SYMLINK: "l", Kind.BLOCKDEV: "b",
              Kind.CHARDEV: "c", Kind.FIFO: "p", Kind.SOCKET: "s"}


def _line(reader: SquashReader, inode: SqInode, name: str) -> str:
    mode = stat.filemode(inode.st_mode)
    if inode.kind in (Kind.CHARDEV, Kind.BLOCKDEV):
        size = f"{inode.rdev[0]}, {inode.rdev[1]}"
    else:
        size = str(inode.size)
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(inode.mtime))
    text = f"{mode} {inode.nlink:>3} {inode.uid:>5} {inode.gid:>5} {size:>10} {when} {name}"
    if inode.kind is Kind.SYMLINK:
        text += " -> " + _printable(reader.readlink(inode))
    return text


def _printable(raw: bytes) -> str:
    """A name as `ls` shows it: undecodable bytes and control characters escaped, so a
    hostile name can neither break a listing's lines nor drive the terminal."""
    text = raw.decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _list(reader: SquashReader, top: SqInode, top_path: str, recursive: bool,
          out: IO[str]) -> None:
    """``ls`` of `top` (``-R``: then of every directory below, depth first, as ``ls -R``
    orders it; iterative, so a tree of any depth lists)."""
    stack = [(top_path, top, False)]
    while stack:
        path, directory, header = stack.pop()
        if header:
            out.write(f"\n{path}:\n")
        subdirs: list[tuple[str, SqInode, bool]] = []
        for entry in reader.readdir(directory):
            inode = reader.inode(entry.ref)
            name = _printable(entry.name)
            out.write(_line(reader, inode, name) + "\n")
            if recursive and inode.kind is Kind.DIR:
                subdirs.append((f"{path.rstrip('/')}/{name}", inode, True))
        stack.extend(reversed(subdirs))


def _resolve(reader: SquashReader, path: str) -> SqInode:
    try:
        return reader.resolve(path)
    except (FileNotFoundError, NotADirectoryError):
        raise SquashstoreError(f"{path}: no such file or directory in the image") from None


def run_ls(args: argparse.Namespace) -> int:
    with SquashReader(args.squashfile) as reader:
        inode = _resolve(reader, args.path)
        if inode.kind is Kind.DIR:
            if args.recursive:
                sys.stdout.write(f"{args.path}:\n")
            _list(reader, inode, args.path, args.recursive, sys.stdout)
        else:
            sys.stdout.write(_line(reader, inode, args.path) + "\n")
    return 0


def run_cat(args: argparse.Namespace) -> int:
    with SquashReader(args.squashfile) as reader:
        inode = _resolve(reader, args.path)
        if inode.kind is not Kind.FILE:
            raise SquashstoreError(f"{args.path}: not a regular file")
        out = sys.stdout.buffer
        offset = 0
        while offset < inode.size:
            chunk = reader.read(inode, offset, min(CHUNK, inode.size - offset))
            if not chunk:
                raise SquashstoreError(f"{args.path}: content ends early at byte {offset}")
            out.write(chunk)
            offset += len(chunk)
        out.flush()
    return 0

