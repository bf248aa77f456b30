"""The squash store: a podman additional image store treated as a database (the façade).

`Store` is the one object callers hold. It owns the store's layout (podman's ``overlay/``,
``overlay-layers/``, ``overlay-images/`` as containers/storage 1.43 reads them, plus
squashstore's own ``squashstore/`` directory holding the format-version file, the project
lock, the squash files, per-image and per-layer metadata and writers' temporary
directories), ``init``, reading (images, name resolution as podman resolves names), names
(a name is never on two images), the project lock and the record files' writes. The rest
lives in one module each, behind thin methods here: publishing (`squashstore.publish`: slow
data staged outside the lock, then a few atomic renames), removal, ``gc`` and crash
leftovers (`squashstore.storegc`), the structural check (`squashstore.storeverify`); what
they share is `squashstore.storebase`. Every JSON rewrite is temp + fsync + rename; files
are world-readable and directories world-searchable so a site can share a store read-only.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from squashstore import host, locking, podmanstore, publish, storegc, storelayout, trust
from squashstore.atomic import TMP_SUFFIX as TMP_SUFFIX
from squashstore.atomic import atomic_write as atomic_write
from squashstore.atomic import atomic_write_json as atomic_write_json
from squashstore.podmanstore import ImageRecord, LayerRecord
from squashstore.publish import PUBLISH_HOOK as PUBLISH_HOOK
from squashstore.publish import PUBLISH_STEPS as PUBLISH_STEPS
from squashstore.publish import Publication as Publication
from squashstore.publish import publish_hook as publish_hook
from squashstore.storebase import LAYER_DIRS as LAYER_DIRS
from squashstore.storebase import LINK_LENGTH as LINK_LENGTH
from squashstore.storebase import ImageNotFound as ImageNotFound
from squashstore.storebase import NameError_ as NameError_
from squashstore.storebase import Unmounter as Unmounter
from squashstore.storebase import link_name as link_name
from squashstore.storebase import name_candidates as name_candidates
from squashstore.storebase import no_unmount
from squashstore.storebase import normalize_name as normalize_name
from squashstore.storebase import now_rfc3339 as now_rfc3339
from squashstore.storebase import read_json as read_json
from squashstore.storebase import remove_tree as remove_tree
from squashstore.storebase import sha256_hex as sha256_hex
from squashstore.storegc import FOREIGN_LEFTOVER_AGE as FOREIGN_LEFTOVER_AGE
from squashstore.storelayout import FORMAT_VERSION as FORMAT_VERSION
from squashstore.storelayout import META as META
from squashstore.storelayout import TOP_ENTRIES as TOP_ENTRIES
from squashstore.storelayout import StoreError as StoreError

R = TypeVar("R")


def _records(load: Callable[[Path], R], path: Path) -> R:
    """containers/storage's records (`podmanstore`'s loader and its one error policy), a
    damaged file reported as a `StoreError`."""
    try:
        return load(path)
    except podmanstore.PodmanStoreError as exc:
        raise StoreError(str(exc)) from exc


PULL_LOCK_SUFFIX = f".pull{storegc.LOCK_SUFFIX}"
"""The name ending of a layer's pull lock in the squash directory (`Store.pull_lock`)."""


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

# --------------------------------------------------------------------------- the store

class Store:
    """A squash store rooted at ``root``."""

    def __init__(self, root: Path) -> None:
        # Resolved once: every path below it is then used only if reached without symlinks.
        self.root = Path(os.path.realpath(root))
        self.meta = self.root / META
        self.format_file = storelayout.format_file(self.root)
        self.lock_file = self.meta / storelayout.LOCK_FILE
        self.image_meta_dir = self.meta / storelayout.IMAGE_META_DIR
        self.layer_meta_dir = self.meta / storelayout.LAYER_META_DIR
        self.squash_dir = self.meta / storelayout.SQUASH_DIR
        self.tmp_dir = self.meta / storelayout.TMP_DIR
        # podman's part of the store: containers/storage's overlay layout (podmanstore's).
        self.layout = podmanstore.Layout(self.root, "overlay")
        self.overlay = self.root / self.layout.driver
        self.links = self.root.joinpath(*trust.LINK_DIR)
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

    def diff_dir(self, layer_id: str) -> Path:
        return storelayout.diff_dir(self.root, layer_id)

    def squash_file(self, layer_id: str) -> Path:
        return storelayout.squash_file(self.root, layer_id)

    def tar_split_file(self, layer_id: str) -> Path:
        return self.layout.tar_split(layer_id)

    def pull_lock(self, layer_id: str) -> Path:
        """The lock a pull of layer `layer_id` holds while it checks what the store has and
        installs (eager and lazy pulls alike)."""
        return self.squash_dir / f"{storelayout.checked_id(layer_id)}{PULL_LOCK_SUFFIX}"

    def is_private_lock(self, path: Path) -> bool:
        """Whether `path` is one of the writers' own locks (the project lock, a pull lock):
        mode `locking.PRIVATE_MODE`, never world-readable (`storeverify` allows it)."""
        return path == self.lock_file or (path.parent == self.squash_dir
                                          and path.name.endswith(PULL_LOCK_SUFFIX))

    def pull_locked(self, layer_id: str) -> locking.exclusive:
        """`pull_lock` held (the writers' own lock: `locking.PRIVATE_MODE`)."""
        return locking.exclusive(self.pull_lock(layer_id), mode=locking.PRIVATE_MODE)

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
        self._check_before_creating()
        foreign = set(storegc.listdir(self.root)) - {META, "overlay", "overlay-layers",
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
        with locking.exclusive(self.lock_file, mode=locking.PRIVATE_MODE):
            for lock in (self.layers_lock, self.images_lock):
                with locking.exclusive(lock):
                    pass
            for path in (self.layers_json, self.images_json):
                if not path.exists():
                    atomic_write_json(path, [])
            if not self.format_file.exists():
                atomic_write(self.format_file, f"{FORMAT_VERSION}\n".encode())

    def _check_before_creating(self) -> None:
        """As real root, before `init` makes or chmods anything: what exists of the store
        and every directory above it is root's alone (`trust.check_top`), so no entry
        another user planted (``overlay-images -> /root``) leads the mkdirs, chmods and
        writes out of the store; for a store not there yet, its nearest existing ancestor
        and those above it (a store created inside another user's directory could be
        swapped for their symlinks between two mkdirs)."""
        if not host.is_real_root():
            return
        if os.path.lexists(self.root):
            trust.check_top(self.root, TOP_ENTRIES)
            return
        existing = self.root.parent
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        trust.check_ancestors(existing / self.root.name, "a store")

    # ----------------------------------------------------------------- reading

    def layer_records(self) -> list[LayerRecord]:
        return _records(podmanstore.layers, self.layers_json)

    def image_records(self) -> list[ImageRecord]:
        return _records(podmanstore.images, self.images_json)

    def store_image(self, record: ImageRecord,
                    layers: Mapping[str, LayerRecord]) -> StoreImage:
        iid = record.id
        lid = record.layer
        layer = layers.get(lid)
        meta = read_json(self.image_meta_dir / f"{iid}.json", {})
        layer_meta = read_json(self.layer_meta_dir / f"{lid}.json", {})
        metadata = {"source": meta.get("source", {}), "squash": layer_meta,
                    "migrated": meta.get("migrated", ""), "named": meta.get("named", True)}
        if meta.get("pulled"):
            metadata["pulled"] = meta["pulled"]
        return StoreImage(
            id=iid, names=record.names, layer=lid, digest=record.digest,
            created=record.created,
            size=layer.diff_size if layer is not None and layer.diff_size >= 0 else 0,
            squash=self.squash_file(lid),
            diff=self.diff_dir(lid), metadata=metadata)

    def config_of(self, image: StoreImage) -> bytes:
        """The image's config (its big-data item ``sha256:<id>``)."""
        data = podmanstore.read_big_data(self.images_dir / image.id,
                                         podmanstore.config_key(image.id))
        if data is None:
            raise StoreError(f"image {image.id}: its config is missing from the store")
        return data

    def image_of_layer(self, layer: str) -> str:
        """The id of an image whose layer is `layer` ("" if none), from images.json alone
        (the mount program asks at every container start: no per-image files read)."""
        return _records(lambda path: podmanstore.image_of_layer(path, layer), self.images_json)

    def images(self) -> list[StoreImage]:
        self.check()
        layers = {r.id: r for r in self.layer_records()}
        return [self.store_image(r, layers) for r in self.image_records()]

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

    def has_layer(self, layer_id: str) -> bool:
        """Whether layer `layer_id` is published: its squash file is here and a layer
        record names it (a squash file no record names is a killed writer's leftover, which
        the next writer removes)."""
        return self.squash_file(layer_id).is_file() and \
            any(r.id == layer_id for r in self.layer_records())

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
    def write_lock(self, unmount: Unmounter = no_unmount) -> Iterator[list[str]]:
        """The project lock; leftovers of dead writers are removed on entry (yielded)."""
        self.init()
        trust.check_tree(self.root)  # leftover removal below may touch every entry
        with locking.exclusive(self.lock_file, mode=locking.PRIVATE_MODE):
            yield storegc.clean_leftovers(self, unmount)

    def write_layer_records(self, records: Iterable[LayerRecord]) -> None:
        """Rewrite ``layers.json`` under podman's lock (call under the project lock); every
        field a record was read with is written back."""
        with podmanstore.write_locked(self.layers_lock):
            atomic_write_json(self.layers_json, [r.to_json() for r in records])

    def write_image_records(self, records: Iterable[ImageRecord]) -> None:
        """Rewrite ``images.json`` under podman's lock (call under the project lock); every
        field a record was read with is written back."""
        with podmanstore.write_locked(self.images_lock):
            atomic_write_json(self.images_json, [r.to_json() for r in records])

    def publish(self, pub: Publication, unmount: Unmounter = no_unmount) -> StoreImage:
        """Make a staged image visible (`squashstore.publish.publish`)."""
        return publish.publish(self, pub, unmount)

    # ----------------------------------------------------------------- names

    def add_names(self, iid: str, names: tuple[str, ...]) -> StoreImage:
        """Give ``iid`` these names, taking them from any other image."""
        full = tuple(dict.fromkeys(normalize_name(n) for n in names))
        with self.write_lock():
            images = self.image_records()
            if not any(r.id == iid for r in images):
                raise ImageNotFound(f"{iid}: image not found in store {self.root}")
            renamed = []
            for record in images:
                current = tuple(n for n in record.names if n not in full)
                if record.id == iid:
                    current = tuple(dict.fromkeys([*record.names, *full]))
                renamed.append(record.replace(names=current))
            self.write_image_records(renamed)
        return self.resolve(iid)

    def remove_name(self, iid: str, name: str) -> StoreImage:
        full = normalize_name(name)
        with self.write_lock():
            images = self.image_records()
            record = next((r for r in images if r.id == iid), None)
            if record is None:
                raise ImageNotFound(f"{iid}: image not found in store {self.root}")
            if full not in record.names:
                raise StoreError(f"image {iid[:12]} has no name {full}")
            renamed = record.replace(names=tuple(n for n in record.names if n != full))
            self.write_image_records(renamed if r is record else r for r in images)
        return self.resolve(iid)

    # ----------------------------------------------------------------- removal and gc

    def remove_image(self, iid: str, unmount: Unmounter = no_unmount) -> list[str]:
        """Remove an image (record first, then its files and unshared layer;
        `squashstore.storegc.remove_image`)."""
        return storegc.remove_image(self, iid, unmount)

    def gc(self, in_use: Callable[[StoreImage], bool],
           unmount: Unmounter = no_unmount) -> list[str]:
        """Remove dangling images nothing uses and all leftovers; returns what went
        (`squashstore.storegc.gc`)."""
        return storegc.gc(self, in_use, unmount)

    # ----------------------------------------------------------------- verification

    def verify_structure(self) -> list[str]:
        """Problems found in the store's records and files (empty when sound; see
        `squashstore.storeverify`)."""
        from squashstore import storeverify

        return storeverify.verify_structure(self)
