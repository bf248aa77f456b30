"""Finding the local podman's image storage, the way containers/storage finds it.

This module owns reading storage.conf: which file applies (``$CONTAINERS_STORAGE_CONF``; for
root ``/etc/containers/storage.conf`` then ``/usr/share/containers/storage.conf``; for other
users ``$XDG_CONFIG_HOME/containers/storage.conf``, falling back to the system file's options
with the rootless default locations), and from it the driver, graph root, run root and the
additional image stores, with containers/storage's defaults where the file is silent.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from squashstore import userns
from squashstore.image import SourceError

SYSTEM_CONF = Path("/etc/containers/storage.conf")
DEFAULT_CONF = Path("/usr/share/containers/storage.conf")
ROOT_GRAPHROOT = Path("/var/lib/containers/storage")
ROOT_RUNROOT = Path("/run/containers/storage")
DEFAULT_DRIVER = "overlay"


@dataclass(frozen=True)
class StorageConfig:
    """Where and how the local containers/storage keeps images."""

    driver: str
    graphroot: Path
    runroot: Path
    additional_image_stores: tuple[Path, ...] = ()
    conf_file: Path | None = None
    """The storage.conf this was read from (None: built-in defaults)."""


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or Path.home())


def _user_conf(env: Mapping[str, str]) -> Path:
    config_home = env.get("XDG_CONFIG_HOME") or str(_home(env) / ".config")
    return Path(config_home) / "containers" / "storage.conf"


def _system_conf() -> Path | None:
    for path in (SYSTEM_CONF, DEFAULT_CONF):
        if path.is_file():
            return path
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise SourceError(f"cannot read storage configuration {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SourceError(f"storage configuration {path} is not valid TOML ({exc})") from exc


def _storage_table(doc: Mapping[str, Any], path: Path | None) -> dict[str, Any]:
    table = doc.get("storage", {})
    if not isinstance(table, dict):
        raise SourceError(f"storage configuration {path}: [storage] is not a table")
    return table


def _expand(text: str, env: Mapping[str, str], euid: int) -> str:
    """containers/storage's expansion of ``$HOME``, ``$UID`` and ``$USER`` in paths."""
    return (text.replace("$HOME", str(_home(env))).replace("$UID", str(euid))
            .replace("$USER", env.get("USER", "")))


def _string_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, list):
        return tuple(str(v) for v in value if str(v))
    return ()


def _rootless_defaults(env: Mapping[str, str], system: Mapping[str, Any], euid: int
                       ) -> tuple[Path, Path]:
    data_home = env.get("XDG_DATA_HOME") or str(_home(env) / ".local" / "share")
    graphroot = Path(data_home) / "containers" / "storage"
    rootless_path = system.get("rootless_storage_path")
    if isinstance(rootless_path, str) and rootless_path:
        graphroot = Path(_expand(rootless_path, env, euid))
    runtime_dir = env.get("XDG_RUNTIME_DIR") or f"/run/user/{euid}"
    return graphroot, Path(runtime_dir) / "containers"


def storage_conf_path(env: Mapping[str, str] | None = None, euid: int | None = None
                      ) -> Path | None:
    """The storage.conf file the local podman reads, or None when none exists.

    `env` and `euid` default to this process's environment and effective uid.
    """
    env = os.environ if env is None else env
    euid = userns.storage_uid() if euid is None else euid
    explicit = env.get("CONTAINERS_STORAGE_CONF")
    if explicit:
        return Path(explicit)
    if euid != 0 and _user_conf(env).is_file():
        return _user_conf(env)
    return _system_conf()


def load_storage_config(env: Mapping[str, str] | None = None, euid: int | None = None
                        ) -> StorageConfig:
    """The local podman's storage configuration, for the environment `env` and effective uid
    `euid` (default: this process's)."""
    env = os.environ if env is None else env
    euid = userns.storage_uid() if euid is None else euid
    path = storage_conf_path(env, euid)
    explicit = bool(env.get("CONTAINERS_STORAGE_CONF"))
    if path is not None and explicit and not path.is_file():
        raise SourceError(f"CONTAINERS_STORAGE_CONF names {path}, which does not exist")
    table = _storage_table(_read_toml(path), path) if path is not None else {}
    # A rootless user without a storage.conf of their own gets the system file's options
    # but never its graph root: that belongs to root. Rootless podman 4.3 also ignores
    # graphroot and runroot in a $CONTAINERS_STORAGE_CONF file (rootless_storage_path counts).
    own_file = euid == 0 or (not explicit and path is not None and path == _user_conf(env))
    if euid == 0:
        graphroot, runroot = ROOT_GRAPHROOT, ROOT_RUNROOT
    else:
        graphroot, runroot = _rootless_defaults(env, table, euid)
    if own_file:
        graphroot = Path(table.get("graphroot") or graphroot)
        runroot = Path(table.get("runroot") or runroot)
    options = table.get("options", {})
    options = options if isinstance(options, dict) else {}
    stores = _string_list(options.get("additionalimagestores"))
    driver = str(env.get("STORAGE_DRIVER") or table.get("driver") or DEFAULT_DRIVER)
    return StorageConfig(driver=driver, graphroot=Path(_expand(str(graphroot), env, euid)),
                         runroot=Path(_expand(str(runroot), env, euid)),
                         additional_image_stores=tuple(Path(s) for s in stores),
                         conf_file=path)
