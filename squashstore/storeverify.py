"""Checking a squash store: what ``squashstore verify`` reports about its structure.

This module owns the store's structural check, read only: the record files as podman's Go
types read them (`imageconfig`), names on one image only, each image's big-data items
(digests as recorded, under podman's file names: an item found only under squashstore 0.1's
name is reported, config and manifests readable by podman), each layer's squash file, link
name and diff directory, and the modes a read-only sharer needs. `Store.verify_structure`
is its entry; the squash files' content is read by `squashfs.reader.verify_file`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from squashstore import host, imageconfig, podmanstore, trust
from squashstore.image import SquashstoreError
from squashstore.store import LINK_LENGTH, TMP_SUFFIX, Store, StoreError, sha256_hex


def verify_structure(store: Store) -> list[str]:
    """Problems found in the store's records and files (empty when sound)."""
    store.check()
    trust.check_tree(store.root)
    problems: list[str] = []
    for path, kind in ((store.images_json, imageconfig.STORAGE_IMAGES),
                       (store.layers_json, imageconfig.STORAGE_LAYERS)):
        try:
            document = podmanstore.load_document(path)
        except podmanstore.PodmanStoreError as exc:
            raise StoreError(str(exc)) from exc
        problems += [f"{path}: {p} (podman cannot read the store)"
                     for p in imageconfig.problems(document, kind, "")]
    layers = {r.id: r for r in store.layer_records()}
    images = store.image_records()
    for path in (store.layers_lock, store.images_lock):
        if not path.is_file():
            problems.append(f"{path}: missing (podman needs it)")
    owners: dict[str, str] = {}
    for record in images:
        iid = record.id
        for name in record.names:
            if name in owners:
                problems.append(f"name {name} on images {owners[name]} and {iid}")
            owners[name] = iid
        problems.extend(_verify_image(store, record, layers))
    for lid in layers:
        problems.extend(_verify_layer(store, lid))
    problems.extend(_verify_modes(store))
    return problems


def _verify_image(store: Store, record: podmanstore.ImageRecord,
                  layers: Mapping[str, podmanstore.LayerRecord]) -> list[str]:
    iid = record.id
    problems = []
    if record.layer not in layers:
        problems.append(f"image {iid}: layer {record.layer or None} has no record")
    for key, digest in record.big_data_digests.items():
        paths = podmanstore.big_data_paths(store.images_dir / iid, key)
        path = next((p for p in paths if p.exists()), paths[0])
        try:
            data = path.read_bytes()
        except OSError as exc:
            problems.append(f"image {iid}: {key}: {exc.strerror}")
            continue
        if path != paths[0]:
            problems.append(f"image {iid}: {key}: in {path.name}, squashstore 0.1's file "
                            f"name, where podman does not look (podman's is {paths[0].name})")
        actual = "sha256:" + sha256_hex(data)
        if actual != digest:
            problems.append(f"image {iid}: {key}: digest {actual}, recorded {digest}")
        problems += [f"image {iid}: {key}: {p} (podman cannot read it)"
                     for p in _big_data_problems(key, data)]
    if podmanstore.config_key(iid) not in record.big_data_digests:
        problems.append(f"image {iid}: no config whose digest is the image id")
    return problems


def _big_data_problems(key: str, data: bytes) -> list[str]:
    """A config or manifest item checked as podman reads it (the config is the item
    keyed by a digest, manifests are ``manifest`` and ``manifest-<digest>``)."""
    try:
        if key.startswith("sha256:"):
            return imageconfig.config_problems(imageconfig.load(data, key))
        if podmanstore.is_manifest_key(key):
            return imageconfig.manifest_problems(imageconfig.load(data, key))
    except SquashstoreError as exc:
        return [str(exc)]
    return []


def _verify_layer(store: Store, lid: str) -> list[str]:
    problems = []
    if not store.squash_file(lid).is_file():
        problems.append(f"layer {lid}: squash file missing")
    try:
        fd = os.open(store.overlay / lid / "link", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            link = os.read(fd, 256).decode(errors="replace")
        finally:
            os.close(fd)
    except OSError:
        return [*problems, f"layer {lid}: link file missing"]
    if len(link) != LINK_LENGTH:
        problems.append(f"layer {lid}: link name {link!r} is not {LINK_LENGTH} characters")
    target = store.links / link
    if not target.is_symlink() or os.readlink(target) != f"../{lid}/diff":
        problems.append(f"layer {lid}: {target} does not point at its diff directory")
    if not host.is_mountpoint(store.diff_dir(lid)) and not store.diff_dir(lid).is_dir():
        problems.append(f"layer {lid}: diff directory missing")
    return problems


def _verify_modes(store: Store) -> list[str]:
    problems = []
    mounted = host.mount_table()
    for root, dirs, files in os.walk(store.root):
        dirs[:] = [d for d in dirs
                   if host.real_path(Path(root) / d) not in mounted and d != "tmp"]
        for name in dirs:
            mode = (Path(root) / name).lstat().st_mode
            if mode & 0o005 != 0o005:
                problems.append(f"{Path(root) / name}: not world-searchable")
        for name in files:
            mode = (Path(root) / name).lstat().st_mode
            if mode & 0o004 == 0 and not name.endswith(TMP_SUFFIX) \
                    and not store.is_private_lock(Path(root) / name):
                problems.append(f"{Path(root) / name}: not world-readable")
    return problems
