"""A squash store's layout and the checks made before any of it is used, importing little.

This module owns the facts about a store's paths that every user of a store needs, and that
the mount program needs at every container start (so it holds them without the rest of
`squashstore.store`): the format-version file that marks a store and the format read
(`is_store`, `check`: as root the store's fixed entries are checked first, `trust.check_top`),
the fixed entries (`TOP_ENTRIES`), a layer id's shape (64 hex digits, so it never leads out
of the store: `checked_id`), a layer's ``diff`` directory and squash file, containers/storage's
overlay layout that a store shares (`overlay_layer`, re-exported by `podmanstore`), and the
one rule
for reaching a store layer from an overlay lowerdir (`lowerdir_layer`): ``overlay/l/<short>``
is followed only when it is a symlink whose target is exactly ``../<LID>/diff``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from squashstore import trust
from squashstore.errors import SquashstoreError

FORMAT_VERSION = 1
META = "squashstore"
FORMAT_FILE = "format-version"
LOCK_FILE = "lock"
IMAGE_META_DIR = "images"
LAYER_META_DIR = "layers"
SQUASH_DIR = "squash"
TMP_DIR = "tmp"
SQUASH_SUFFIX = ".sqfs"
"""A squash file's name: its layer id and this."""
TOP_ENTRIES = (META, f"{META}/{FORMAT_FILE}", f"{META}/{LOCK_FILE}", f"{META}/{IMAGE_META_DIR}",
               f"{META}/{LAYER_META_DIR}", f"{META}/{SQUASH_DIR}", f"{META}/{TMP_DIR}",
               "overlay", "/".join(trust.LINK_DIR),
               "overlay-layers", "overlay-images", "overlay-layers/layers.json",
               "overlay-images/images.json")
"""The store's fixed entries, checked (as root) whenever it is opened."""
ID_RE = re.compile(r"[0-9a-f]{64}")
LINK_TARGET = re.compile(r"\.\./([0-9a-f]{64})/diff")
"""The only target an ``overlay/l/<short>`` link may have to be followed."""


class StoreError(SquashstoreError):
    """The store is missing, of another format, damaged, or the request does not fit it."""


def format_file(root: Path) -> Path:
    return root / META / FORMAT_FILE


def is_store(root: Path) -> bool:
    """Whether `root` is marked as a squash store (its format-version file exists)."""
    return format_file(root).is_file()


def check(root: Path) -> None:
    """Raise StoreError unless `root` is a store of our format (and, as root, one whose
    fixed entries nobody else can change: `trust.check_top`, before any file of it is
    read)."""
    trust.check_top(root, TOP_ENTRIES)
    try:
        text = format_file(root).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        raise StoreError(f"{root}: not a squash store (run `squashstore init`)") from None
    if text != str(FORMAT_VERSION):
        raise StoreError(f"{root}: store format {text!r}, this squashstore reads "
                         f"format {FORMAT_VERSION}")


def checked_id(layer_id: str) -> str:
    """A layer id used in a path: 64 hex digits, so it never leads out of the store."""
    if not ID_RE.fullmatch(layer_id):
        raise StoreError(f"invalid layer id {layer_id[:80]!r} (damaged records?)")
    return layer_id


def diff_dir(root: Path, layer_id: str) -> Path:
    return root / "overlay" / checked_id(layer_id) / "diff"


def squash_file(root: Path, layer_id: str) -> Path:
    return root / META / SQUASH_DIR / f"{checked_id(layer_id)}{SQUASH_SUFFIX}"


def overlay_layer(path: str | Path, leaf: str) -> tuple[Path, str] | None:
    """``<root>/overlay/<layer>/<leaf>`` -> (root, layer): where containers/storage's overlay
    driver (and a squash store, which has its layout) keeps a layer's ``diff`` or ``merged``."""
    path = Path(path)
    if path.name != leaf or path.parent.parent.name != "overlay":
        return None
    return path.parent.parent.parent, path.parent.name


def lowerdir_layer(lowerdir: str) -> tuple[Path, str, Path | None] | None:
    """The squash store layer an overlay lowerdir leads to, as (store root, layer id, the
    ``overlay/l`` link used or None): ``S/overlay/l/<short>`` (a symlink whose target is
    exactly ``../<LID>/diff``) or ``S/overlay/<LID>/diff``, S being a squash store. Nothing
    else is followed: a lowerdir that reaches a store by another way (a planted symlink) is
    not a store layer. The store is not checked here (`check`)."""
    path = Path(os.path.abspath(lowerdir))
    if path.parent.name == "l" and path.parent.parent.name == "overlay":
        root = path.parent.parent.parent
        if not is_store(root) or not path.is_symlink():
            return None
        match = LINK_TARGET.fullmatch(os.readlink(path))
        return None if match is None else (root, match.group(1), path)
    found = overlay_layer(path, "diff")
    if found is None or not is_store(found[0]):
        return None
    return found[0], found[1], None
