"""podman's on-disk image store (containers/storage 1.43), read and written by one module.

This module owns containers/storage's store format as squashstore meets it, in podman's own
primary stores, in additional image stores and in the squash store (which has the same
layout): where a driver keeps its files (`Layout`: ``<driver>-images``, ``<driver>-layers``,
``<driver>-containers``, a layer's ``diff`` directory, its tar-split, the overlay path rule
``<root>/overlay/<layer>/<leaf>``); the JSON record files (``images.json``, ``layers.json``,
``containers.json``, the runroot's ``mountpoints.json``) loaded by one loader with one error
policy (`PodmanStoreError` for a file that cannot be read or is not an array of objects
with string ids; a missing or empty file has no records) into typed records
(`ImageRecord`, `LayerRecord`, `ContainerRecord`, `MountCount`, each keeping its raw JSON
so a writer never drops a field it does not model: `to_json` writes it back with only the
changed fields set; the squash store's new records come from `new_image_record` and
`new_layer_record`); an image's big-data keys (`MANIFEST_KEY`, `manifest_key`,
`config_key`) and their file names exactly as
containers/storage makes them (`big_data_name`, its ``makeBigDataBaseName``) and the name
squashstore 0.1 wrote for some keys (`legacy_big_data_name`), so stores written before are
still read; containers/storage's read locks (shared record locks, the layer store's before
the image store's; `squashstore.locking` holds the lock mechanism and the writers' side);
and the walk down a layer's parent chain.
"""

from __future__ import annotations

import os

from squashstore import jsonfast, locking, trust
from squashstore.errors import SquashstoreError
from squashstore.slots import Slots
from squashstore.storelayout import overlay_layer as overlay_layer  # the rule is shared

# The OCI hook reads containers.json and layers.json at every container stop, through this
# module: it imports no json, re, pathlib, contextlib or collections at module level (the
# hook's fast exit imports os and a few small modules only; NOTES.md, branch hookfast).
# Record files are parsed by json's own C scanner (`jsonfast`), locks are classes.
TYPE_CHECKING = False  # not typing's: the OCI hook (every container stop) skips typing
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from pathlib import Path
    from typing import Any

    StrPath = str | os.PathLike[str]


class PodmanStoreError(SquashstoreError):
    """A containers/storage record file cannot be read or is damaged."""


# ---------------------------------------------------------------------------------------
# Layout.


class Layout(Slots):
    """Where one containers/storage store (a graph root or an additional image store) keeps
    its files for `driver` (``overlay`` or ``vfs``)."""

    __slots__ = ("driver", "root")
    root: Path
    driver: str

    def __init__(self, root: Path, driver: str = "overlay") -> None:
        self.root = root
        self.driver = driver

    @property
    def images_dir(self) -> Path:
        return self.root / f"{self.driver}-images"

    @property
    def layers_dir(self) -> Path:
        return self.root / f"{self.driver}-layers"

    @property
    def containers_dir(self) -> Path:
        return self.root / f"{self.driver}-containers"

    @property
    def images_json(self) -> Path:
        return self.root / record_file("", "images", self.driver)

    @property
    def layers_json(self) -> Path:
        return self.root / record_file("", "layers", self.driver)

    @property
    def containers_json(self) -> Path:
        return self.root / record_file("", "containers", self.driver)

    @property
    def images_lock(self) -> Path:
        return self.images_dir / "images.lock"

    @property
    def layers_lock(self) -> Path:
        return self.layers_dir / "layers.lock"

    def image_dir(self, image_id: str) -> Path:
        """The directory of an image's big-data items."""
        return self.images_dir / image_id

    def diff_dir(self, layer_id: str) -> Path:
        if self.driver == "vfs":
            return self.root / "vfs" / "dir" / layer_id
        return self.root / self.driver / layer_id / "diff"

    def tar_split(self, layer_id: str) -> Path:
        return self.layers_dir / f"{layer_id}{TAR_SPLIT_SUFFIX}"


def record_file(root: StrPath, kind: str, driver: str = "overlay") -> str:
    """``<root>/<driver>-<kind>/<kind>.json``: a store's record file of `kind` (``images``,
    ``layers`` or ``containers``), as a string (the OCI hook's path; `Layout` has them as
    `Path`)."""
    return os.path.join(root, f"{driver}-{kind}", f"{kind}.json")


TAR_SPLIT_SUFFIX = ".tar-split.gz"
"""A layer's tar-split file: its id and this, in the layer store's directory."""


def mount_counts_json(runroot: Path, driver: str = "overlay") -> Path:
    """The runroot's record of how often each layer is mounted."""
    return runroot / f"{driver}-layers" / "mountpoints.json"


# ---------------------------------------------------------------------------------------
# Big-data file names.


MANIFEST_KEY = "manifest"
"""The big-data key of an image's manifest (also kept under `manifest_key`)."""


def manifest_key(digest: str) -> str:
    """The big-data key of the manifest whose digest is `digest`."""
    return f"{MANIFEST_KEY}-{digest}"


def is_manifest_key(key: str) -> bool:
    return key == MANIFEST_KEY or key.startswith(MANIFEST_KEY + "-")


def config_key(image_id: str) -> str:
    """The big-data key of an image's config: its digest, which is the image id."""
    return "sha256:" + image_id


def big_data_name(key: str) -> str:
    """containers/storage's file name for an image big-data item (``makeBigDataBaseName``):
    the key itself when every character is in ``[.0-9a-z]``, else ``=`` + base64 (standard
    alphabet, padded) of the key."""
    if all(c == "." or "0" <= c <= "9" or "a" <= c <= "z" for c in key):
        return key
    return "=" + _b64(key)


def _b64(key: str) -> str:
    import base64  # imported when needed: the OCI hook reads podman's files at every stop

    return base64.standard_b64encode(key.encode()).decode()


_LEGACY_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
"""The characters of a name squashstore 0.1 wrote plain (``[A-Za-z0-9._-]+``)."""


def legacy_big_data_name(key: str) -> str:
    """The file name squashstore 0.1 wrote for a big-data item (plain for ``[A-Za-z0-9._-]``,
    where podman looks for ``=`` + base64): read, never written."""
    if key and all(c in _LEGACY_PLAIN for c in key) and not key.startswith("="):
        return key
    return "=" + _b64(key)


def big_data_paths(image_dir: Path, key: str) -> list[Path]:
    """Where an image's big-data item `key` may be: podman's name, then the legacy one."""
    names = dict.fromkeys((big_data_name(key), legacy_big_data_name(key)))
    return [image_dir / name for name in names]


def read_big_data(image_dir: Path, key: str) -> bytes | None:
    """An image's big-data item `key`, None when it is under neither name."""
    for path in big_data_paths(image_dir, key):
        try:
            return path.read_bytes()
        except FileNotFoundError:
            continue
    return None


# ---------------------------------------------------------------------------------------
# Records.


def _strings(value: object) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _string(value: object) -> str:
    return value if isinstance(value, str) else ""


def _json_value(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    from collections.abc import Mapping  # only a writer gets here

    if isinstance(value, Mapping):
        return dict(value)
    return value


def _to_json(record: object, read: object | None, raw: Mapping[str, Any],
             fields: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """`raw` with each modelled field that differs from what was read (`read`, the record
    parsed from `raw`; None for a record not read from JSON) set anew: a record read and
    written back keeps every key, modelled or not, in its order."""
    out = dict(raw)
    for attr, key in fields:
        value = getattr(record, attr)
        if read is not None and getattr(read, attr) == value:
            continue
        out[key] = _json_value(value)
    return out


class _Record(Slots):
    """A record of one of podman's JSON files: a `Slots` record whose ``raw`` slot (the
    JSON object as read) takes no part in equality, hashing or ``repr``. Records are
    `Slots`, not dataclasses: the mount program reads images.json at every first start,
    and ``dataclasses`` alone is ~41 M instructions to import (callgrind, branch first)."""

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__ if name != "raw")

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__
                           if name != "raw")
        return f"{type(self).__name__}({fields})"


class ImageRecord(_Record):
    """One entry of ``images.json``."""

    __slots__ = (
        "big_data_digests",
        "big_data_names",
        "created",
        "digest",
        "digests",
        "id",
        "layer",
        "names",
        "raw",
    )
    id: str
    names: tuple[str, ...]
    layer: str
    """The image's top layer ("" for an image without layers)."""
    digest: str
    """The digest of its manifest."""
    digests: tuple[str, ...]
    created: str
    big_data_names: tuple[str, ...]
    big_data_digests: Mapping[str, str]
    raw: Mapping[str, Any]
    """The whole JSON object as read, with the fields not modelled here (written back by
    `to_json`, so a rewrite never drops what podman or a later version wrote)."""

    def __init__(self, id: str, names: tuple[str, ...] = (), layer: str = "",
                 digest: str = "", digests: tuple[str, ...] = (), created: str = "",
                 big_data_names: tuple[str, ...] = (),
                 big_data_digests: Mapping[str, str] | None = None,
                 raw: Mapping[str, Any] | None = None) -> None:
        self.id = id
        self.names = names
        self.layer = layer
        self.digest = digest
        self.digests = digests
        self.created = created
        self.big_data_names = big_data_names
        self.big_data_digests = {} if big_data_digests is None else big_data_digests
        self.raw = {} if raw is None else raw

    FIELDS = (("id", "id"), ("names", "names"), ("layer", "layer"), ("digest", "digest"),
              ("digests", "digests"), ("created", "created"),
              ("big_data_names", "big-data-names"), ("big_data_digests", "big-data-digests"))

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> ImageRecord:
        digests = raw.get("big-data-digests")
        return cls(
            id=raw["id"], names=_strings(raw.get("names")), layer=_string(raw.get("layer")),
            digest=_string(raw.get("digest")), digests=_strings(raw.get("digests")),
            created=_string(raw.get("created")),
            big_data_names=_strings(raw.get("big-data-names")),
            big_data_digests={k: v for k, v in digests.items()
                              if isinstance(k, str) and isinstance(v, str)}
            if isinstance(digests, dict) else {},
            raw=raw)

    def to_json(self) -> dict[str, Any]:
        """The JSON object to write (`raw`, with the modelled fields changed since)."""
        return _to_json(self, ImageRecord.parse(self.raw) if self.raw else None, self.raw,
                        self.FIELDS)


class LayerRecord(_Record):
    """One entry of ``layers.json``."""

    __slots__ = ("diff_digest", "diff_size", "id", "parent", "raw")
    id: str
    parent: str
    """The layer below ("" for a bottom layer)."""
    diff_digest: str
    """The digest of its uncompressed tar (an image config's diff id)."""
    diff_size: int
    """Bytes of that tar; -1 when not recorded."""
    raw: Mapping[str, Any]
    """The whole JSON object as read (see `ImageRecord.raw`)."""

    def __init__(self, id: str, parent: str = "", diff_digest: str = "",
                 diff_size: int = -1, raw: Mapping[str, Any] | None = None) -> None:
        self.id = id
        self.parent = parent
        self.diff_digest = diff_digest
        self.diff_size = diff_size
        self.raw = {} if raw is None else raw

    FIELDS = (("id", "id"), ("parent", "parent"), ("diff_digest", "diff-digest"),
              ("diff_size", "diff-size"))

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> LayerRecord:
        size = raw.get("diff-size")
        return cls(id=raw["id"], parent=_string(raw.get("parent")),
                   diff_digest=_string(raw.get("diff-digest")),
                   diff_size=size if isinstance(size, int) and not isinstance(size, bool)
                   else -1,
                   raw=raw)

    def to_json(self) -> dict[str, Any]:
        """The JSON object to write (`raw`, with the modelled fields changed since)."""
        return _to_json(self, LayerRecord.parse(self.raw) if self.raw else None, self.raw,
                        self.FIELDS)


class ContainerRecord(_Record):
    """One entry of ``containers.json``."""

    __slots__ = ("id", "image", "layer", "names", "raw")
    id: str
    names: tuple[str, ...]
    layer: str
    """The container's own (read-write) layer."""
    image: str
    raw: Mapping[str, Any]

    def __init__(self, id: str, names: tuple[str, ...] = (), layer: str = "",
                 image: str = "", raw: Mapping[str, Any] | None = None) -> None:
        self.id = id
        self.names = names
        self.layer = layer
        self.image = image
        self.raw = {} if raw is None else raw

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> ContainerRecord:
        return cls(id=raw["id"], names=_strings(raw.get("names")),
                   layer=_string(raw.get("layer")), image=_string(raw.get("image")), raw=raw)


class MountCount(_Record):
    """One entry of a runroot's ``mountpoints.json``: how often a layer is mounted."""

    __slots__ = ("count", "id", "raw")
    id: str
    count: int
    raw: Mapping[str, Any]

    def __init__(self, id: str, count: int = 0, raw: Mapping[str, Any] | None = None) -> None:
        self.id = id
        self.count = count
        self.raw = {} if raw is None else raw

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> MountCount:
        count = raw.get("count")
        return cls(id=raw["id"], count=count if isinstance(count, int) else 0, raw=raw)


def new_layer_record(layer_id: str, created: str, diff_digest: str,
                     diff_size: int) -> LayerRecord:
    """The record of a layer stored uncompressed (as the squash store's layers are), with
    the fields containers/storage writes for one, in its order."""
    return LayerRecord.parse({
        "id": layer_id, "created": created,
        "compressed-diff-digest": diff_digest, "compressed-size": diff_size,
        "diff-digest": diff_digest, "diff-size": diff_size, "compression": 0})


def new_image_record(image_id: str, manifest_digest: str, names: Iterable[str], layer: str,
                     created: str, big_data: Mapping[str, bytes]) -> ImageRecord:
    """The record of an image with one top layer and these big-data items, with the
    fields containers/storage writes for one, in its order."""
    import hashlib  # loads OpenSSL: not on the OCI hook's path, which only reads

    return ImageRecord.parse({
        "id": image_id,
        "digest": manifest_digest,
        "names": list(names),
        "layer": layer,
        "metadata": "{}",
        "big-data-names": list(big_data),
        "big-data-sizes": {k: len(v) for k, v in big_data.items()},
        "big-data-digests": {k: "sha256:" + hashlib.sha256(v).hexdigest()
                             for k, v in big_data.items()},
        "created": created,
    })


RECORD_LIMIT = 1 << 30
"""The largest podman record file read (podman reads its files whole too)."""


def load_document(path: StrPath, owner: int | None = None) -> Any:
    """The JSON document of a record file, unchecked: [] when it is missing or empty
    (`imageconfig` checks it against podman's Go types); `PodmanStoreError` when it cannot
    be read or is not JSON.

    Never a FIFO or a device (a planted one would hang the reader: the OCI hook, which
    podman waits for). With `owner` (a uid), as the OCI hook reads podman's files as root:
    only a regular file of that uid, opened without following a symlink, of at most
    `RECORD_LIMIT` bytes (`trust.read_regular`); anything else cannot be read."""
    try:
        # Without an owner through symlinks (podman's own reading); bounded either way: a
        # user's directory can be read as a podman store by root's hook and cleanup.
        data = trust.read_regular(path, RECORD_LIMIT, owner, follow=owner is None)
    except OSError as exc:
        raise PodmanStoreError(f"cannot read {path}: {exc.strerror}") from exc
    if data is None or not data.strip():
        return []
    try:
        return jsonfast.loads(data)
    except ValueError as exc:
        raise PodmanStoreError(f"{path} is not valid JSON ({exc})") from exc
    except RecursionError:
        raise PodmanStoreError(f"{path} is not valid JSON (nested too deeply)") from None


def load_records(path: StrPath, owner: int | None = None) -> list[dict[str, Any]]:
    """The objects of a containers/storage record file; [] when it is missing or empty
    (`owner`: see `load_document`).

    `PodmanStoreError` when it cannot be read, is not JSON, is not an array, or holds an
    entry that is not an object with a string ``id`` (the one policy for every record file).
    """
    records = load_document(path, owner)
    if not isinstance(records, list):
        raise PodmanStoreError(f"{path} is not a JSON array")
    if not all(isinstance(r, dict) and isinstance(r.get("id"), str) for r in records):
        raise PodmanStoreError(f"{path}: damaged (not an array of records with ids)")
    return records


def images(path: Path) -> list[ImageRecord]:
    """The records of an ``images.json``."""
    return [ImageRecord.parse(r) for r in load_records(path)]


def image_of_layer(path: Path, layer: str) -> str:
    """The id of an image in the ``images.json`` at `path` whose top layer is `layer` (""
    if none): the mount program asks at every first start, so no per-image file is read."""
    return next((r.id for r in images(path) if r.layer == layer), "")


def layers(path: StrPath, owner: int | None = None) -> list[LayerRecord]:
    """The records of a ``layers.json`` (`owner`: see `load_document`)."""
    return [LayerRecord.parse(r) for r in load_records(path, owner)]


def containers(path: StrPath, owner: int | None = None) -> list[ContainerRecord]:
    """The records of a ``containers.json`` (`owner`: see `load_document`)."""
    return [ContainerRecord.parse(r) for r in load_records(path, owner)]


def mount_counts(path: Path) -> list[MountCount]:
    """The records of a runroot's ``mountpoints.json``."""
    return [MountCount.parse(r) for r in load_records(path)]


# ---------------------------------------------------------------------------------------
# Locks.


class shared_lock:
    """containers/storage's read lock (a shared record lock) on `path`, when it exists."""

    def __init__(self, path: StrPath) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> None:
        import fcntl  # os.lockf takes write locks only

        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def __exit__(self, *exc: object) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class read_locked:
    """A store's layer and image records held still for reading, as podman reads them (the
    layer store's lock before the image store's)."""

    def __init__(self, layout: Layout) -> None:
        self.layers = shared_lock(layout.layers_lock)
        self.images = shared_lock(layout.images_lock)

    def __enter__(self) -> None:
        self.layers.__enter__()
        try:
            self.images.__enter__()
        except BaseException:
            self.layers.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self.images.__exit__()
        finally:
            self.layers.__exit__()


class write_locked:
    """A record file's lock held for writing, as containers/storage writes: an exclusive
    record lock on the existing lock file, and on success a new last-writer token, so
    podman notices the change (`squashstore.locking` holds the mechanism)."""

    def __init__(self, lock: StrPath) -> None:
        self.lock = locking.exclusive(lock, create=False)
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = self.lock.__enter__()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is None:
                locking.touch_token(self.fd)
        finally:
            self.lock.__exit__()


# ---------------------------------------------------------------------------------------
# Layer chains.

MAX_CHAIN = 1000
"""Longest layer chain followed: a longer one is taken for a loop."""


def ancestors(layer: str, parents: Mapping[str, str]) -> list[str]:
    """``layer`` and its parents, top first, following ``parents`` (stops at a loop or an id
    `parents` does not know: a layer of another store)."""
    chain: list[str] = []
    current = layer
    while current and current not in chain and len(chain) < MAX_CHAIN:
        chain.append(current)
        current = parents.get(current, "")
    return chain


def layer_chain(top: str, records: Mapping[str, LayerRecord]) -> list[LayerRecord]:
    """The records of ``top`` and every layer below it, bottom first; `PodmanStoreError`
    when one is missing or the chain loops."""
    chain: list[LayerRecord] = []
    current = top
    while current:
        record = records.get(current)
        if record is None:
            raise PodmanStoreError(f"layer {current[:12]} is missing from the store")
        chain.append(record)
        if len(chain) > MAX_CHAIN:
            raise PodmanStoreError("layer chain is too long (a loop?)")
        current = record.parent
    chain.reverse()
    return chain


def parents(records: Iterable[LayerRecord]) -> dict[str, str]:
    """layer id -> parent id, for the layers that have a parent."""
    return {r.id: r.parent for r in records if r.parent}


def children(records: Iterable[LayerRecord], layer_id: str) -> list[str]:
    """Ids of the layers whose parent is ``layer_id`` (containers and images built FROM it)."""
    return [r.id for r in records if r.parent == layer_id]
