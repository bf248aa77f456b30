"""Where a store keeps what makes an image lazy (no I/O beyond a stat, no heavy imports:
the mount path asks `is_lazy` on every container start).

For a squash file at ``<store meta>/squash/<layer>.sqfs``: ``<store meta>/lazy/<layer>.json``
is the marker (the registry location), ``<store meta>/lazy/<layer>.map`` the chunk map and
``<store meta>/lazy/<layer>.chunks`` the per-chunk digests (`squashstore.lazy.chunkdigests`),
when the artifact had them; the map and the digests go with the marker.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LAZY_DIR = "lazy"
"""Beside the store's ``squash/`` directory."""
PREFETCH_DIR = "prefetch"
"""Beside the store's ``squash/`` directory: ``<layer>.json``, a layer's start-up prefetch
list (`squashstore.lazy.prefetch`)."""
WRITER = "writer"
"""The marker's field naming the process that staged it (`host.ProcessId` tag)."""


def lazy_dir(squash: Path) -> Path:
    """The store's lazy directory for a squash file at ``<store meta>/squash/<layer>.sqfs``."""
    return squash.parent.parent / LAZY_DIR


def marker_path(squash: Path) -> Path:
    return lazy_dir(squash) / f"{squash.stem}.json"


def map_path(squash: Path) -> Path:
    return lazy_dir(squash) / f"{squash.stem}.map"


def chunks_path(squash: Path) -> Path:
    return lazy_dir(squash) / f"{squash.stem}.chunks"


def lazy_files(squash: Path) -> tuple[Path, ...]:
    """Every file that makes `squash` lazy, the marker first (removed first, it says
    lazy)."""
    return (marker_path(squash), map_path(squash), chunks_path(squash))


COMPANIONS = ("map", "chunks")
"""Suffixes of the files that live only as long as a layer's marker."""


MARKER_LIMIT = 1 << 20
"""Bytes of a marker read at most."""


def read_kept(path: Path, limit: int) -> bytes | None:
    """A list the store keeps beside a lazy layer (chunk digests, prefetch list): its bytes,
    None when there is none; `SourceError` when it cannot be read (or is not a regular
    file of at most `limit` bytes)."""
    from squashstore.trust import read_regular

    try:
        return read_regular(path, limit)
    except OSError as exc:
        from squashstore.image import SourceError  # image imports dataclasses: not at start
        raise SourceError(f"{path}: {exc.strerror}") from None


def is_lazy(squash: Path) -> bool:
    """Whether the squash file is a lazily pulled one not yet complete."""
    return marker_path(squash).is_file()


def leftovers(meta: Path, layer_ids: set[str], temp_suffix: str,
              foreign_age: float) -> list[Path]:
    """Files of the lazy directory under store `meta` whose layer is gone (a marker left
    behind would make a later full copy of the layer look lazy), and maps of layers that
    completed; `temp_suffix` names atomic writes in flight, which stay, as does the marker
    of a layer being staged: by a live process of this host, or on another host less than
    `foreign_age` seconds ago."""
    directory = meta / LAZY_DIR
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        stem, dot, suffix = entry.rpartition(".")
        if not dot or entry.endswith(temp_suffix):
            continue
        marker = directory / f"{stem}.json"
        if stem in layer_ids:
            if suffix in COMPANIONS and not marker.exists():
                found.append(directory / entry)  # the map/digests of a completed image
        elif not _being_staged(marker, foreign_age):
            found.append(directory / entry)
    return found


def _being_staged(marker: Path, foreign_age: float) -> bool:
    """Whether the process that wrote `marker` for a layer not yet published still runs."""
    import time

    from squashstore import host
    from squashstore.trust import read_regular

    try:
        data = read_regular(marker, MARKER_LIMIT)
        if data is None:
            return False
        writer = json.loads(data).get(WRITER, "")
        age = time.time() - marker.stat().st_mtime
    except (OSError, ValueError, AttributeError, RecursionError):
        return False
    process = host.ProcessId.parse(writer) if isinstance(writer, str) else None
    if process is None:
        return False
    if process.host != host.hostname():
        return age < foreign_age
    return process.is_alive()
