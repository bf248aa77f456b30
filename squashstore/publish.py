"""Publishing an image into the squash store: staged files made visible by a few renames.

This module owns the order in which a writer's staged image becomes visible, so that a
crash at any point leaves a store podman can read and `storegc` can clean: slow work
(image big-data files, the layer directory) is staged outside the lock; then, under the
project lock and podman's own lock files, the squash file and the tar-split are renamed in
(an existing squash file of the same layer is kept, unless it is a lazily pulled partial
cache), the layer directory and its short link, the image's big-data directory and
metadata, then the layer record and, last, the image record (which takes its names from
any other image). `publish_hook` marks each step for the crash tests
(``$SQUASHSTORE_TEST_PUBLISH_HOOK``); `Publication` is what a writer hands over.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squashstore import host, imageconfig, podmanstore
from squashstore.atomic import atomic_write, atomic_write_json, fsync_dir, temp_name
from squashstore.lazy import paths as lazy_paths
from squashstore.storebase import (
    LAYER_DIRS,
    Unmounter,
    link_name,
    normalize_name,
    remove_tree,
    sha256_hex,
)
from squashstore.storelayout import StoreError

if TYPE_CHECKING:
    from squashstore.store import Store, StoreImage


@dataclass(frozen=True)
class Publication:
    """Everything a writer staged for one image, ready to publish."""

    squash: Path
    """The squash file, inside the writer's staging directory."""
    diff_digest: str
    diff_size: int
    config: bytes
    manifest: bytes
    names: tuple[str, ...]
    created: str
    tar_split: Path | None = None
    layer_metadata: dict[str, Any] = field(default_factory=dict)
    image_metadata: dict[str, Any] = field(default_factory=dict)


PUBLISH_HOOK = "SQUASHSTORE_TEST_PUBLISH_HOOK"
"""Test-only: a directory; `publish` stops at each step until the test lets it go."""
PUBLISH_STEPS = ("locked", "squash-file", "layer-files", "image-files", "layer-record",
                 "image-record")
STAGED_SQUASH = "layer.sqfs"
STAGED_TAR_SPLIT = "layer.tar-split.gz"
"""The names a writer gives its squash file and tar-split in its staging directory."""
HOOK_POLL = 0.01
"""How often a writer stopped at a hook looks for the test's go-ahead (seconds)."""


def publish_hook(step: str) -> None:
    """A point inside `publish` a crash test can stop at (``$SQUASHSTORE_TEST_PUBLISH_HOOK``
    names a directory: the writer creates ``STEP.reached`` there and waits until
    ``STEP.go`` exists, so the test can SIGKILL it exactly there). Without the variable,
    as in production, it does nothing."""
    directory = os.environ.get(PUBLISH_HOOK)
    if not directory:
        return
    Path(directory, f"{step}.reached").touch()
    while not Path(directory, f"{step}.go").exists():
        time.sleep(HOOK_POLL)


def publish(store: Store, pub: Publication, unmount: Unmounter) -> StoreImage:
    """Make a staged image visible: a few renames, then the layer and image records."""
    if not pub.diff_digest.startswith("sha256:"):
        raise StoreError(f"bad diff digest {pub.diff_digest!r}")
    for what, data, check in (("config", pub.config, imageconfig.config_problems),
                              ("manifest", pub.manifest, imageconfig.manifest_problems)):
        unreadable = check(imageconfig.load(data, f"image {what}"))
        if unreadable:  # one image podman cannot read would break the whole store
            raise StoreError(f"image {what}: {unreadable[0]}")
    names = tuple(dict.fromkeys(normalize_name(n) for n in pub.names))
    lid = pub.diff_digest.removeprefix("sha256:")
    iid = sha256_hex(pub.config)
    staged_image = _stage_image_dir(pub, iid)
    staged_layer = _stage_layer_dir(pub.squash.parent, lid)
    with store.write_lock(unmount):
        publish_hook("locked")
        _install_layer_files(store, pub, lid, staged_layer)
        publish_hook("layer-files")
        _install_image_files(store, pub, iid, staged_image)
        publish_hook("image-files")
        layers = [r for r in store.layer_records() if r.id != lid]
        layers.append(podmanstore.new_layer_record(lid, pub.created, pub.diff_digest,
                                                   pub.diff_size))
        store.write_layer_records(layers)
        publish_hook("layer-record")
        images = store.image_records()
        old = next((r for r in images if r.id == iid), None)
        record = _image_record(pub, iid, lid, old)
        images = [r.replace(names=tuple(n for n in r.names if n not in names))
                  for r in images if r.id != iid]
        images.append(record.replace(names=tuple(dict.fromkeys([*record.names, *names]))))
        store.write_image_records(images)
        publish_hook("image-record")
    return store.resolve(iid)


def _stage_image_dir(pub: Publication, iid: str) -> Path:
    staged = pub.squash.parent / f"image-{iid}"
    staged.mkdir(mode=0o755, exist_ok=True)
    os.chmod(staged, 0o755)
    for key, data in _big_data(pub, iid).items():
        atomic_write(staged / podmanstore.big_data_name(key), data)
    return staged


def _stage_layer_dir(staging: Path, lid: str) -> Path:
    staged = staging / f"layer-{lid}"
    staged.mkdir(mode=0o755, exist_ok=True)
    os.chmod(staged, 0o755)
    for name in LAYER_DIRS:
        (staged / name).mkdir(mode=0o755, exist_ok=True)
        os.chmod(staged / name, 0o755)
    atomic_write(staged / "link", link_name(lid).encode())
    return staged


def _install_layer_files(store: Store, pub: Publication, lid: str, staged_layer: Path) -> None:
    # The layer id is the content's digest: a layer already here has the same files, and
    # its squash file may be mounted on other hosts of a shared store (replacing it
    # would give them ESTALE), so it is kept, with the options it was written with.
    # A lazily pulled layer is the exception: its file is a partial cache of what a
    # registry claimed (its diff id unchecked until complete), so a squash file made
    # here from the source replaces it; its servers keep their open cache file.
    # (A lazy install's own marker is staged before its file is here: not this case.)
    existing = store.squash_file(lid)
    lazy = existing.is_file() and lazy_paths.is_lazy(existing)
    kept = existing.is_file() and not lazy
    if not kept:
        if not pub.squash.is_file():  # the writer took the layer for present: it went since
            raise StoreError(f"layer {lid[:12]}: its squash file was removed while this "
                             "image was being installed (rmi or gc at the same time): "
                             "try again")
        os.chmod(pub.squash, 0o644)
        os.rename(pub.squash, existing)
        publish_hook("squash-file")
        if lazy:
            for stale in lazy_paths.lazy_files(existing):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
    if pub.tar_split is not None and not (kept and store.tar_split_file(lid).is_file()):
        os.chmod(pub.tar_split, 0o644)
        os.rename(pub.tar_split, store.tar_split_file(lid))
    layer_dir = store.overlay / lid
    if (layer_dir / "link").is_file() and host.is_mountpoint(layer_dir / "diff"):
        for name in LAYER_DIRS[1:]:  # a live layer of an older squashstore: complete it
            with contextlib.suppress(FileExistsError):
                (layer_dir / name).mkdir(mode=0o755)
    complete = all((layer_dir / name).is_dir() for name in LAYER_DIRS)
    if not complete or not (layer_dir / "link").is_file():
        if os.path.lexists(layer_dir) and not host.is_mountpoint(layer_dir / "diff"):
            remove_tree(layer_dir)
        if not os.path.lexists(layer_dir):
            os.rename(staged_layer, layer_dir)
    link = store.links / link_name(lid)
    target = f"../{lid}/diff"
    if not link.is_symlink() or os.readlink(link) != target:
        tmp = temp_name(link)
        os.symlink(target, tmp)
        os.rename(tmp, link)
    if not kept or not (store.layer_meta_dir / f"{lid}.json").is_file():
        layer_meta = {**pub.layer_metadata, "file": str(store.squash_file(lid).name),
                      "bytes": store.squash_file(lid).stat().st_size}
        atomic_write_json(store.layer_meta_dir / f"{lid}.json", layer_meta)
    fsync_dir(store.squash_dir)


def _install_image_files(store: Store, pub: Publication, iid: str, staged_image: Path) -> None:
    image_dir = store.images_dir / iid
    if not _same_files(staged_image, image_dir):
        # Only a damaged leftover differs (the content is a function of the image id),
        # so podman never sees a listed image without its data.
        if os.path.lexists(image_dir):
            remove_tree(image_dir)
        os.rename(staged_image, image_dir)
    atomic_write_json(store.image_meta_dir / f"{iid}.json", pub.image_metadata)


def _same_files(staged: Path, installed: Path) -> bool:
    try:
        return all((installed / name).read_bytes() == (staged / name).read_bytes()
                   for name in os.listdir(staged))
    except OSError:
        return False


def _image_record(pub: Publication, iid: str, lid: str,
                  old: podmanstore.ImageRecord | None) -> podmanstore.ImageRecord:
    return podmanstore.new_image_record(iid, _manifest_digest(pub), old.names if old else (),
                                        lid, pub.created, _big_data(pub, iid))


def _manifest_digest(pub: Publication) -> str:
    return "sha256:" + sha256_hex(pub.manifest)


def _big_data(pub: Publication, iid: str) -> dict[str, bytes]:
    """The image's big-data items, in the order containers/storage lists them."""
    return {podmanstore.config_key(iid): pub.config,
            podmanstore.manifest_key(_manifest_digest(pub)): pub.manifest,
            podmanstore.MANIFEST_KEY: pub.manifest}
