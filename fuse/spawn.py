"""Starting a detached FUSE server and waiting until its mount answers.

This module owns the starting side of the server's readiness contract, the part the mount
program runs at the first start of an image: `start` spawns a fresh interpreter running
`squashstore.fuse.daemon` (new session, stdio on /dev/null, working directory /, no inherited
descriptors but a readiness pipe), reads the server's one line on that pipe ("ok" once the
kernel has the mount, else its one-line error, which `start` raises as `ServeError`), then
blocks in a `stat` of the mount point until the server has answered the kernel's INIT and
that GETATTR, and returns the server's pid. It is kept apart from the daemon (argparse,
logging, the server itself) and imports only what spawning and waiting need: every first
start pays for what it imports (~67 M instructions, ~11 ms, before this split).
"""

from __future__ import annotations

import errno
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from squashstore import host
from squashstore.errors import SquashstoreError


class ServeError(SquashstoreError):
    """The FUSE server could not mount or serve a squash file."""


def start(squash: Path, mountpoint: Path, extra: Sequence[str] = (),
          timeout: float = host.MOUNT_TIMEOUT) -> int:
    """Spawn a detached server for `squash` on `mountpoint`; return its pid once the mount
    answers. `extra`: further server arguments (see `daemon.add_serve_arguments`)."""
    # Resolved, as the mount table and the registry name them: cleanup finds a server by
    # the mount point on its command line.
    squash, mountpoint = Path(squash).resolve(), Path(mountpoint).resolve()
    read_end, write_end = os.pipe()
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "squashstore.fuse.daemon", f"--ready-fd={write_end}",
             *extra, str(squash), str(mountpoint)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(write_end,), close_fds=True, start_new_session=True, cwd="/",
        )
    finally:
        os.close(write_end)
    try:
        message = _read_ready(read_end, server, timeout)
    finally:
        os.close(read_end)
    if message != "ok":
        server.wait(timeout=timeout)
        raise ServeError(message or f"the server for {squash} exited ({server.returncode})")
    try:
        _wait_answers(mountpoint, server, timeout)
    except BaseException:
        server.kill()
        server.wait()
        raise
    return server.pid


def _read_ready(fd: int, server: subprocess.Popen[bytes], timeout: float) -> str:
    """The server's first message on the readiness pipe: "ok" or an error line."""
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            server.kill()
            raise ServeError(f"the server gave no sign of life within {timeout:.0f}s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _wait_answers(mountpoint: Path, server: subprocess.Popen[bytes], timeout: float) -> None:
    """Block until `mountpoint` is a mount that answers (the server's first reply).

    The server writes "ok" only once the kernel has the mount, so the first `stat` here
    reaches it and blocks in the kernel until the server has answered INIT and GETATTR: no
    sleep on the normal path. The loop (`host.POLL_INTERVAL`) only covers a mount that
    went away meanwhile (ENOTCONN, EIO: its server died) or was never there."""
    parent = os.stat(mountpoint.parent).st_dev
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.stat(mountpoint).st_dev != parent:
                return
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EIO):
                raise
        if server.poll() is not None:
            raise ServeError(f"the server for {mountpoint} exited ({server.returncode})")
        time.sleep(host.POLL_INTERVAL)
    raise ServeError(f"{mountpoint}: the mount did not answer within {timeout:.0f}s")
