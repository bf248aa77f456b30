"""Running the FUSE server as a process: start it detached, or run it in the foreground.

This module owns the server's life as a process. `start` (`squashstore.fuse.spawn`, kept
light for the mount program and re-exported here) spawns a fresh interpreter running this
module and returns the server's pid once the mount answers; a server that fails to start
reports its one-line error through the readiness pipe and `start` raises it. `run` is the
server process itself: logging (a file named by --log-file, else syslog when detached, else
stderr), the process name, opening the image before mounting (so a bad image fails before
anything is mounted), then `squashstore.fuse.server.serve` until the mount goes away.
Run ``python -m squashstore.fuse.daemon SQUASHFILE MOUNTPOINT [-f]`` by hand as well.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from squashstore import host
from squashstore.errors import SquashstoreError
from squashstore.fuse.spawn import ServeError as ServeError  # re-exported
from squashstore.fuse.spawn import start as start  # re-exported

if TYPE_CHECKING:
    from squashstore.fuse.server import ServerOptions
    from squashstore.lazy.image import Remote
    from squashstore.lazy.source import RangeSource
    from squashstore.squashfs.meta import ByteSource

MIB = 1 << 20


# ---------------------------------------------------------------------------------------
# Options shared by `serve`, the mounter and this module's own command line.


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``serve`` (and of ``python -m squashstore.fuse.daemon``)."""
    parser.add_argument("squash", metavar="SQUASHFILE", type=Path)
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground (log to stderr unless --log-file)")
    parser.add_argument("--log-file", type=Path, default=None,
                        help="log here (default: syslog when detached)")
    parser.add_argument("--allow-other", action="store_true", default=None,
                        help="let other users in (default: when root or when "
                        "/etc/fuse.conf has user_allow_other)")
    parser.add_argument("--no-allow-other", dest="allow_other", action="store_false")
    parser.add_argument("--cache-size", type=int, default=16, metavar="MIB",
                        help="MiB of decompressed data blocks to keep (default 16)")
    parser.add_argument("--metadata-cache-size", type=int, default=8, metavar="MIB",
                        help="MiB of decompressed metadata blocks to keep (default 8)")
    parser.add_argument("--dir-cache-entries", type=int, default=200_000, metavar="N",
                        help="directory entries to keep decoded (default 200000)")
    parser.add_argument("--threads", type=int, default=4, metavar="N",
                        help="threads decompressing data at once (default 4; 0: none, "
                        "all reads on the server's main thread)")
    parser.add_argument("--open-requests", action="store_true",
                        help="answer the kernel's OPEN and OPENDIR requests (as with a "
                        "stock pyfuse3 build) instead of leaving opens to the kernel; "
                        "slower, for comparisons")
    parser.add_argument("--suid", action="store_true",
                        help="honour setuid bits (root only; default nosuid)")
    parser.add_argument("--dev", action="store_true",
                        help="honour device files (root only; default nodev)")
    parser.add_argument("--record", type=Path, default=None, metavar="FILE",
                        help="append to FILE (which must exist) the index of every 64 KiB "
                        "chunk of the squash file read for the first time (what "
                        "`squashstore record` makes a prefetch list of)")


def forwarded_arguments(args: argparse.Namespace) -> list[str]:
    """The options of `args` as arguments for the spawned server process."""
    out = [f"--cache-size={args.cache_size}",
           f"--metadata-cache-size={args.metadata_cache_size}",
           f"--dir-cache-entries={args.dir_cache_entries}", f"--threads={args.threads}"]
    if args.log_file is not None:
        out.append(f"--log-file={Path(args.log_file).absolute()}")
    if args.record is not None:
        out.append(f"--record={Path(args.record).absolute()}")
    if args.allow_other is not None:
        out.append("--allow-other" if args.allow_other else "--no-allow-other")
    out += ["--suid"] * bool(args.suid) + ["--dev"] * bool(args.dev)
    out += ["--open-requests"] * bool(args.open_requests)
    return out


def default_allow_other() -> bool:
    """allow_other when real root, or when /etc/fuse.conf has ``user_allow_other``."""
    if host.is_real_root():
        return True
    try:
        lines = Path("/etc/fuse.conf").read_text(errors="replace").splitlines()
    except OSError:
        return False
    return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in lines)


def check_arguments(args: argparse.Namespace) -> None:
    """Reject what cannot work before anything is spawned or mounted."""
    for name in ("cache_size", "metadata_cache_size", "dir_cache_entries", "threads"):
        least = 0 if name == "threads" else 1
        if getattr(args, name) < least:
            raise ServeError(f"--{name.replace('_', '-')} must be at least {least}")
    if (args.suid or args.dev) and os.geteuid() != 0:
        raise ServeError("--suid and --dev need root")
    if not args.squash.is_file():
        raise ServeError(f"{args.squash}: no such squash file")
    if not args.mountpoint.is_dir():
        raise ServeError(f"{args.mountpoint}: not a directory")
    if args.record is not None and not args.record.is_file():
        raise ServeError(f"{args.record}: no such file to record into")


# ---------------------------------------------------------------------------------------
# The server process.


def set_process_name(name: str) -> None:
    """Name this process for ps/top (``comm``, 15 bytes); the command line keeps the rest.

    Written to /proc/self/comm (what prctl(PR_SET_NAME) sets) rather than through ctypes:
    `ctypes.util.find_library` runs ``ldconfig -p`` in a child process, and the import of
    ctypes and the fork both stood between the server's start and its answer to INIT."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "wb", buffering=0) as comm:
        comm.write(name.encode()[:15])


def setup_logging(log_file: Path | None, detached: bool, mountpoint: Path) -> None:
    """Log to `log_file`, else syslog (or a runtime-dir file) when detached, else stderr."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = f"squashstore-fuse[%(process)d] {mountpoint}: %(levelname)s %(message)s"
    handler: logging.Handler
    if log_file is not None:
        handler = logging.FileHandler(log_file)
        fmt = "%(asctime)s " + fmt
    elif not detached:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    else:
        handler = logging.FileHandler(host.server_log(mountpoint, "fuse"))
        fmt = "%(asctime)s " + fmt
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)


def run(args: argparse.Namespace, ready_fd: int | None = None) -> int:
    """Serve in this process until unmounted; report readiness or failure on `ready_fd`."""
    from squashstore import config
    from squashstore.fuse import server
    from squashstore.lazy import paths as lazy_paths
    from squashstore.squashfs.reader import SquashReader

    def ready(message: str) -> None:
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, (" ".join(message.split()) + "\n").encode())
                os.close(ready_fd)

    try:
        setup_logging(args.log_file, ready_fd is not None, args.mountpoint)
        check_arguments(args)
        set_process_name("squashstore-fs")
        opts = _server_options(args)
        lazy = None
        if lazy_paths.is_lazy(args.squash):  # else no registry client to import (~45 ms)
            from squashstore.lazy import image as lazy_image

            lazy = lazy_image.open_lazy(args.squash, _open_source,
                                        config.load().lazy.cache_path())
            if lazy is not None:  # lazily pulled: its cache, and the registry for the rest
                lazy_image.prefetch_metadata(lazy)
        source: ByteSource | None = lazy
        if args.record is not None:
            source = _recorder(args.squash, args.record, lazy)
        with SquashReader(args.squash, metadata_cache_blocks=1, data_cache_blocks=1,
                          source=source) as probe:
            block_size = probe.block_size
        reader = SquashReader(
            args.squash, metadata_cache_blocks=opts.metadata_cache_blocks,
            data_cache_blocks=max(1, opts.cache_bytes // block_size), source=source)
    except (SquashstoreError, OSError) as exc:
        ready(f"{args.squash}: {exc}" if isinstance(exc, OSError) else str(exc))
        raise
    logging.getLogger("squashstore.fuse").info(
        "serving %s on %s (pid %d)", args.squash, args.mountpoint, os.getpid())
    try:
        server.serve(reader, args.mountpoint, opts, on_mounted=lambda: ready("ok"))
    except RuntimeError as exc:  # pyfuse3.init: the mount itself failed
        ready(f"cannot mount {args.mountpoint}: {exc}")
        raise ServeError(f"cannot mount {args.mountpoint}: {exc}") from None
    finally:
        reader.close()
    return 0


def _open_source(remote: Remote) -> RangeSource:
    """`squashstore.lazy.remote.open_source`, imported only for a lazy image: the registry
    client (requests, urllib3) would cost every other mount ~260 M instructions (~45 ms)
    of imports before it can answer the kernel (measured by helper start, session 4)."""
    from squashstore.lazy import remote as registry

    return registry.open_source(remote)


def _recorder(squash: Path, record: Path, lazy: ByteSource | None) -> ByteSource:
    """The squash file (or its lazy cache) read through a `Recorder` appending to `record`."""
    from squashstore.lazy.prefetch import FileSource, Recorder

    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    return Recorder(lazy if lazy is not None else FileSource(squash), fd)


def _server_options(args: argparse.Namespace) -> ServerOptions:
    from squashstore.fuse.server import ServerOptions

    allow_other = args.allow_other
    if allow_other is None:
        allow_other = default_allow_other()
    return ServerOptions(
        cache_bytes=args.cache_size * MIB,
        metadata_cache_blocks=max(1, args.metadata_cache_size * MIB // 8192),
        dir_cache_entries=args.dir_cache_entries,
        threads=args.threads,
        no_open=not args.open_requests,
        allow_other=bool(allow_other),
        suid=args.suid,
        dev=args.dev,
        fsname=str(Path(args.squash).absolute()),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m squashstore.fuse.daemon [--ready-fd N] SQUASHFILE MOUNTPOINT [-f] ...``"""
    parser = argparse.ArgumentParser(prog="squashstore-fuse")
    add_serve_arguments(parser)
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.ready_fd is not None or args.foreground:
            return run(args, args.ready_fd)
        check_arguments(args)
        start(args.squash, args.mountpoint, forwarded_arguments(args))
        return 0
    except (SquashstoreError, OSError) as exc:
        if args.ready_fd is None:
            sys.stderr.write(f"squashstore: {exc}\n")
        else:
            logging.getLogger("squashstore.fuse").error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
