"""Who uses a squash mount: observing podman stores, mount tables and processes (read only).

A squash mount over a store layer ``S/overlay/<LID>/diff`` is in use while some container's
overlay that has the layer among its lowerdirs is mounted, which is the case exactly while the
container runs or is paused (podman unmounts it when the container stops), directly or through
an image built FROM the store image (its layers' ``parent`` chain in podman's ``layers.json``
reaches LID). The tracker finds users in every podman store it knows of: the graphroots the
mount program recorded (``<graphroot>/overlay/<layer>/diff`` is the upperdir it is given),
those with an overlay mounted in this mount namespace, and those listed in the project config
(``[cleanup] podman_stores``, optionally with the runroot whose
``overlay-layers/mountpoints.json`` says what is mounted, also in other mount namespaces).
It reads podman's files (``overlay-containers/containers.json``, ``overlay-layers/layers.json``,
the runroot's mount state, ``/proc/*/mountinfo``) and never runs podman: that is much faster
(see bench/bench_cleanup.py) and works inside an OCI hook, while podman holds the container's
lock. A container start the mount program recorded counts as a user too while that mount
program still runs (its overlay is not mounted yet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from squashstore import host, podmanstore
from squashstore.config import Config, PodmanStore
from squashstore.mountrecords import MountRecord, RecordedUse
from squashstore.mountrecords import RecordRegistry as Registry

TYPE_CHECKING = False  # not typing's: the OCI hook (every container stop) skips it
if TYPE_CHECKING:  # neither the store, nor the mounters, nor typing at run time
    from typing import Any, TypeVar

    from squashstore.store import StoreImage

    T = TypeVar("T")


def graphroot_of_upperdir(path_text: str) -> str | None:
    """``<graphroot>/overlay/<layer>/diff`` -> graphroot."""
    found = podmanstore.overlay_layer(path_text, "diff")
    return None if found is None else str(found[0])


def graphroots_mounted(mount_points: Iterable[str]) -> set[str]:
    """Graphroots with an overlay mounted on ``<graphroot>/overlay/<layer>/merged``."""
    roots = {r for p in mount_points if (r := graphroot_of_merged(p)) is not None}
    return {r for r in roots if podmanstore.Layout(Path(r)).layers_json.is_file()}


def known_stores(records: Iterable[MountRecord], settings: Config,
                 mount_points: Iterable[str] = ()) -> list[PodmanStore]:
    """The stores of the config, those the mount program recorded, and those with an overlay
    mounted here (which finds the users again after the registry's state was lost)."""
    found: dict[str, PodmanStore] = {}
    for store in settings.cleanup.podman_stores:
        found[os.path.abspath(store.graphroot)] = store
    roots = {graphroot_of_upperdir(user.upperdir) for record in records for user in record.users}
    for root in sorted({r for r in roots if r} | graphroots_mounted(mount_points)):
        found.setdefault(os.path.abspath(root), PodmanStore(os.path.abspath(root)))
    return list(found.values())


@dataclass(frozen=True)
class User:
    """A running (or starting) container, or another mounted overlay, using store layers."""

    graphroot: str
    layer: str
    """The podman layer whose overlay is mounted (a container's, or an image's)."""
    merged: str
    container: str = ""
    name: str = ""
    starting: bool = False
    store_layers: frozenset[str] = frozenset()
    """The user's layer and those below it, as far as its podman store knows them."""
    mounts: frozenset[str] = frozenset()
    """The squash mount points among its lowerdirs, when known exactly (from the overlay's
    options or the mount program's record); else the layer chain decides."""

    def uses(self, mountpoint: str, layer: str) -> bool:
        """Whether this user needs the squash mount of store layer ``layer`` on ``mountpoint``.

        A layer id alone may name the same image in two stores, hence the exact mounts first.
        """
        return mountpoint in self.mounts if self.mounts else layer in self.store_layers

    def describe(self) -> str:
        what = (f"container {self.container[:12]}" + (f" ({self.name})" if self.name else "")
                if self.container else f"layer {self.layer[:12]}")
        return what + (" (starting)" if self.starting else "")

    def to_json(self) -> dict[str, Any]:
        return {"container": self.container, "name": self.name, "layer": self.layer,
                "graphroot": self.graphroot, "merged": self.merged,
                "starting": self.starting}


def _tolerant(load: Callable[[Path], list[T]], path: Path) -> list[T]:
    try:
        return load(path)
    except podmanstore.PodmanStoreError:
        return []


@dataclass
class StoreView:
    """What one podman store's files say: layer parents, containers, mounted layers."""

    store: PodmanStore
    parents: dict[str, str] = field(default_factory=dict)
    containers: dict[str, tuple[str, str]] = field(default_factory=dict)
    """layer id -> (container id, first name)."""
    counted_mounts: set[str] = field(default_factory=set)
    """Layers the runroot's mountpoints.json counts as mounted."""

    @classmethod
    def read(cls, store: PodmanStore) -> StoreView:
        """What the store's files say now; a record file podman is rewriting, or one that is
        damaged, says nothing (read without podman's locks, so it may be in flux)."""
        layout = podmanstore.Layout(Path(store.graphroot))
        view = cls(store)
        view.parents = podmanstore.parents(_tolerant(podmanstore.layers, layout.layers_json))
        for rec in _tolerant(podmanstore.containers, layout.containers_json):
            if rec.layer:
                view.containers[rec.layer] = (rec.id, rec.names[0] if rec.names else "")
        if store.runroot:
            counts = podmanstore.mount_counts_json(Path(store.runroot))
            view.counted_mounts = {r.id for r in _tolerant(podmanstore.mount_counts, counts)
                                   if r.count > 0}
        return view

    def overlay_dir(self) -> str:
        return os.path.join(self.store.graphroot, "overlay")

    def user(self, layer: str, merged: str, starting: bool = False,
             mounts: Iterable[str] = ()) -> User:
        container, name = self.containers.get(layer, ("", ""))
        return User(self.store.graphroot, layer, merged, container, name, starting,
                    frozenset(podmanstore.ancestors(layer, self.parents)), frozenset(mounts))


def mounted_layers(view: StoreView, mount_points: Iterable[str]) -> dict[str, str]:
    """Layers of the store with an overlay mounted on ``<graphroot>/overlay/<layer>/merged``."""
    prefix = view.overlay_dir() + os.sep
    out = {}
    for point in mount_points:
        if point.startswith(prefix) and point.endswith(os.sep + "merged"):
            layer = point[len(prefix):-len(os.sep + "merged")]
            if os.sep not in layer:
                out[layer] = point
    for layer in view.counted_mounts:
        out.setdefault(layer, os.path.join(view.overlay_dir(), layer, "merged"))
    return out


def find_users(views: Iterable[StoreView], mount_points: Iterable[str],
               records: Iterable[MountRecord], now: float | None = None,
               lowerdirs: Mapping[str, Iterable[str]] | None = None,
               starting_age: float = host.STARTING_WINDOW) -> list[User]:
    """Every mounted overlay of the known stores, and every recorded start still under way.

    ``lowerdirs``: merged directory -> its lowerdirs, resolved (see `overlay_lowerdirs`).
    """
    now = time.time() if now is None else now
    points = set(mount_points)
    records = list(records)
    exact: dict[str, set[str]] = {m: set(dirs) for m, dirs in (lowerdirs or {}).items()}
    for record in records:
        for use in record.users:
            if use.merged in points:
                exact.setdefault(use.merged, set()).add(record.mountpoint)
    users: list[User] = []
    by_root: dict[str, StoreView] = {}
    for view in views:
        by_root[view.store.graphroot] = view
        users += [view.user(layer, merged, mounts=exact.get(merged, ()))
                  for layer, merged in sorted(mounted_layers(view, points).items())]
    seen = {u.merged for u in users}
    for record in records:
        for use in record.users:
            merged = use.merged
            if merged in seen or not is_starting(use, points, now, starting_age):
                continue
            root = graphroot_of_upperdir(use.upperdir) or ""
            layer = Path(merged).parent.name
            known = by_root.get(root)
            user = known.user(layer, merged) if known else User(root, layer, merged)
            users.append(dataclasses.replace(user, starting=True,
                                             mounts=frozenset({record.mountpoint})))
            seen.add(merged)
    return users


def resolve_lowerdir(path: str, graphroot: str) -> str:
    """A lowerdir as podman passes it (``S/overlay/l/<short>``, or ``l/<short>`` relative to
    ``<graphroot>/overlay``) -> the real ``.../overlay/<layer>/diff``."""
    full = os.path.join(graphroot, "overlay", path)
    parent = os.path.dirname(full)
    if os.path.basename(parent) == "l":
        with contextlib.suppress(OSError):
            return os.path.normpath(os.path.join(parent, os.readlink(full)))
    return os.path.normpath(full)


def _lowerdir_option(options: str) -> list[str]:
    for item in options.split(","):
        key, _, value = item.partition("=")
        if key == "lowerdir":
            return [d for d in value.split(":") if d]
    return []


def overlay_lowerdirs(entries: Iterable[host.MountEntry]) -> dict[str, list[str]]:
    """merged directory -> resolved lowerdirs, for every overlay mounted at
    ``<graphroot>/overlay/<layer>/merged``: the kernel's from its mount options, fuse-overlayfs's
    from its server's command line."""
    out: dict[str, list[str]] = {}
    fuse = set()
    for entry in entries:
        root = graphroot_of_merged(entry.mountpoint)
        if root is None:
            continue
        if entry.fstype == "overlay":
            dirs = _lowerdir_option(entry.super_options)
            if dirs:
                out[entry.mountpoint] = [resolve_lowerdir(d, root) for d in dirs]
        elif entry.fstype.startswith("fuse"):
            fuse.add(entry.mountpoint)
    if fuse:
        for argv in host.commands_named("fuse-overlayfs"):
            merged, options = argv[-1], ",".join(a for a in argv[1:-1] if "lowerdir=" in a)
            root = graphroot_of_merged(merged) if merged in fuse else None
            if root is not None and options:
                out[merged] = [resolve_lowerdir(d, root) for d in _lowerdir_option(options)]
    return out


def graphroot_of_merged(path_text: str) -> str | None:
    """``<graphroot>/overlay/<layer>/merged`` -> graphroot."""
    found = podmanstore.overlay_layer(path_text, "merged")
    return None if found is None else str(found[0])


def is_starting(use: RecordedUse, mount_points: set[str], now: float,
                starting_age: float = host.STARTING_WINDOW) -> bool:
    """A recorded container start whose overlay is not mounted yet: the mount program (the
    recorded pid, which becomes the overlay's ``mount``) still runs, and recently started."""
    since, pid = use.since, use.pid
    if since is None or pid is None:
        return False
    if use.merged in mount_points or now - since >= starting_age:
        return False
    age = host.process_age(pid)
    # The recorded process started before it recorded the use; a recycled pid started later.
    return age is not None and age >= now - since - 1.0


def observe_users(records: list[MountRecord], settings: Config,
                  entries: list[host.MountEntry], now: float | None = None) -> list[User]:
    """Read the known podman stores and return the users of store layers (``entries``: this
    mount namespace's mountinfo)."""
    points = {e.mountpoint for e in entries}
    views = [StoreView.read(store) for store in known_stores(records, settings, points)]
    return find_users(views, points, records, now, overlay_lowerdirs(entries))


def image_users(image: StoreImage, registry: Registry, graphroot: Path | None) -> list[str]:
    """What uses a store image, for ``rmi`` and ``gc``: layers of the podman store at
    `graphroot` built on the image's layer (containers, images built FROM it), and the
    containers the mount program recorded whose overlay is mounted now."""
    users: list[str] = []
    if graphroot is not None:
        records = _tolerant(podmanstore.layers, podmanstore.Layout(graphroot).layers_json)
        users += [f"layer {lid[:12]}" for lid in podmanstore.children(records, image.layer)]
    record = registry.record(image.diff)
    if record is not None:
        mounted = host.mount_table()
        users += [f"container at {u.merged}" for u in record.users
                  if u.merged and u.merged in mounted]
    return users
