"""Rootless podman's user and mount namespace, and running squashstore inside it.

A rootless podman keeps its own user namespace (the user as root, the subordinate ids
mapped) and mount namespace, held open by its pause process. Its image layers hold files
owned by subordinate ids, which the user cannot read outside that namespace, and its mount
program (squashstore's too) mounts squash files inside it, where nothing outside sees them.
This module owns knowing whether we run there (``podman unshare`` and podman itself export
``_CONTAINERS_USERNS_CONFIGURED`` and ``_CONTAINERS_ROOTLESS_UID``), which uid podman's
storage configuration belongs to, and re-running a command there with ``podman unshare``.
``SQUASHSTORE_UNSHARE=0`` keeps a command where it was started.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from typing import NoReturn

from squashstore import host
from squashstore.errors import SquashstoreError

OPT_OUT = "SQUASHSTORE_UNSHARE"


class UnshareError(SquashstoreError):
    """Re-running inside rootless podman's namespace is impossible."""


def in_podman_userns() -> bool:
    """True inside rootless podman's user namespace (``podman unshare``, mount program)."""
    return (os.environ.get("_CONTAINERS_USERNS_CONFIGURED") == "done"
            and not host.is_real_root())


def storage_uid() -> int:
    """The uid whose podman storage configuration applies: the rootless user's own uid
    inside podman's namespace (where we are uid 0), else the effective uid."""
    if os.geteuid() == 0 and in_podman_userns():
        text = os.environ.get("_CONTAINERS_ROOTLESS_UID", "")
        if text.isdigit():
            return int(text)
    return os.geteuid()


def should_reexec() -> bool:
    """An ordinary user with podman, not yet inside podman's namespace, who has not opted
    out. Without podman there is no such namespace: commands run where they are."""
    return (os.geteuid() != 0 and not in_podman_userns()
            and os.environ.get(OPT_OUT, "1") != "0" and shutil.which("podman") is not None)


def reexec_in_podman_userns(argv: Sequence[str]) -> NoReturn:
    """Replace this process by ``podman unshare PYTHON -P -m squashstore.cli.main ARGV``
    (``-P``: a ``squashstore`` directory in the working directory must not shadow us)."""
    podman = shutil.which("podman")
    if podman is None:
        raise UnshareError("podman not found on PATH (a rootless user's squashstore runs "
                           f"inside podman's namespace; set {OPT_OUT}=0 to run without it)")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(podman, [podman, "unshare", sys.executable, "-P", "-m", "squashstore.cli.main",
                      *argv])
