"""The host environment squashstore runs in: runtime dir, project config, processes, podman.

Owns where per-host state lives (the runtime directory: ``$SQUASHSTORE_RUNTIME_DIR``, else
``/run/squashstore`` for real root, else ``$XDG_RUNTIME_DIR/squashstore`` or
``/run/user/UID/squashstore``), the project configuration file (TOML: ``$SQUASHSTORE_CONFIG``
if set, else ``/etc/squashstore/config.toml`` overlaid by
``$XDG_CONFIG_HOME/squashstore/config.toml``; keys: ``[mount] backend = "fuse" | "kernel" |
"squashfuse"`` (default fuse, squashstore's own server), ``[mount] overlay = "auto" |
"fuse-overlayfs" | "kernel"`` for the mount program, and cleanup's ``[cleanup]`` table),
process identity (pid +
kernel start time, so a recycled pid is never mistaken for a live writer) and calling the
user's local podman, which finds its own configuration (``CONTAINERS_CONF``,
``CONTAINERS_STORAGE_CONF``) from the environment we pass through.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from squashstore.image import SquashstoreError


class ConfigError(SquashstoreError):
    """The project configuration file is unreadable or has a bad value."""


class PodmanError(SquashstoreError):
    """The local podman failed or is missing."""


SYSTEM_CONFIG = Path("/etc/squashstore/config.toml")


def is_real_root() -> bool:
    """Root in the initial user namespace (not root inside a rootless user namespace)."""
    if os.geteuid() != 0:
        return False
    try:
        uid_map = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return True
    return uid_map[:3] == ["0", "0", "4294967295"]


def runtime_dir() -> Path:
    """Per-host (per user namespace) state: the mount registry lives here."""
    env = os.environ.get("SQUASHSTORE_RUNTIME_DIR")
    if env:
        return Path(env)
    if is_real_root():
        return Path("/run/squashstore")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "squashstore"
    return Path(f"/run/user/{os.getuid()}/squashstore")


def config_paths() -> list[Path]:
    """Configuration files in the order they are read (later ones win)."""
    env = os.environ.get("SQUASHSTORE_CONFIG")
    if env:
        return [Path(env)]
    home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [SYSTEM_CONFIG, Path(home) / "squashstore" / "config.toml"]


CONFIG_TABLES = ("mount", "cleanup")
"""The tables of the project configuration; each must be a TOML table."""


def load_config() -> dict[str, Any]:
    """The merged project configuration (tables merged one level deep)."""
    merged: dict[str, Any] = {}
    for path in config_paths():
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        for key, value in data.items():
            if key in CONFIG_TABLES and not isinstance(value, dict):
                raise ConfigError(f"{path}: {key!r} must be a table ([{key}])")
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged


def config_value(table: str, key: str, default: str, choices: tuple[str, ...]) -> str:
    """One string setting ``[table] key``, checked against ``choices``."""
    value = load_config().get(table, {}).get(key, default)
    if value not in choices:
        raise ConfigError(f"config [{table}] {key} = {value!r}: expected one of "
                          + ", ".join(choices))
    return str(value)


@dataclass(frozen=True)
class ProcessId:
    """A process identity that survives pid reuse: host, pid and kernel start time."""

    host: str
    pid: int
    start: int

    def tag(self) -> str:
        return f"{self.host}.{self.pid}.{self.start}"

    @classmethod
    def parse(cls, tag: str) -> ProcessId | None:
        host, _, rest = tag.rpartition(".")
        host, _, pid = host.rpartition(".")
        try:
            return cls(host, int(pid), int(rest))
        except ValueError:
            return None

    def is_alive(self) -> bool:
        """Whether this process still runs (unknown for other hosts: assumed alive)."""
        if self.host != hostname():
            return True
        return process_start(self.pid) == self.start


def hostname() -> str:
    return socket.gethostname().replace(".", "_") or "localhost"


def process_start(pid: int) -> int | None:
    """The kernel start time (clock ticks since boot) of ``pid``, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def me() -> ProcessId:
    start = process_start(os.getpid())
    return ProcessId(hostname(), os.getpid(), start or 0)


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


def layer_children(graphroot: Path, layer_id: str) -> list[str]:
    """Ids of the layers in a podman store whose parent is ``layer_id``.

    Containers and images built FROM a store image both have such a layer.
    """
    try:
        records = json.loads((graphroot / "overlay-layers" / "layers.json").read_text())
    except (OSError, ValueError):
        return []
    return [str(r.get("id")) for r in records
            if isinstance(r, dict) and r.get("parent") == layer_id]


def _unescape_mountinfo(field: str) -> str:
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


@dataclass(frozen=True)
class MountEntry:
    """One line of a ``mountinfo`` file."""

    mountpoint: str
    fstype: str
    source: str
    mount_id: int = 0
    device: str = ""
    """``major:minor`` of the mounted file system: the same in every mount namespace."""
    super_options: str = ""


def parse_mountinfo(text: str) -> list[MountEntry]:
    """The lines of a ``/proc/PID/mountinfo`` file."""
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 2:
            continue
        out.append(MountEntry(_unescape_mountinfo(fields[4]), rfields[0],
                              _unescape_mountinfo(rfields[1]), int(fields[0]), fields[2],
                              rfields[2] if len(rfields) > 2 else ""))
    return out


def read_mountinfo(pid: int | str = "self") -> list[MountEntry]:
    """A process's mount table (empty when it is gone or not ours to read)."""
    try:
        with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as file:
            return parse_mountinfo(file.read())
    except OSError:
        return []


def mount_table() -> dict[str, MountEntry]:
    """The current mount namespace's mounts by mount point (the topmost one wins)."""
    return {entry.mountpoint: entry for entry in read_mountinfo()}


def overlay_layer(path: str | Path, leaf: str) -> tuple[Path, str] | None:
    """``<root>/overlay/<layer>/<leaf>`` -> (root, layer): where containers/storage's overlay
    driver (and a squash store, which has its layout) keeps a layer's ``diff`` or ``merged``."""
    path = Path(path)
    if path.name != leaf or path.parent.parent.name != "overlay":
        return None
    return path.parent.parent.parent, path.parent.name


def is_mountpoint(path: Path) -> bool:
    """Whether ``path`` is a mount point; unlike os.path.ismount, true for dead FUSE mounts."""
    return real_path(path) in mount_table()


def real_path(path: Path) -> str:
    """``path`` with its parent's symlinks resolved, never stat-ing ``path`` itself."""
    absolute = Path(os.path.abspath(path))
    return os.path.join(os.path.realpath(absolute.parent), absolute.name)
