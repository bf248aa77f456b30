"""The OCI ``poststop`` hook: unmount an image's squash mount when its last container stops.

podman runs poststop hooks (``hooks_dir`` in containers.conf; `squashstore config --hooks`
prints the hook's JSON) after the container's process ended but before it unmounts the
container's overlay, with the OCI state JSON on stdin (``id``, ``bundle`` =
``<graphroot>/overlay-containers/<id>/userdata``) and an empty environment, while holding the
container's lock: the hook never calls podman. It reads podman's files to find the store layers
below the container, and unmounts each such mount that no other running, paused or starting
container uses (`squashstore.cleanup.poststop`). cron's `squashstore cleanup` stays the safety
net for everything the hook misses.
"""

from __future__ import annotations

from squashstore import cleanup
from squashstore.mounts import Registry


def run_poststop(state: str, registry: Registry | None = None) -> list[cleanup.Outcome]:
    """Act on the OCI state text ``state`` of a stopping container."""
    container = cleanup.StoppingContainer.parse(state)
    return cleanup.poststop(registry or Registry(), container)
