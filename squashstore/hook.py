"""The OCI ``poststop`` hook: unmount an image's squash mount when its last container stops.

podman runs poststop hooks (``hooks_dir`` in containers.conf; `squashstore config --hooks`
prints the hook's JSON) after the container's process ended but before it unmounts the
container's overlay, with the OCI state JSON on stdin (``id``, ``bundle`` =
``<graphroot>/overlay-containers/<id>/userdata``) and an empty environment, while holding the
container's lock: the hook never calls podman. It reads podman's files to find the store layers
below the container, and unmounts each such mount that no other running, paused or starting
container uses (`squashstore.cleanup.poststop`). Rootless, it runs inside podman's user
namespace and finds the user's registry through the namespace's uid map. cron's
`squashstore cleanup` stays the safety net for everything the hook misses.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from pathlib import Path

from squashstore import cleanup, host
from squashstore.mountrecords import RecordRegistry as Registry


def hook_registry() -> Registry:
    """The mount registry the mount program used.

    podman runs hooks with an empty environment; the rootless mount program found the
    registry through ``$XDG_RUNTIME_DIR`` (``/run/user/<uid>``), and inside rootless podman's
    user namespace our uid is 0, so the user's own uid comes from the namespace's uid map.
    """
    if ("SQUASHSTORE_RUNTIME_DIR" in os.environ or "XDG_RUNTIME_DIR" in os.environ
            or host.is_real_root() or os.geteuid() != 0):
        return Registry()
    uid_map = host.own_uid_map()
    uid = host.outside_uid(uid_map) if uid_map is not None else None
    return Registry(Path(f"/run/user/{uid}/squashstore") if uid is not None else None)


def adopt_user_environment() -> None:
    """Rootless: give the hook the user's ``$HOME`` and ``$XDG_RUNTIME_DIR`` (where unset).

    Inside rootless podman's user namespace, with podman's empty environment, ``$HOME``
    would fall back to root's home directory, which the user cannot read (the project
    config lookup then fails), and the runtime directory to the one of uid 0."""
    if host.is_real_root() or os.geteuid() != 0:
        return
    uid_map = host.own_uid_map()
    uid = host.outside_uid(uid_map) if uid_map is not None else None
    if uid is None or uid == 0:
        return
    os.environ.setdefault("XDG_RUNTIME_DIR", f"/run/user/{uid}")
    with contextlib.suppress(KeyError):
        os.environ.setdefault("HOME", pwd.getpwuid(uid).pw_dir)


def run_poststop(state: str, registry: Registry | None = None) -> list[cleanup.Outcome]:
    """Act on the OCI state text ``state`` of a stopping container."""
    if registry is None:
        adopt_user_environment()
    container = cleanup.StoppingContainer.parse(state)
    return cleanup.poststop(registry or hook_registry(), container)
