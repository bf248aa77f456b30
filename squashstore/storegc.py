"""Removing from the squash store: images, dangling images, and crash leftovers.

This module owns what may be deleted from a store and when: `remove_image` drops an
image's record and then everything no record reaches any more; `gc` also drops dangling
images (an image that lost all its names, unless it was migrated without a name) that
nothing uses; `clean_leftovers` (run under the project lock on every write) removes orphan
layer records, layer directories (unmounting a diff first through the caller's
`Unmounter`, skipping a busy one), short links, image, metadata, squash, lazy-cache and
tar-split files no record reaches, and the staging directories and temporary files of
writers that are dead. A temporary name carries its writer's host, pid and start time
(`host.ProcessId`): a live writer's files are never touched, and a writer on another host
is taken for dead only when its file is older than `FOREIGN_LEFTOVER_AGE`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from squashstore import host
from squashstore.atomic import TMP_SUFFIX
from squashstore.lazy import paths as lazy_paths
from squashstore.podmanstore import TAR_SPLIT_SUFFIX
from squashstore.storebase import ImageNotFound, Unmounter, link_name, remove_tree
from squashstore.storelayout import SQUASH_SUFFIX, StoreError

if TYPE_CHECKING:
    from squashstore.store import Store, StoreImage

FOREIGN_LEFTOVER_AGE = 24 * 3600
"""Leftovers of writers on other hosts are removed only when older than this (seconds)."""
LOCK_SUFFIX = ".lock"
"""Lock files (podman's and pulls') are never removed: a waiter may hold them open."""


def remove_image(store: Store, iid: str, unmount: Unmounter) -> list[str]:
    """Remove an image (record first, then its files and unshared layer)."""
    with store.write_lock(unmount) as removed:
        images = store.image_records()
        if not any(r.id == iid for r in images):
            raise ImageNotFound(f"{iid}: image not found in store {store.root}")
        store.write_image_records([r for r in images if r.id != iid])
        return [*removed, iid, *clean_leftovers(store, unmount)]


def gc(store: Store, in_use: Callable[[StoreImage], bool], unmount: Unmounter) -> list[str]:
    """Remove dangling images nothing uses and all leftovers; returns what went.

    Dangling: an image that lost all its names (they moved to another image, or were
    untagged). An image migrated without any name (its image metadata has ``named``
    false) is never dangling: only `remove_image` removes it."""
    with store.write_lock(unmount) as removed:
        images = store.image_records()
        layers = {r.id: r for r in store.layer_records()}
        keep = []
        for record in images:
            image = store.store_image(record, layers)
            if not record.names and image.metadata.get("named", True) and not in_use(image):
                removed.append(f"image {record.id}")
            else:
                keep.append(record)
        if len(keep) != len(images):
            store.write_image_records(keep)
        removed.extend(clean_leftovers(store, unmount))
    return removed


def clean_leftovers(store: Store, unmount: Unmounter) -> list[str]:
    """Remove everything no record reaches. Call only under the project lock."""
    removed = _clean_temporaries(store)
    images = store.image_records()
    image_ids = {r.id for r in images}
    used_layers = {r.layer for r in images}
    layers = store.layer_records()
    orphans = [r for r in layers if r.id not in used_layers]
    if orphans:
        store.write_layer_records([r for r in layers if r.id in used_layers])
        removed.extend(f"layer record {r.id}" for r in orphans)
    layer_ids = used_layers & {r.id for r in layers}
    removed.extend(_clean_layer_dirs(store, layer_ids, unmount))
    removed.extend(_clean_files(store, store.images_dir, image_ids, "",
                                keep={store.images_json.name, store.images_lock.name}))
    removed.extend(_clean_files(store, store.image_meta_dir, image_ids, ".json"))
    removed.extend(_clean_files(store, store.layer_meta_dir, layer_ids, ".json"))
    removed.extend(_clean_files(store, store.squash_dir, layer_ids, SQUASH_SUFFIX))
    removed.extend(_clean_files(store, store.meta / lazy_paths.PREFETCH_DIR, layer_ids,
                                ".json"))
    for path in lazy_paths.leftovers(store.meta, layer_ids, TMP_SUFFIX, FOREIGN_LEFTOVER_AGE):
        path.unlink(missing_ok=True)
        removed.append(str(path.relative_to(store.root)))
    removed.extend(_clean_files(store, store.layers_dir, layer_ids, TAR_SPLIT_SUFFIX,
                                keep={store.layers_json.name, store.layers_lock.name}))
    return removed


def _clean_layer_dirs(store: Store, layer_ids: set[str], unmount: Unmounter) -> list[str]:
    removed = []
    for entry in listdir(store.overlay):
        if entry == store.links.name or entry in layer_ids:
            continue
        path = store.overlay / entry
        if path.is_symlink() or not path.is_dir():
            path.unlink()  # never followed: what it points at is not the store's
            removed.append(f"layer dir {entry}")
            continue
        diff = path / "diff"
        if host.is_mountpoint(diff) and not unmount(diff):
            continue
        with contextlib.suppress(StoreError):
            remove_tree(path)
            removed.append(f"layer dir {entry}")
    for entry in listdir(store.links):
        link = store.links / entry
        target = os.readlink(link) if link.is_symlink() else ""
        lid = target.split("/")[1] if target.count("/") == 2 else ""
        if lid not in layer_ids or entry != link_name(lid):
            if entry.endswith(TMP_SUFFIX) and _live_temp(entry, store.links):
                continue
            link.unlink()
            removed.append(f"link {entry}")
    return removed


def _clean_files(store: Store, directory: Path, ids: set[str], suffix: str,
                 keep: set[str] | None = None) -> list[str]:
    removed = []
    for entry in listdir(directory):
        if entry in (keep or set()) or entry.endswith(TMP_SUFFIX):
            continue
        if entry.endswith(suffix) and entry[:len(entry) - len(suffix)] in ids:
            continue
        if entry.endswith(LOCK_SUFFIX):
            continue
        remove_tree(directory / entry)
        removed.append(str((directory / entry).relative_to(store.root)))
    return removed


def _clean_temporaries(store: Store) -> list[str]:
    """Writers' staging dirs and atomic-write temp files whose writer is dead."""
    removed = []
    for entry in listdir(store.tmp_dir):
        writer = host.ProcessId.parse(entry.rsplit(".", 1)[0])
        if writer is None or not _writer_alive(writer, store.tmp_dir / entry):
            with contextlib.suppress(StoreError):
                remove_tree(store.tmp_dir / entry)
                removed.append(f"staging {entry}")
    for directory in (store.meta, store.image_meta_dir, store.layer_meta_dir, store.squash_dir,
                      store.layers_dir, store.images_dir, store.links):
        for entry in listdir(directory):
            if entry.endswith(TMP_SUFFIX) and not _live_temp(entry, directory):
                remove_tree(directory / entry)
                removed.append(f"temporary {entry}")
    return removed


def _live_temp(entry: str, directory: Path) -> bool:
    parts = entry.removesuffix(TMP_SUFFIX).rsplit(".", 4)
    writer = host.ProcessId.parse(".".join(parts[-4:-1])) if len(parts) == 5 else None
    if writer is None:
        return False
    return _writer_alive(writer, directory / entry)


def _writer_alive(writer: host.ProcessId, path: Path) -> bool:
    if writer.host == host.hostname():
        return writer.is_alive()
    try:
        age = time.time() - path.lstat().st_mtime
    except OSError:
        return False
    return age < FOREIGN_LEFTOVER_AGE


def listdir(directory: Path) -> list[str]:
    """The sorted entries of `directory`; [] when it does not exist."""
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
