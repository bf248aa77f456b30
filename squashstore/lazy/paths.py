"""Where a store keeps what makes an image lazy (no I/O beyond a stat, no heavy imports:
the mount path asks `is_lazy` on every container start).

For a squash file at ``<store meta>/squash/<layer>.sqfs``: ``<store meta>/lazy/<layer>.json``
is the marker (the registry location) and ``<store meta>/lazy/<layer>.map`` the chunk map.
"""

from __future__ import annotations

from pathlib import Path

LAZY_DIR = "lazy"
"""Beside the store's ``squash/`` directory."""


def lazy_dir(squash: Path) -> Path:
    """The store's lazy directory for a squash file at ``<store meta>/squash/<layer>.sqfs``."""
    return squash.parent.parent / LAZY_DIR


def marker_path(squash: Path) -> Path:
    return lazy_dir(squash) / f"{squash.stem}.json"


def map_path(squash: Path) -> Path:
    return lazy_dir(squash) / f"{squash.stem}.map"


def is_lazy(squash: Path) -> bool:
    """Whether the squash file is a lazily pulled one not yet complete."""
    return marker_path(squash).is_file()
