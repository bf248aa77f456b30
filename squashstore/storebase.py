"""What the parts of the squash store share: its errors, its name rules and its file helpers.

`store.py` (the façade: layout, reading, names), `publish.py` (making an image visible)
and `storegc.py` (removal and crash leftovers) all build on this module, which imports none
of them: the store's errors (`ImageNotFound`, `NameError_`; `StoreError` is
`storelayout`'s), how a name is stored (`normalize_name`, `name_candidates`, through
`names.local_name`), a layer's deterministic short link name and its directories
(`link_name`, `LAYER_DIRS`), the digests and times written into records, JSON reads with
the store's error policy (`read_json`), and tree removal that never descends into a mount
point (`remove_tree`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from squashstore import host, names, trust
from squashstore.storelayout import StoreError

LINK_LENGTH = 26
LAYER_DIRS = trust.LAYER_DIRS


class ImageNotFound(StoreError):
    """No image in the store matches a reference."""


class NameError_(StoreError):
    """A name is not a valid image name."""


Unmounter = Callable[[Path], bool]
"""Unmounts a layer's diff directory; returns False when it is busy and stays mounted."""


def no_unmount(diff: Path) -> bool:
    """The default `Unmounter`: unmounts nothing (a mounted diff stays busy)."""
    return not host.is_mountpoint(diff)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def link_name(layer_id: str) -> str:
    """The layer's 26-character short name (deterministic, so re-publishing is idempotent)."""
    digest = hashlib.sha256(f"squashstore-link:{layer_id}".encode()).digest()
    return base64.b32encode(digest).decode()[:LINK_LENGTH]


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return default
    except ValueError as exc:
        raise StoreError(f"{path}: damaged JSON ({exc})") from exc
    except RecursionError:
        raise StoreError(f"{path}: damaged JSON (nested too deeply)") from None


def remove_tree(path: Path) -> None:
    """Remove a file or directory tree, never descending into a mount point."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    mounted = host.mount_table()
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            if host.real_path(Path(root) / name) in mounted:
                raise StoreError(f"{Path(root) / name}: still mounted")
    shutil.rmtree(path)


def normalize_name(name: str) -> str:
    """A name as podman stores it: ``localhost/x:latest``, ``docker.io/library/alpine:3``."""
    if name.startswith("sha256:"):
        raise NameError_(f"invalid image name {name!r}")
    try:
        return names.local_name(name)
    except names.InvalidName as exc:
        raise NameError_(str(exc)) from None


def name_candidates(reference: str) -> list[str]:
    """Full names a user's short reference may mean, most likely first."""
    try:
        parsed = names.parse(reference)
    except names.InvalidName:
        return [reference]
    return list(dict.fromkeys([str(parsed.with_default_tag()),
                               *names.local_candidates(reference)]))
