"""Calling the user's local podman.

Owns running the local ``podman`` binary, which finds its own configuration
(``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF``) from the environment we pass through, and
asking it where its primary store is. Host facts (/proc, mounts, processes, the runtime
directory) are in `squashstore.host`, the project configuration in `squashstore.config`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from squashstore.image import SquashstoreError


class PodmanError(SquashstoreError):
    """The local podman failed or is missing."""


def podman_binary() -> str:
    path = shutil.which("podman")
    if path is None:
        raise PodmanError("podman not found on PATH")
    return path


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the local podman (its own configuration from the environment)."""
    proc = subprocess.run([podman_binary(), *args], capture_output=True, text=True,
                          check=False, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        lines = (proc.stderr.strip() or f"exit status {proc.returncode}").splitlines()
        raise PodmanError(f"podman {args[0]}: {lines[-1]}")
    return proc


def podman_graphroot() -> Path | None:
    """The local podman's primary store, None when podman is unavailable."""
    try:
        proc = podman("info", "--format", "{{.Store.GraphRoot}}", check=False)
    except PodmanError:
        return None
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return Path(proc.stdout.strip())
