"""The squash store: a podman additional image store treated as a database.

Owns the store's layout (podman's ``overlay/``, ``overlay-layers/``, ``overlay-images/`` as
containers/storage 1.43 reads them, plus squashstore's own ``squashstore/`` directory holding
the format-version file, the project lock, the squash files, per-image and per-layer metadata
and writers' temporary directories), and every change to it: ``init``, ``publish`` (slow data
staged outside the lock, then a few atomic renames under the project lock and podman's own
lock files: squash file and image data first, layer record next, image record last), names
(a name is never on two images), removal, ``gc`` of crash leftovers (never a live writer's:
temporary names carry the writer's host, pid and start time) and the structural check. Every
JSON rewrite is temp + fsync + rename; files are world-readable and directories
world-searchable so a site can share a store read-only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from squashstore import host, imageconfig, locking, names, podmanstore, storelayout, trust
from squashstore.atomic import TMP_SUFFIX as TMP_SUFFIX
from squashstore.atomic import atomic_write as atomic_write
from squashstore.atomic import atomic_write_json as atomic_write_json
from squashstore.atomic import fsync_dir, temp_name
from squashstore.lazy import paths as lazy_paths
from squashstore.storelayout import FORMAT_VERSION as FORMAT_VERSION
from squashstore.storelayout import META as META
from squashstore.storelayout import TOP_ENTRIES as TOP_ENTRIES
from squashstore.storelayout import StoreError as StoreError

LINK_LENGTH = 26
LAYER_DIRS = ("diff", "empty", "merged")
FOREIGN_LEFTOVER_AGE = 24 * 3600
"""Leftovers of writers on other hosts are removed only when older than this (seconds)."""


class ImageNotFound(StoreError):
    """No image in the store matches a reference."""


class NameError_(StoreError):
    """A name is not a valid image name."""


# --------------------------------------------------------------------------- small helpers

def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def link_name(layer_id: str) -> str:
    """The layer's 26-character short name (deterministic, so re-publishing is idempotent)."""
    digest = hashlib.sha256(f"squashstore-link:{layer_id}".encode()).digest()
    return base64.b32encode(digest).decode()[:LINK_LENGTH]


def _records(path: Path) -> list[dict[str, Any]]:
    """containers/storage's records (`podmanstore.load_records`): a JSON array of objects,
    each with a string id."""
    try:
        return podmanstore.load_records(path)
    except podmanstore.PodmanStoreError as exc:
        raise StoreError(str(exc)) from exc


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


# --------------------------------------------------------------------------- names

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


# --------------------------------------------------------------------------- data types

@dataclass(frozen=True)
class StoreImage:
    """One image of the store as squashstore presents it."""

    id: str
    names: tuple[str, ...]
    layer: str
    digest: str
    created: str
    size: int
    squash: Path
    diff: Path
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "names": list(self.names), "layer": self.layer,
                "digest": self.digest, "created": self.created, "size": self.size,
                "squash": str(self.squash), "diff": str(self.diff), **self.metadata}


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


def publish_hook(step: str) -> None:
    """A point inside `Store.publish` a crash test can stop at (``$SQUASHSTORE_TEST_PUBLISH_HOOK``
    names a directory: the writer creates ``STEP.reached`` there and waits until
    ``STEP.go`` exists, so the test can SIGKILL it exactly there). Without the variable,
    as in production, it does nothing."""
    directory = os.environ.get(PUBLISH_HOOK)
    if not directory:
        return
    Path(directory, f"{step}.reached").touch()
    while not Path(directory, f"{step}.go").exists():
        time.sleep(0.01)


Unmounter = Callable[[Path], bool]
"""Unmounts a layer's diff directory; returns False when it is busy and stays mounted."""


def _no_unmount(diff: Path) -> bool:
    return not host.is_mountpoint(diff)


# --------------------------------------------------------------------------- the store

class Store:
    """A squash store rooted at ``root``."""

    def __init__(self, root: Path) -> None:
        # Resolved once: every path below it is then used only if reached without symlinks.
        self.root = Path(os.path.realpath(root))
        self.meta = self.root / META
        self.format_file = self.meta / "format-version"
        self.lock_file = self.meta / "lock"
        self.image_meta_dir = self.meta / "images"
        self.layer_meta_dir = self.meta / "layers"
        self.squash_dir = self.meta / "squash"
        self.tmp_dir = self.meta / "tmp"
        # podman's part of the store: containers/storage's overlay layout (podmanstore's).
        self.layout = podmanstore.Layout(self.root, "overlay")
        self.overlay = self.root / self.layout.driver
        self.links = self.overlay / "l"
        self.layers_dir = self.layout.layers_dir
        self.images_dir = self.layout.images_dir
        self.layers_json = self.layout.layers_json
        self.images_json = self.layout.images_json
        self.layers_lock = self.layout.layers_lock
        self.images_lock = self.layout.images_lock

    # ----------------------------------------------------------------- layout

    @staticmethod
    def is_store(path: Path) -> bool:
        return storelayout.is_store(path)

    @staticmethod
    def _checked_id(layer_id: str) -> str:
        return storelayout.checked_id(layer_id)

    def diff_dir(self, layer_id: str) -> Path:
        return storelayout.diff_dir(self.root, layer_id)

    def squash_file(self, layer_id: str) -> Path:
        return storelayout.squash_file(self.root, layer_id)

    def tar_split_file(self, layer_id: str) -> Path:
        return self.layout.tar_split(layer_id)

    def check(self) -> None:
        """Raise StoreError unless this is a store of our format (and, as root, one whose
        fixed directories nobody else can change: `trust.check_top`, before any file of
        it is read): `storelayout.check`."""
        storelayout.check(self.root)

    def init(self) -> None:
        """Create the store (idempotent); podman accepts it empty and read-only."""
        if self.format_file.exists():
            self.check()
            return
        foreign = set(self._listdir(self.root)) - {META, "overlay", "overlay-layers",
                                                   "overlay-images"}
        if foreign:
            raise StoreError(f"{self.root}: not empty and not a squash store "
                             f"(has {sorted(foreign)[0]})")
        for directory in (self.root, self.meta, self.image_meta_dir, self.layer_meta_dir,
                          self.squash_dir, self.tmp_dir, self.overlay, self.links,
                          self.layers_dir, self.images_dir):
            try:
                directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the store: {directory}: "
                                 f"{exc.strerror}") from exc
            os.chmod(directory, 0o755)
        with locking.exclusive(self.lock_file):
            for lock in (self.layers_lock, self.images_lock):
                with locking.exclusive(lock):
                    pass
            for path in (self.layers_json, self.images_json):
                if not path.exists():
                    atomic_write_json(path, [])
            if not self.format_file.exists():
                atomic_write(self.format_file, f"{FORMAT_VERSION}\n".encode())

    # ----------------------------------------------------------------- reading

    def layer_records(self) -> list[dict[str, Any]]:
        return _records(self.layers_json)

    def image_records(self) -> list[dict[str, Any]]:
        return _records(self.images_json)

    def _store_image(self, record: dict[str, Any],
                     layers: dict[str, dict[str, Any]]) -> StoreImage:
        iid = str(record["id"])
        lid = str(record.get("layer", ""))
        layer = layers.get(lid, {})
        meta = read_json(self.image_meta_dir / f"{iid}.json", {})
        layer_meta = read_json(self.layer_meta_dir / f"{lid}.json", {})
        metadata = {"source": meta.get("source", {}), "squash": layer_meta,
                    "migrated": meta.get("migrated", ""), "named": meta.get("named", True)}
        if meta.get("pulled"):
            metadata["pulled"] = meta["pulled"]
        return StoreImage(
            id=iid, names=tuple(record.get("names") or ()), layer=lid,
            digest=str(record.get("digest", "")), created=str(record.get("created", "")),
            size=int(layer.get("diff-size", 0)), squash=self.squash_file(lid),
            diff=self.diff_dir(lid), metadata=metadata)

    def config_of(self, image: StoreImage) -> bytes:
        """The image's config (its big-data item ``sha256:<id>``)."""
        data = podmanstore.read_big_data(self.images_dir / image.id, "sha256:" + image.id)
        if data is None:
            raise StoreError(f"image {image.id}: its config is missing from the store")
        return data

    def image_of_layer(self, layer: str) -> str:
        """The id of an image whose layer is `layer` ("" if none), from images.json alone
        (the mount program asks at every container start: no per-image files read)."""
        return next((str(r["id"]) for r in self.image_records() if r.get("layer") == layer),
                    "")

    def images(self) -> list[StoreImage]:
        self.check()
        layers = {str(r.get("id")): r for r in self.layer_records()}
        return [self._store_image(r, layers) for r in self.image_records()]

    def resolve(self, reference: str) -> StoreImage:
        """An image by name (as podman resolves it), id, ``sha256:`` id or unique prefix."""
        images = self.images()
        ref = reference.removeprefix("sha256:")
        by_id = [i for i in images if i.id == ref]
        if by_id:
            return by_id[0]
        for candidate in name_candidates(reference):
            named = [i for i in images if candidate in i.names]
            if named:
                return named[0]
        if re.fullmatch(r"[0-9a-f]{3,64}", ref):
            prefixed = [i for i in images if i.id.startswith(ref)]
            if len(prefixed) == 1:
                return prefixed[0]
            if len(prefixed) > 1:
                raise StoreError(f"{reference}: id prefix matches {len(prefixed)} images")
        suffix = name_candidates(reference)[0]
        short = [i for i in images if any(n.endswith("/" + suffix) for n in i.names)]
        if len(short) == 1:
            return short[0]
        if len(short) > 1:
            raise StoreError(f"{reference}: short name matches {len(short)} images; "
                             "give the full name")
        raise ImageNotFound(f"{reference}: image not found in store {self.root}")

    def find_by_source(self, config_digest: str, manifest_digest: str,
                       options: dict[str, Any]) -> StoreImage | None:
        """An image migrated from this source with these squash options, if any."""
        for image in self.images():
            if image.metadata.get("pulled"):
                # What a pulled artifact says of its source is the pusher's claim: never
                # taken as this store's own migration of that source.
                continue
            source = image.metadata.get("source", {})
            same_source = (source.get("config_digest") == config_digest
                           and source.get("digest") == manifest_digest)
            if same_source and image.metadata.get("squash", {}).get("options") == options:
                return image
        return None

    # ----------------------------------------------------------------- writing

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private temporary directory for a writer's slow work (outside the lock)."""
        self.init()
        path = self.tmp_dir / f"{host.me().tag()}.{secrets.token_hex(6)}"
        path.mkdir(mode=0o755)
        os.chmod(path, 0o755)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError, StoreError):
                remove_tree(path)

    @contextmanager
    def write_lock(self, unmount: Unmounter = _no_unmount) -> Iterator[list[str]]:
        """The project lock; leftovers of dead writers are removed on entry (yielded)."""
        self.init()
        trust.check_tree(self.root)  # leftover removal below may touch every entry
        with locking.exclusive(self.lock_file):
            yield self._clean_leftovers(unmount)

    def _write_layers(self, records: list[dict[str, Any]]) -> None:
        with podmanstore.write_locked(self.layers_lock):
            atomic_write_json(self.layers_json, records)

    def _write_images(self, records: list[dict[str, Any]]) -> None:
        with podmanstore.write_locked(self.images_lock):
            atomic_write_json(self.images_json, records)

    def publish(self, pub: Publication, unmount: Unmounter = _no_unmount) -> StoreImage:
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
        staged_image = self._stage_image_dir(pub, iid)
        staged_layer = self._stage_layer_dir(pub.squash.parent, lid)
        with self.write_lock(unmount):
            publish_hook("locked")
            self._install_layer_files(pub, lid, staged_layer)
            publish_hook("layer-files")
            self._install_image_files(pub, iid, staged_image)
            publish_hook("image-files")
            layers = [r for r in self.layer_records() if r.get("id") != lid]
            layers.append(self._layer_record(pub, lid))
            self._write_layers(layers)
            publish_hook("layer-record")
            images = self.image_records()
            old = next((r for r in images if r.get("id") == iid), None)
            record = self._image_record(pub, iid, lid, old)
            for other in images:
                if other.get("id") != iid:
                    other["names"] = [n for n in other.get("names") or [] if n not in names]
            images = [r for r in images if r.get("id") != iid] + [record]
            all_names = [*record["names"], *names]
            record["names"] = list(dict.fromkeys(all_names))
            self._write_images(images)
            publish_hook("image-record")
        return self.resolve(iid)

    def _stage_image_dir(self, pub: Publication, iid: str) -> Path:
        staged = pub.squash.parent / f"image-{iid}"
        staged.mkdir(mode=0o755, exist_ok=True)
        os.chmod(staged, 0o755)
        config_key = "sha256:" + iid
        manifest_key = "manifest-sha256:" + sha256_hex(pub.manifest)
        for key, data in ((config_key, pub.config), (manifest_key, pub.manifest),
                          ("manifest", pub.manifest)):
            atomic_write(staged / podmanstore.big_data_name(key), data)
        return staged

    def _stage_layer_dir(self, staging: Path, lid: str) -> Path:
        staged = staging / f"layer-{lid}"
        staged.mkdir(mode=0o755, exist_ok=True)
        os.chmod(staged, 0o755)
        # diff: the squash mount point. empty and merged: podman mounts the layer read-only
        # (lowerdir=diff:empty) on merged when it commits a container built FROM the image.
        for name in LAYER_DIRS:
            (staged / name).mkdir(mode=0o755, exist_ok=True)
            os.chmod(staged / name, 0o755)
        atomic_write(staged / "link", link_name(lid).encode())
        return staged

    def _install_layer_files(self, pub: Publication, lid: str, staged_layer: Path) -> None:
        # The layer id is the content's digest: a layer already here has the same files, and
        # its squash file may be mounted on other hosts of a shared store (replacing it
        # would give them ESTALE), so it is kept, with the options it was written with.
        # A lazily pulled layer is the exception: its file is a partial cache of what a
        # registry claimed (its diff id unchecked until complete), so a squash file made
        # here from the source replaces it; its servers keep their open cache file.
        # (A lazy install's own marker is staged before its file is here: not this case.)
        existing = self.squash_file(lid)
        lazy = existing.is_file() and lazy_paths.is_lazy(existing)
        kept = existing.is_file() and not lazy
        if not kept:
            os.chmod(pub.squash, 0o644)
            os.rename(pub.squash, existing)
            publish_hook("squash-file")
            if lazy:
                for stale in (lazy_paths.marker_path(existing), lazy_paths.map_path(existing)):
                    with contextlib.suppress(FileNotFoundError):
                        stale.unlink()
        if pub.tar_split is not None and not (kept and self.tar_split_file(lid).is_file()):
            os.chmod(pub.tar_split, 0o644)
            os.rename(pub.tar_split, self.tar_split_file(lid))
        layer_dir = self.overlay / lid
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
        link = self.links / link_name(lid)
        target = f"../{lid}/diff"
        if not link.is_symlink() or os.readlink(link) != target:
            tmp = temp_name(link)
            os.symlink(target, tmp)
            os.rename(tmp, link)
        if not kept or not (self.layer_meta_dir / f"{lid}.json").is_file():
            layer_meta = {**pub.layer_metadata, "file": str(self.squash_file(lid).name),
                          "bytes": self.squash_file(lid).stat().st_size}
            atomic_write_json(self.layer_meta_dir / f"{lid}.json", layer_meta)
        fsync_dir(self.squash_dir)

    def _install_image_files(self, pub: Publication, iid: str, staged_image: Path) -> None:
        image_dir = self.images_dir / iid
        if not self._same_files(staged_image, image_dir):
            # Only a damaged leftover differs (the content is a function of the image id),
            # so podman never sees a listed image without its data.
            if os.path.lexists(image_dir):
                remove_tree(image_dir)
            os.rename(staged_image, image_dir)
        atomic_write_json(self.image_meta_dir / f"{iid}.json", pub.image_metadata)

    @staticmethod
    def _same_files(staged: Path, installed: Path) -> bool:
        try:
            return all((installed / name).read_bytes() == (staged / name).read_bytes()
                       for name in os.listdir(staged))
        except OSError:
            return False

    def _layer_record(self, pub: Publication, lid: str) -> dict[str, Any]:
        return {"id": lid, "created": pub.created,
                "compressed-diff-digest": pub.diff_digest, "compressed-size": pub.diff_size,
                "diff-digest": pub.diff_digest, "diff-size": pub.diff_size,
                "compression": 0}

    def _image_record(self, pub: Publication, iid: str, lid: str,
                      old: dict[str, Any] | None) -> dict[str, Any]:
        config_key = "sha256:" + iid
        manifest_digest = "sha256:" + sha256_hex(pub.manifest)
        manifest_key = "manifest-" + manifest_digest
        items = {config_key: pub.config, manifest_key: pub.manifest, "manifest": pub.manifest}
        return {
            "id": iid,
            "digest": manifest_digest,
            "names": list((old or {}).get("names") or []),
            "layer": lid,
            "metadata": "{}",
            "big-data-names": list(items),
            "big-data-sizes": {k: len(v) for k, v in items.items()},
            "big-data-digests": {k: "sha256:" + sha256_hex(v) for k, v in items.items()},
            "created": pub.created,
        }

    # ----------------------------------------------------------------- names

    def add_names(self, iid: str, names: tuple[str, ...]) -> StoreImage:
        """Give ``iid`` these names, taking them from any other image."""
        full = tuple(dict.fromkeys(normalize_name(n) for n in names))
        with self.write_lock():
            images = self.image_records()
            if not any(r.get("id") == iid for r in images):
                raise ImageNotFound(f"{iid}: image not found in store {self.root}")
            for record in images:
                current = [n for n in record.get("names") or [] if n not in full]
                if record.get("id") == iid:
                    current = list(dict.fromkeys([*(record.get("names") or []), *full]))
                record["names"] = current
            self._write_images(images)
        return self.resolve(iid)

    def remove_name(self, iid: str, name: str) -> StoreImage:
        full = normalize_name(name)
        with self.write_lock():
            images = self.image_records()
            record = next((r for r in images if r.get("id") == iid), None)
            if record is None:
                raise ImageNotFound(f"{iid}: image not found in store {self.root}")
            if full not in (record.get("names") or []):
                raise StoreError(f"image {iid[:12]} has no name {full}")
            record["names"] = [n for n in record["names"] if n != full]
            self._write_images(images)
        return self.resolve(iid)

    # ----------------------------------------------------------------- removal and gc

    def remove_image(self, iid: str, unmount: Unmounter = _no_unmount) -> list[str]:
        """Remove an image (record first, then its files and unshared layer)."""
        with self.write_lock(unmount) as removed:
            images = self.image_records()
            if not any(r.get("id") == iid for r in images):
                raise ImageNotFound(f"{iid}: image not found in store {self.root}")
            self._write_images([r for r in images if r.get("id") != iid])
            return [*removed, iid, *self._clean_leftovers(unmount)]

    def gc(self, in_use: Callable[[StoreImage], bool],
           unmount: Unmounter = _no_unmount) -> list[str]:
        """Remove dangling images nothing uses and all leftovers; returns what went.

        Dangling: an image that lost all its names (they moved to another image, or were
        untagged). An image migrated without any name (its image metadata has ``named``
        false) is never dangling: only `remove_image` removes it."""
        with self.write_lock(unmount) as removed:
            images = self.image_records()
            layers = {str(r.get("id")): r for r in self.layer_records()}
            keep = []
            for record in images:
                image = self._store_image(record, layers)
                if not record.get("names") and image.metadata.get("named", True) and not \
                        in_use(image):
                    removed.append(f"image {record['id']}")
                else:
                    keep.append(record)
            if len(keep) != len(images):
                self._write_images(keep)
            removed.extend(self._clean_leftovers(unmount))
        return removed

    def _clean_leftovers(self, unmount: Unmounter) -> list[str]:
        """Remove everything no record reaches. Call only under the project lock."""
        removed = self._clean_temporaries()
        images = self.image_records()
        image_ids = {str(r.get("id")) for r in images}
        used_layers = {str(r.get("layer")) for r in images}
        layers = self.layer_records()
        orphans = [r for r in layers if str(r.get("id")) not in used_layers]
        if orphans:
            self._write_layers([r for r in layers if str(r.get("id")) in used_layers])
            removed.extend(f"layer record {r.get('id')}" for r in orphans)
        layer_ids = used_layers & {str(r.get("id")) for r in layers}
        removed.extend(self._clean_layer_dirs(layer_ids, unmount))
        removed.extend(self._clean_files(self.images_dir, image_ids, "",
                                         keep={"images.json", "images.lock"}))
        removed.extend(self._clean_files(self.image_meta_dir, image_ids, ".json"))
        removed.extend(self._clean_files(self.layer_meta_dir, layer_ids, ".json"))
        removed.extend(self._clean_files(self.squash_dir, layer_ids, ".sqfs"))
        removed.extend(self._clean_files(self.meta / lazy_paths.PREFETCH_DIR, layer_ids,
                                         ".json"))
        for path in lazy_paths.leftovers(self.meta, layer_ids, TMP_SUFFIX,
                                              FOREIGN_LEFTOVER_AGE):
            path.unlink(missing_ok=True)
            removed.append(str(path.relative_to(self.root)))
        removed.extend(self._clean_files(self.layers_dir, layer_ids, ".tar-split.gz",
                                         keep={"layers.json", "layers.lock"}))
        return removed

    def _clean_layer_dirs(self, layer_ids: set[str], unmount: Unmounter) -> list[str]:
        removed = []
        for entry in self._listdir(self.overlay):
            if entry == "l" or entry in layer_ids:
                continue
            path = self.overlay / entry
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
        for entry in self._listdir(self.links):
            link = self.links / entry
            target = os.readlink(link) if link.is_symlink() else ""
            lid = target.split("/")[1] if target.count("/") == 2 else ""
            if lid not in layer_ids or entry != link_name(lid):
                if entry.endswith(TMP_SUFFIX) and self._live_temp(entry):
                    continue
                link.unlink()
                removed.append(f"link {entry}")
        return removed

    def _clean_files(self, directory: Path, ids: set[str], suffix: str,
                     keep: set[str] | None = None) -> list[str]:
        removed = []
        for entry in self._listdir(directory):
            if entry in (keep or set()) or entry.endswith(TMP_SUFFIX):
                continue
            if entry.endswith(suffix) and entry[:len(entry) - len(suffix)] in ids:
                continue
            if entry.endswith(".lock"):
                continue
            remove_tree(directory / entry)
            removed.append(str((directory / entry).relative_to(self.root)))
        return removed

    def _clean_temporaries(self) -> list[str]:
        """Writers' staging dirs and atomic-write temp files whose writer is dead."""
        removed = []
        for entry in self._listdir(self.tmp_dir):
            writer = host.ProcessId.parse(entry.rsplit(".", 1)[0])
            if writer is None or not self._writer_alive(writer, self.tmp_dir / entry):
                with contextlib.suppress(StoreError):
                    remove_tree(self.tmp_dir / entry)
                    removed.append(f"staging {entry}")
        for directory in (self.meta, self.image_meta_dir, self.layer_meta_dir, self.squash_dir,
                          self.layers_dir, self.images_dir, self.links):
            for entry in self._listdir(directory):
                if entry.endswith(TMP_SUFFIX) and not self._live_temp(entry, directory):
                    remove_tree(directory / entry)
                    removed.append(f"temporary {entry}")
        return removed

    def _live_temp(self, entry: str, directory: Path | None = None) -> bool:
        parts = entry.removesuffix(TMP_SUFFIX).rsplit(".", 4)
        writer = host.ProcessId.parse(".".join(parts[-4:-1])) if len(parts) == 5 else None
        if writer is None:
            return False
        return self._writer_alive(writer, (directory or self.links) / entry)

    @staticmethod
    def _writer_alive(writer: host.ProcessId, path: Path) -> bool:
        if writer.host == host.hostname():
            return writer.is_alive()
        try:
            age = time.time() - path.lstat().st_mtime
        except OSError:
            return False
        return age < FOREIGN_LEFTOVER_AGE

    @staticmethod
    def _listdir(directory: Path) -> list[str]:
        try:
            return sorted(os.listdir(directory))
        except FileNotFoundError:
            return []

    # ----------------------------------------------------------------- verification

    def verify_structure(self) -> list[str]:
        """Problems found in the store's records and files (empty when sound; see
        `squashstore.storeverify`)."""
        from squashstore import storeverify

        return storeverify.verify_structure(self)
