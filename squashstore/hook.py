"""The OCI ``poststop`` hook: unmount an image's squash mount when its last container stops.

podman runs poststop hooks (``hooks_dir`` in containers.conf; `squashstore config --hooks`
prints the hook's JSON, `hook_json`) after the container's process ended but before it
unmounts the container's overlay, with the OCI state JSON on stdin (``id``, ``bundle`` =
``<graphroot>/overlay-containers/<id>/userdata``) and an empty environment, while holding the
container's lock: the hook never calls podman. It reads podman's files to find the layers
below the container (`stopping_layers`), and unmounts each squash mount among them that no
other running, paused or starting container uses (`squashstore.cleanup.poststop`). Rootless,
it runs inside podman's user namespace and finds the user's registry through the namespace's
uid map. cron's `squashstore cleanup` stays the safety net for everything the hook misses.

Once configured, the hook runs at every container stop, also of containers that use no
squash store, and ``podman run --rm`` waits for it. So this module is also the hook's
program (`run`: ``squashstore-hook poststop``, started by `squashstore.launcher` as ``python
-I -S``), and it imports little: when podman's containers.json and layers.json show every
layer below the container as a layer of the container's own store (none from an additional
image store, so none can be a squash mount), the program ends there, having imported only
os, sys and a few small modules; only a container with a layer of another store goes on to
`squashstore.cleanup` (NOTES.md, "Poststop hook per stop (branch hookfast)").
"""

from __future__ import annotations

import os
import sys

from squashstore import jsonfast, podmanstore, storelayout
from squashstore.errors import SquashstoreError
from squashstore.slots import Slots

TYPE_CHECKING = False  # not typing's: the hook (every container stop) skips typing
if TYPE_CHECKING:
    from typing import Any

    from squashstore.cleanup import Outcome
    from squashstore.mountrecords import RecordRegistry as Registry

PROGRAM = "squashstore-hook"
"""The hook's program (a console script, which `squashstore.launcher` replaces)."""
STAGE = "poststop"
"""The one OCI hook stage squashstore acts on."""


class HookError(SquashstoreError):
    """The hook's input is not an OCI container state."""


class StoppingContainer(Slots):
    """What the OCI state on a poststop hook's stdin says about the container."""

    __slots__ = ("graphroot", "id")
    id: str
    graphroot: str
    """Its podman store, from the bundle path ("" when the bundle is not podman's)."""

    def __init__(self, id: str, graphroot: str) -> None:
        self.id = id
        self.graphroot = graphroot

    @classmethod
    def parse(cls, text: str | bytes) -> StoppingContainer:
        try:
            state = jsonfast.loads(text)
            cid, bundle = state["id"], state["bundle"]
        except (ValueError, KeyError, TypeError) as exc:
            raise HookError(f"hook: not an OCI container state on stdin ({exc})") from exc
        except RecursionError:
            raise HookError("hook: not an OCI container state on stdin (nested too "
                            "deeply)") from None
        if not isinstance(cid, str) or not isinstance(bundle, str):
            raise HookError("hook: the container state has no id or bundle")
        return cls(cid, graphroot_of_bundle(bundle))


def graphroot_of_bundle(bundle: str) -> str:
    """podman's bundle ``<graphroot>/overlay-containers/<id>/userdata`` -> graphroot; ""
    when the bundle is not of that shape. Components split as pathlib splits them (empty
    and ``.`` ones dropped)."""
    parts = [p for p in bundle.split("/") if p and p != "."]
    if len(parts) < 3 or not parts[-3].endswith("-containers"):
        return ""
    root = ("/" if bundle.startswith("/") else "") + "/".join(parts[:-3])
    return root or "."


class StoppingLayers(Slots):
    """The layers below a stopping container, as its podman store's files say."""

    __slots__ = ("below", "layer", "local")
    layer: str
    """The container's own layer; "" when its store does not know the container."""
    below: frozenset[str]
    """It and every layer below it (`podmanstore.ancestors`)."""
    local: bool
    """Every one of them is a layer of the container's own store, which is no squash store:
    none is a layer of an additional image store, so none is a squash store's (podman uses
    a layer of its own store before one of an additional store with the same id)."""

    def __init__(self, layer: str = "", below: frozenset[str] = frozenset(),
                 local: bool = False) -> None:
        self.layer = layer
        self.below = below
        self.local = local

    def may_use_a_store(self) -> bool:
        """Whether a squash mount may be below: the container is known and not `local`."""
        return bool(self.layer) and not self.local


def stopping_layers(container: StoppingContainer) -> StoppingLayers:
    """The container's layers from its store's ``containers.json`` and ``layers.json``.

    Read as podman's files are read by root (`podmanstore.load_document`'s `owner`: files of
    our own uid only, no symlink, no FIFO); a file that cannot be read or is damaged says
    nothing: the container is then unknown (nothing to do, as for one podman removed), or
    its chain is not known to be `local`."""
    if not container.graphroot:
        return StoppingLayers()
    owner = os.geteuid()
    root = container.graphroot
    try:
        records = podmanstore.containers(podmanstore.record_file(root, "containers"), owner)
    except podmanstore.PodmanStoreError:
        return StoppingLayers()
    layer = next((r.layer for r in records if r.id == container.id), "")
    if not layer:
        return StoppingLayers()
    try:
        layers = podmanstore.layers(podmanstore.record_file(root, "layers"), owner)
    except podmanstore.PodmanStoreError:
        layers = []
    chain = podmanstore.ancestors(layer, podmanstore.parents(layers))
    own = {r.id for r in layers}
    local = len(chain) < podmanstore.MAX_CHAIN and all(lay in own for lay in chain) and \
        not storelayout.is_store(root)  # (a squash store as podman's graphroot: no proof)
    return StoppingLayers(layer, frozenset(chain), local)


def hook_registry() -> Registry:
    """The mount registry the mount program used.

    podman runs hooks with an empty environment; the rootless mount program found the
    registry through ``$XDG_RUNTIME_DIR`` (``/run/user/<uid>``), and inside rootless podman's
    user namespace our uid is 0, so the user's own uid comes from the namespace's uid map.
    """
    from squashstore import host
    from squashstore.mountrecords import RecordRegistry

    if ("SQUASHSTORE_RUNTIME_DIR" in os.environ or "XDG_RUNTIME_DIR" in os.environ
            or host.is_real_root() or os.geteuid() != 0):
        return RecordRegistry()
    uid_map = host.own_uid_map()
    uid = host.outside_uid(uid_map) if uid_map is not None else None
    return RecordRegistry(f"/run/user/{uid}/squashstore" if uid is not None else None)


def adopt_user_environment() -> None:
    """Rootless: give the hook the user's ``$HOME`` and ``$XDG_RUNTIME_DIR`` (where unset).

    Inside rootless podman's user namespace, with podman's empty environment, ``$HOME``
    would fall back to root's home directory, which the user cannot read (the project
    config lookup then fails), and the runtime directory to the one of uid 0."""
    from squashstore import host

    if host.is_real_root() or os.geteuid() != 0:
        return
    uid_map = host.own_uid_map()
    uid = host.outside_uid(uid_map) if uid_map is not None else None
    if uid is None or uid == 0:
        return
    os.environ.setdefault("XDG_RUNTIME_DIR", f"/run/user/{uid}")
    import contextlib
    import pwd

    with contextlib.suppress(KeyError):
        os.environ.setdefault("HOME", pwd.getpwuid(uid).pw_dir)


def run_poststop(state: str | bytes, registry: Registry | None = None) -> list[Outcome]:
    """Act on the OCI state text ``state`` of a stopping container."""
    container = StoppingContainer.parse(state)
    layers = stopping_layers(container)
    if not layers.may_use_a_store():
        return []  # no squash mount below: the cost of every stop of such a container
    from squashstore import cleanup

    if registry is None:
        adopt_user_environment()
    return cleanup.poststop(registry or hook_registry(), container, layers=layers)


def main(argv: list[str]) -> int:
    """``squashstore-hook poststop``: `run_poststop` on stdin, its report, an exit code."""
    if argv != [STAGE]:
        sys.stderr.write(f"usage: {PROGRAM} {STAGE} (the OCI hook: podman runs it, with the "
                         "container's state on stdin)\n")
        return 2
    try:
        outcomes = run_poststop(sys.stdin.buffer.read())
        if not outcomes:
            return 0
        from squashstore.cli.hook import report

        return report(outcomes, "table", False)
    except (SquashstoreError, OSError) as exc:
        from squashstore.cli.main import one_line

        sys.stderr.write(f"squashstore: {one_line(exc)}\n")
        return 1


def run() -> None:
    """The program's entry point (the launcher's and the console script's)."""
    sys.exit(main(sys.argv[1:]))


def hook_json() -> dict[str, Any]:
    """The OCI hook configuration `squashstore config --hooks` prints: the hook's program
    as this install starts it fastest (`squashstore.launcher.command`)."""
    from squashstore import launcher

    argv = launcher.command(PROGRAM)
    return {"version": "1.0.0", "hook": {"path": argv[0], "args": [*argv, STAGE]},
            "when": {"always": True}, "stages": [STAGE]}
