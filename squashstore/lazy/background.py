"""Completing a lazily pulled image in the background (``pull --background``).

`spawn` starts a detached process (its own session, stdio on /dev/null, out of the
caller's Slurm job) running this module on one squash file, logging to
``<runtime dir>/logs/lazy-<layer>.log``, and returns at once. `main` is that process: it
completes the image as `squashstore.lazy.image.complete` does in front (whatever is still
missing fetched, the digest and the layer checked, then marker and map removed), reaching
the registry as the image's FUSE server does: TLS and credentials from the marker and
podman's auth file, never from the command line. Running it twice at once, or beside the
image's FUSE servers, costs at most a duplicate fetch (the cache's map is shared).
Run ``python -m squashstore.lazy.background SQUASHFILE`` by hand as well.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def log_path(squash: Path) -> Path:
    """Where the background completion of `squash` logs (the directory is made)."""
    from squashstore import host

    directory = host.runtime_dir() / "logs"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"lazy-{squash.stem}.log"


def spawn(squash: Path) -> tuple[int, Path]:
    """Start completing `squash` in a detached process; (its pid, its log file)."""
    from squashstore import detach

    log = log_path(squash)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "squashstore.lazy.background", str(squash.absolute())],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, close_fds=True,
            start_new_session=True, cwd="/")
    detach.leave_job(process.pid)  # the completion must not end with the caller's job
    return process.pid, log


def main(argv: Sequence[str] | None = None) -> int:
    from squashstore.image import SquashstoreError
    from squashstore.lazy import image as lazy_image
    from squashstore.lazy import remote
    from squashstore.registry.options import RegistryOptions

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m squashstore.lazy.background SQUASHFILE\n")
        return 2
    squash = Path(args[0])
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s squashstore-complete"
                        f"[{os.getpid()}] {squash.name}: %(message)s")
    log = logging.getLogger("squashstore.lazy.background")
    log.info("completing")
    try:
        done = lazy_image.complete(  # a whole download: [registry] stall, no budget
            squash, lambda r: remote.open_source(r, RegistryOptions()))
    except (SquashstoreError, OSError) as exc:
        log.error("failed: %s", exc)
        return 1
    log.info("complete" if done else "not lazy (complete already)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
