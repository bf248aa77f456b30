"""Cleanup of squash mounts: what to do with each (a pure decision) and doing it.

`observe` gathers, under the mount registry's lock, the state of every mount the registry
records plus every mount over a layer of a known squash store found in ``/proc/self/mountinfo``
that the registry does not know (adopted after lost state), with the containers using each (see
`squashstore.tracker`). `decide` is a pure function of that state: a record whose mount is gone
is dropped; a dead mount (FUSE server gone: ENOTCONN) is always unmounted, lazily; a mount with a
running, paused or starting user is kept; a mount younger than
``[cleanup] min_age`` (being set up) is kept;
an unused mount older than the grace period is unmounted. `carry_out` does it (still under the
lock, so no container start interleaves): unmount, lazily when busy; let the FUSE server exit
(a dead mount's hung server is killed, a live one never); forget the record; write records for
adopted mounts that stay. `poststop` is the OCI hook's variant: the mounts the stopping
container used are unmounted at once when no other container uses them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from squashstore import config, host, podmanstore, storelayout, tracker, trust
from squashstore.config import Config, PodmanStore
from squashstore.errors import SquashstoreError
from squashstore.hook import StoppingContainer, StoppingLayers, stopping_layers
from squashstore.mountrecords import FSTYPE_BACKENDS, MountRecord
from squashstore.mountrecords import RecordRegistry as Registry
from squashstore.tracker import User

TYPE_CHECKING = False  # not typing's: the OCI hook (every container stop) skips typing
if TYPE_CHECKING:
    from typing import Any

# The OCI hook imports this module at every container stop: `squashstore.store` and the
# mounters (`squashstore.mounts`) are imported only where a mount is adopted or unmounted
# (NOTES.md, "Poststop hook cost (branch hook)").

SERVER_EXIT_WAIT = 2.0
"""Seconds a FUSE server gets to exit by itself after its mount is gone."""

KEEP, UNMOUNT, UNMOUNT_DEAD, FORGET = "keep", "unmount", "unmount-dead", "forget"


@dataclass(frozen=True)
class MountState:
    """One squash mount (or registry record) as observed."""

    mountpoint: str
    layer: str
    image: str = ""
    backend: str = ""
    fstype: str | None = None
    """The mount's file system type; None when nothing is mounted there."""
    alive: bool = True
    since: float | None = None
    """When it was mounted; None when unknown (adopted)."""
    pid: int | None = None
    recorded: bool = True
    users: tuple[User, ...] = ()
    device: str = ""
    """``major:minor`` of the mounted file system (to find it in other mount namespaces)."""
    hung: bool = False
    """The server neither answered nor failed within the probe's time (not `alive`)."""


@dataclass(frozen=True)
class Decision:
    """What cleanup does with one mount, and why."""

    mount: MountState
    action: str
    reason: str


@dataclass
class Outcome:
    """A decision and how carrying it out went."""

    decision: Decision
    done: bool = False
    lazy: bool = False
    error: str = ""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        m = self.decision.mount
        return {"mountpoint": m.mountpoint, "image": m.image, "layer": m.layer,
                "backend": m.backend, "pid": m.pid, "adopted": not m.recorded,
                "action": self.decision.action, "reason": self.decision.reason,
                "done": self.done, "lazy": self.lazy, "error": self.error,
                "notes": self.notes, "users": [u.to_json() for u in m.users]}


# --------------------------------------------------------------------------- the decision

def decide(mounts: Iterable[MountState], now: float, grace: float,
           min_age: float = config.DEFAULT_MIN_AGE) -> list[Decision]:
    """The action for every mount (pure)."""
    out = []
    for m in mounts:
        age = None if m.since is None else now - m.since
        if m.fstype is None:
            out.append(Decision(m, FORGET, "mount gone"))
        elif not m.alive and not (m.hung and m.users):
            # A slow server that containers use is left alone: only a dead one (ENOTCONN),
            # or a hung one nobody uses, is unmounted.
            out.append(Decision(m, UNMOUNT_DEAD, "hung, unused" if m.hung
                                else "dead (server gone)"))
        elif m.users:
            names = ", ".join(u.describe() for u in m.users[:3])
            more = f" and {len(m.users) - 3} more" if len(m.users) > 3 else ""
            slow = "; its server does not answer" if m.hung else ""
            out.append(Decision(m, KEEP, f"in use by {names}{more}{slow}"))
        elif age is not None and age < min_age:
            out.append(Decision(m, KEEP, f"being set up ({age:.0f}s old)"))
        elif age is not None and age < grace:
            out.append(Decision(m, KEEP, f"unused, {age:.0f}s old (grace {grace:.0f}s)"))
        else:
            out.append(Decision(m, UNMOUNT, "unused" if age is None
                                else f"unused, {age:.0f}s old"))
    return out


# --------------------------------------------------------------------------- observing

def store_layer_of(mountpoint: str) -> tuple[Path, str] | None:
    """``S/overlay/<LID>/diff`` -> (S, LID)."""
    return podmanstore.overlay_layer(mountpoint, "diff")


def _image_of(store_root: Path, layer: str) -> str:
    layout = podmanstore.Layout(store_root, "overlay")
    with contextlib.suppress(SquashstoreError, OSError, ValueError):
        return podmanstore.image_of_layer(layout.images_json, layer)
    return ""


def _adoptable(mounts: Mapping[str, host.MountEntry], known: set[str],
               store_roots: Iterable[Path]) -> list[tuple[host.MountEntry, Path, str]]:
    roots = {os.path.realpath(r) for r in store_roots}
    out = []
    for point, entry in sorted(mounts.items()):
        found = store_layer_of(point)
        if point in known or found is None or str(found[0]) not in roots:
            continue
        if storelayout.is_store(found[0]):
            out.append((entry, found[0], found[1]))
    return out


def _liveness(entry: host.MountEntry | None) -> dict[str, bool]:
    """``alive`` and ``hung`` of a mount (none: neither alive nor hung)."""
    if entry is None:
        return {"alive": False, "hung": False}
    alive = host.probe(Path(entry.mountpoint), host.LIVENESS_TIMEOUT)
    return {"alive": bool(alive), "hung": alive is None}


STATES = ("alive", "dead", "hung", "gone")


def mount_state(entry: host.MountEntry | None) -> str:
    """One word for a mount (`STATES`), from the same probe `observe` uses: ``gone`` when
    nothing is mounted there, ``dead`` when its server is gone (ENOTCONN), ``hung`` when it
    gives no answer in `host.LIVENESS_TIMEOUT` seconds."""
    live = _liveness(entry)
    if entry is None:
        return "gone"
    return "alive" if live["alive"] else "hung" if live["hung"] else "dead"


def observe(registry: Registry, store_roots: Iterable[Path], settings: Config,
            now: float | None = None) -> list[MountState]:
    """Every recorded mount and every adoptable one, with its users (call under the lock)."""
    now = time.time() if now is None else now
    records = registry.records()
    table = host.mount_table()
    entries = host.read_mountinfo()
    devices = {m.mountpoint: m.device for m in entries}
    users = tracker.observe_users(records, settings, entries, now)
    states = [_record_state(r, table, users, devices) for r in records]
    scope = list(store_roots)
    for record in records:
        found = store_layer_of(record.mountpoint)
        if found is not None:
            scope.append(found[0])
    for entry, root, layer in _adoptable(table, {r.mountpoint for r in records}, scope):
        pid = host.server_pid(entry.mountpoint) if entry.fstype.startswith("fuse") else None
        age = host.process_age(pid) if pid is not None else None
        live = _liveness(entry)
        states.append(MountState(entry.mountpoint, layer, _image_of(root, layer),
                                 _mounter_name(entry.fstype), entry.fstype,
                                 live["alive"], None if age is None else now - age, pid,
                                 False, _users_of(entry.mountpoint, layer, users),
                                 devices.get(entry.mountpoint, ""), live["hung"]))
    return states


def _mounter_name(fstype: str) -> str:
    from squashstore.mounts import mounter_for_fstype  # only when a mount is adopted

    return mounter_for_fstype(fstype).name


def _users_of(mountpoint: str, layer: str, users: Iterable[User]) -> tuple[User, ...]:
    return tuple(u for u in users if u.uses(mountpoint, layer))


def _record_state(record: MountRecord, table: Mapping[str, host.MountEntry],
                  users: list[User], devices: Mapping[str, str]) -> MountState:
    entry = table.get(record.mountpoint)
    live = _liveness(entry)
    # The grace period runs from the last container start the mount program recorded.
    starts = [u.since for u in record.users if u.since is not None]
    since = max([record.since, *starts])
    return MountState(record.mountpoint, record.layer, record.image, record.backend,
                      entry.fstype if entry else None, live["alive"],
                      since, record.pid, True,
                      _users_of(record.mountpoint, record.layer, users),
                      devices.get(record.mountpoint, ""), live["hung"])


# --------------------------------------------------------------------------- doing it

def _forget(registry: Registry, mountpoint: str) -> None:
    registry.forget(Path(mountpoint))


def _adopt(registry: Registry, m: MountState, now: float) -> None:
    found = store_layer_of(m.mountpoint)
    squash = str(storelayout.squash_file(found[0], found[1])) if found else ""
    registry.write(MountRecord(m.image, m.layer, squash, m.mountpoint, m.backend, m.pid,
                                m.since if m.since is not None else now))


def _check_store_of(mountpoint: str) -> None:
    """As root, a mount in a store other users can change is left alone (`trust`)."""
    found = store_layer_of(mountpoint)
    if found is not None and storelayout.is_store(found[0]):
        storelayout.check(found[0])


def _unmount(m: MountState, lazy: bool) -> bool:
    """Unmount; returns whether it had to be lazy. Raises MountError (UnsafeStore when the
    mount is not a squash mount reached without symlinks, or its store is unsafe)."""
    from squashstore.mounts import MountError, mounter_for_fstype

    point = Path(m.mountpoint)
    trust.check_unmount(point, m.fstype, FSTYPE_BACKENDS)
    _check_store_of(m.mountpoint)
    unmounter = mounter_for_fstype(m.fstype or "")
    if not lazy:
        try:
            unmounter.umount(point, lazy=False)
            return False
        except MountError:
            if not host.is_mountpoint(point):
                return False
    unmounter.umount(point, lazy=True)
    return True


def _serves(pid: int, mountpoint: str) -> bool:
    """Whether ``pid`` is still the server of ``mountpoint`` (not a recycled pid)."""
    return host.names_argument(pid, mountpoint)


def _end_server(m: MountState, wait: float) -> str:
    """Let the FUSE server of an unmounted file system exit; kill it if its mount was dead.

    A live server is never killed: when it does not exit, the file system is still referenced
    (a lazily detached mount with open files, an overlay over it, a copy of the mount in
    another mount namespace) and the server exits by itself once the last reference goes.
    """
    pid = m.pid
    if pid is None or not _serves(pid, m.mountpoint):
        return ""
    if not m.alive:
        import signal  # its enums cost every hook call ~4 ms to import; needed only here

        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        return f"hung server {pid} killed"
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and _serves(pid, m.mountpoint):
        time.sleep(host.POLL_INTERVAL)
    if not _serves(pid, m.mountpoint):
        return f"server {pid} exited"
    where = ("; still mounted in another mount namespace"
             if m.device and host.other_namespace_devices().get(m.device, 0) else "")
    return f"server {pid} exits when the file system is released{where}"


def carry_out(registry: Registry, decision: Decision, now: float,
              server_wait: float = SERVER_EXIT_WAIT) -> Outcome:
    """One decision (under the registry's lock)."""
    outcome = Outcome(decision)
    m = decision.mount
    try:
        if decision.action == KEEP:
            if not m.recorded:
                _adopt(registry, m, now)
                outcome.notes.append("adopted")
        elif decision.action == FORGET:
            _forget(registry, m.mountpoint)
        else:
            outcome.lazy = _unmount(m, lazy=decision.action == UNMOUNT_DEAD)
            note = _end_server(m, 0.2 if outcome.lazy else server_wait)
            if note:
                outcome.notes.append(note)
            _forget(registry, m.mountpoint)
        outcome.done = True
    except (SquashstoreError, OSError) as exc:
        outcome.error = " ".join(str(exc).split()) or type(exc).__name__
    return outcome


def cleanup(registry: Registry, store_roots: Iterable[Path], grace: float,
            dry_run: bool = False, settings: Config | None = None,
            min_age: float | None = None) -> list[Outcome]:
    """Observe, decide and (unless ``dry_run``) act, all under the registry's lock."""
    settings = config.load() if settings is None else settings
    if min_age is None:
        min_age = settings.cleanup.min_age
    with registry.locked():
        if not dry_run:
            registry.tidy()  # records `forget` cannot find: before they are observed
        now = time.time()
        decisions = decide(observe(registry, store_roots, settings, now), now, grace, min_age)
        if dry_run:
            return [Outcome(d) for d in decisions]
        return [carry_out(registry, d, now) for d in decisions]


# --------------------------------------------------------------------------- the hook

def poststop(registry: Registry, container: StoppingContainer,
             settings: Config | None = None,
             layers: StoppingLayers | None = None) -> list[Outcome]:
    """Unmount the squash mounts ``container`` used that no other container uses now
    (`layers`: its `squashstore.hook.stopping_layers`, when read already)."""
    layers = stopping_layers(container) if layers is None else layers
    if not layers.may_use_a_store():
        return []
    layer, below = layers.layer, layers.below
    settings = config.load() if settings is None else settings
    stores = (*settings.cleanup.podman_stores, PodmanStore(container.graphroot))
    settings = settings.replace(cleanup=settings.cleanup.replace(podman_stores=stores))
    with registry.locked():
        now = time.time()
        states = observe(registry, (), settings, now)
        exact = {u.mounts for s in states for u in s.users if u.container == container.id}
        mine = set().union(*exact) if exact else set()
        states = [s for s in states if s.mountpoint in mine or (not mine and s.layer in below)]
        states = [replace(s, users=tuple(u for u in s.users if u.container != container.id
                                         and u.layer != layer)) for s in states]
        return [carry_out(registry, d, now, server_wait=0.0)
                for d in decide(states, now, 0.0, 0.0)]
