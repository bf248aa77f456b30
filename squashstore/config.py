"""The project configuration: one typed `Config`, read from its files once.

This module owns squashstore's own configuration file (TOML: ``$SQUASHSTORE_CONFIG`` if set,
else ``/etc/squashstore/config.toml`` overlaid by ``$XDG_CONFIG_HOME/squashstore/config.toml``,
tables merged one level deep): its schema (``[mount] backend = "fuse" | "kernel" |
"squashfuse"``, default fuse, squashstore's own server; ``[mount] overlay = "auto" |
"fuse-overlayfs" | "kernel"`` for the mount program; ``[cleanup] grace`` and ``min_age`` in
seconds and ``podman_stores``, graphroot strings or ``{graphroot=..., runroot=...}`` tables;
``[registry] stall`` and ``timeout`` in seconds; ``[lazy] cache_dir``, a node-local
directory for lazily pulled images' cached bytes), its defaults, and the one loader:
`load()` parses and checks every value into read-only records (`Slots`: the mount program
reads this at every container start), and reads the files again only when one of them
changed (so the mount program, cleanup and the CLI share one parse per process). podman's
own configuration is not here (see `squashstore.podmanconf`). The mount program's path
(`load` with a current cache) imports neither pathlib nor json nor threading: paths are
strings and the cache is read with `squashstore.jsonfast`.
"""

from __future__ import annotations

import _thread
import os

from squashstore import jsonfast, trust
from squashstore.errors import SquashstoreError
from squashstore.slots import Slots

TYPE_CHECKING = False  # not typing's: the mount program starts without importing typing
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path
    from typing import Any

    StrPath = str | os.PathLike[str]


class ConfigError(SquashstoreError):
    """The project configuration file is unreadable or has a bad value."""


SYSTEM_CONFIG = "/etc/squashstore/config.toml"
TABLES = ("mount", "cleanup", "registry", "lazy")
"""The tables of the project configuration; each must be a TOML table."""
MOUNT_BACKENDS = ("fuse", "kernel", "squashfuse")
"""``[mount] backend``: the mounters of `squashstore.mounts`; the first is the default."""
OVERLAYS = ("auto", "fuse-overlayfs", "kernel")
"""``[mount] overlay``: how the mount program mounts the overlay; the first is the default."""
DEFAULT_GRACE = 600.0
"""Seconds an unused mount stays (``[cleanup] grace``)."""
DEFAULT_MIN_AGE = 5.0
"""A mount younger than this is being set up for a starting container: cleanup never
touches it (``[cleanup] min_age``)."""
DEFAULT_STALL = 30.0
"""Seconds a registry transfer may go without receiving a byte before it counts as stalled
and is retried (a download resumes where it stopped) (``[registry] stall``)."""
MAX_SECONDS = 86400.0 * 365
"""The longest any time setting may be (a year): a larger one overflows socket timeouts."""
DEFAULT_REGISTRY_TIMEOUT = 0.0
"""Seconds a command may spend on a registry in all before it gives up; 0: no limit
(``[registry] timeout``, ``--timeout``)."""


class PodmanStore(Slots):
    """A podman (primary) store whose containers may use squash mounts; `runroot` (its
    ``overlay-layers/mountpoints.json``) also tells what is mounted in other namespaces."""

    __slots__ = ("graphroot", "runroot")
    graphroot: str
    runroot: str | None

    def __init__(self, graphroot: str, runroot: str | None = None) -> None:
        self.graphroot = graphroot
        self.runroot = runroot


class MountSettings(Slots):
    """The ``[mount]`` table."""

    __slots__ = ("backend", "overlay")
    backend: str
    overlay: str

    def __init__(self, backend: str = MOUNT_BACKENDS[0], overlay: str = OVERLAYS[0]) -> None:
        self.backend = backend
        self.overlay = overlay


class CleanupSettings(Slots):
    """The ``[cleanup]`` table."""

    __slots__ = ("grace", "min_age", "podman_stores")
    grace: float
    min_age: float
    podman_stores: tuple[PodmanStore, ...]

    def __init__(self, grace: float = DEFAULT_GRACE, min_age: float = DEFAULT_MIN_AGE,
                 podman_stores: tuple[PodmanStore, ...] = ()) -> None:
        self.grace = grace
        self.min_age = min_age
        self.podman_stores = podman_stores


class RegistrySettings(Slots):
    """The ``[registry]`` table."""

    __slots__ = ("stall", "timeout")
    stall: float
    timeout: float

    def __init__(self, stall: float = DEFAULT_STALL,
                 timeout: float = DEFAULT_REGISTRY_TIMEOUT) -> None:
        self.stall = stall
        self.timeout = timeout


class LazySettings(Slots):
    """The ``[lazy]`` table: `cache_dir` is where this node's FUSE servers keep the bytes
    they fetch of lazily pulled images (``~`` and ``$VARS`` expanded when used), instead of
    the store's squash file: a shared store, perhaps read-only to this user, keeps only the
    marker. None: in the store."""

    __slots__ = ("cache_dir",)
    cache_dir: str | None

    def __init__(self, cache_dir: str | None = None) -> None:
        self.cache_dir = cache_dir

    def cache_path(self) -> Path | None:
        """`cache_dir` expanded (``~``, ``$VAR``); `ConfigError` when it is not absolute."""
        if self.cache_dir is None:
            return None
        from pathlib import Path

        path = os.path.expandvars(os.path.expanduser(self.cache_dir))
        if not os.path.isabs(path):
            raise ConfigError(f"config [lazy] cache_dir = {self.cache_dir!r}: expected an "
                              f"absolute path (got {path!r})")
        return Path(path)


class Config(Slots):
    """The whole project configuration."""

    __slots__ = ("cleanup", "lazy", "mount", "registry")
    mount: MountSettings
    cleanup: CleanupSettings
    registry: RegistrySettings
    lazy: LazySettings

    def __init__(self, mount: MountSettings | None = None,
                 cleanup: CleanupSettings | None = None,
                 registry: RegistrySettings | None = None,
                 lazy: LazySettings | None = None) -> None:
        self.mount = MountSettings() if mount is None else mount
        self.cleanup = CleanupSettings() if cleanup is None else cleanup
        self.registry = RegistrySettings() if registry is None else registry
        self.lazy = LazySettings() if lazy is None else lazy


def config_paths() -> list[str]:
    """Configuration files in the order they are read (later ones win)."""
    env = os.environ.get("SQUASHSTORE_CONFIG")
    if env:
        return [env]
    home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"),
                                                             ".config")
    return [SYSTEM_CONFIG, os.path.join(home, "squashstore", "config.toml")]


def read_tables(paths: Sequence[StrPath]) -> dict[str, Any]:
    """The merged TOML of `paths` (missing files skipped; tables merged one level deep)."""
    merged: dict[str, Any] = {}
    for path in paths:
        try:
            with open(path) as file:
                text = file.read()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        import tomllib  # only when a file exists: the mount program starts without it

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        for key, value in data.items():
            if key in TABLES and not isinstance(value, dict):
                raise ConfigError(f"{path}: {key!r} must be a table ([{key}])")
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged


def _choice(table: Mapping[str, Any], name: str, key: str, choices: tuple[str, ...]) -> str:
    value = table.get(key, choices[0])
    if value not in choices:
        raise ConfigError(f"config [{name}] {key} = {value!r}: expected one of "
                          + ", ".join(choices))
    return str(value)


def _seconds(table: Mapping[str, Any], name: str, key: str, default: float,
             positive: bool = False) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
            value != value or value > MAX_SECONDS or (positive and value == 0):
        raise ConfigError(f"config [{name}] {key} = {value!r}: expected seconds "
                          f"{'> 0' if positive else '>= 0'}, at most {MAX_SECONDS:.0f}")
    return float(value)


def _stores(items: object) -> tuple[PodmanStore, ...]:
    """``podman_stores`` entries; malformed ones are ignored, as podman ignores them."""
    out = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, str):
            out.append(PodmanStore(item))
        elif isinstance(item, dict) and isinstance(item.get("graphroot"), str):
            runroot = item.get("runroot")
            out.append(PodmanStore(item["graphroot"],
                                   runroot if isinstance(runroot, str) else None))
    return tuple(out)


def parse(data: Mapping[str, Any]) -> Config:
    """The typed configuration of merged TOML tables; `ConfigError` for a bad value."""
    mount = data.get("mount", {})
    cleanup = data.get("cleanup", {})
    cache_dir = data.get("lazy", {}).get("cache_dir")
    if cache_dir is not None and (not isinstance(cache_dir, str) or not cache_dir):
        raise ConfigError(f"config [lazy] cache_dir = {cache_dir!r}: expected a path")
    registry = data.get("registry", {})
    return Config(
        MountSettings(_choice(mount, "mount", "backend", MOUNT_BACKENDS),
                      _choice(mount, "mount", "overlay", OVERLAYS)),
        CleanupSettings(_seconds(cleanup, "cleanup", "grace", DEFAULT_GRACE),
                        _seconds(cleanup, "cleanup", "min_age", DEFAULT_MIN_AGE),
                        _stores(cleanup.get("podman_stores", []))),
        RegistrySettings(_seconds(registry, "registry", "stall", DEFAULT_STALL, positive=True),
                         _seconds(registry, "registry", "timeout", DEFAULT_REGISTRY_TIMEOUT)),
        LazySettings(cache_dir),
    )


Stamp = tuple[tuple[str, int, int, int, int, int], ...]
"""What `load` knows the config files by: (path, device, inode, ctime, mtime, size) each
(-1s when absent). The inode and the change time too: a file replaced by one of the same
size with its mtime kept (``cp -p``, ``rsync -t``, a package) is another file, and no one
can set a change time."""
_loaded: dict[Stamp, Config] = {}
_lock = _thread.allocate_lock()  # _thread, not threading: the mount program starts fast


def _stamp(paths: list[str]) -> Stamp:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((path, -1, -1, -1, -1, -1))
            continue
        out.append((path, st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size))
    return tuple(out)


def load(cache: StrPath | None = None) -> Config:
    """The project configuration, parsed once per process while its files stay the same.

    With `cache`, the merged tables of the files are also kept there as JSON for the next
    process while the files stay the same: the mount program keeps them in its mount
    registry, since importing tomllib alone is ~43 M instructions, more than a quarter of a
    container start when a config file exists. As root, the cache is used only while no
    one else can change it (`trust.check_entry`; its directory is the registry, checked)."""
    paths = config_paths()
    stamp = _stamp(paths)
    with _lock:
        cached = _loaded.get(stamp)
        if cached is not None:
            return cached
    tables = _read_cache(cache, stamp) if cache is not None else None
    if tables is None:
        tables = read_tables(paths)
        if cache is not None:
            _write_cache(cache, stamp, tables)
    config = parse(tables)
    with _lock:
        _loaded.clear()
        _loaded[stamp] = config
    return config


def _read_cache(cache: StrPath, stamp: Stamp) -> dict[str, Any] | None:
    """The tables `_write_cache` kept for the files as they are now, else None."""
    trust.check_entry(cache, what="a mount registry")
    try:
        with open(cache, "rb") as file:
            data = jsonfast.loads(file.read())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("stamp") != [list(item) for item in stamp]:
        return None
    tables = data.get("tables")
    return tables if isinstance(tables, dict) else None


def _write_cache(cache: StrPath, stamp: Stamp,
                 tables: dict[str, Any]) -> None:
    """Keep `tables` for `stamp` (best effort: tables JSON cannot hold are not kept)."""
    from squashstore.atomic import atomic_write_json

    try:  # noqa: SIM105 (contextlib is not on the mount program's path)
        atomic_write_json(cache, {"stamp": [list(item) for item in stamp], "tables": tables},
                          durable=False)
    except (OSError, TypeError, ValueError):
        pass
