"""The ``containers-storage:[STORE]NAME`` transport: the local podman's own storage, in place.

This module owns reading an image from containers/storage stores (the graph root and the
additional image stores storage.conf lists, or one written in the reference): finding the
image as podman resolves the name, its manifest and config among its big-data items, and
its layers, each rebuilt as a tar from its tar-split and its ``diff`` directory (or, for a
squash store's layer, from its squash file; or walked from ``diff`` when there is no
tar-split). The store's files and records are read through `podmanstore`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

from squashstore import oci, podmanstore
from squashstore.blobs import check_bytes, digest_bytes
from squashstore.image import Image, Layer, SourceError
from squashstore.podmanconf import StorageConfig, load_storage_config
from squashstore.sources import (
    CONTAINERS_STORAGE,
    Reference,
    _candidate_names,
    _split_name,
)
from squashstore.storelayer import tar_from_squash
from squashstore.tar.split import CHUNK, DiffFile, tar_from_diff_dir, tar_parts_from_tar_split
from squashstore.transports.common import (
    layer_name,
)

_HEX = re.compile(r"[0-9a-f]+")
T = TypeVar("T")
_Store = podmanstore.Layout
"""One containers/storage image store (the graph root or an additional store)."""


def _records(load: Callable[[Path], list[T]], path: Path, what: str) -> list[T]:
    try:
        return load(path)
    except podmanstore.PodmanStoreError as exc:
        raise SourceError(f"{what}: {exc}") from exc


def _stores(ref: Reference) -> tuple[list[_Store], StorageConfig | None]:
    if ref.path:
        driver, at, rest = ref.path.partition("@")
        if not at:
            driver, rest = "overlay", ref.path
        graphroot = rest.partition("+")[0].partition(":")[0]
        if not graphroot:
            raise SourceError(f"{ref.text}: store specification without a graph root")
        return [_Store(Path(graphroot), driver or "overlay")], None
    config = load_storage_config()
    stores = [_Store(config.graphroot, config.driver)]
    stores += [_Store(p, config.driver) for p in config.additional_image_stores]
    return stores, config


def _check_driver(store: _Store, what: str) -> None:
    if store.driver not in ("overlay", "vfs"):
        raise SourceError(f"{what}: storage driver {store.driver!r} is not supported "
                          "(overlay or vfs)")


_Candidate = tuple[_Store, podmanstore.ImageRecord]


def _find_image(name: str, candidates: Sequence[_Candidate], what: str,
                where: str) -> _Candidate:
    """The image `name` means, as podman resolves it; `where` lists the stores for errors."""
    text = name.removeprefix("sha256:")
    if len(text) == 64 and _HEX.fullmatch(text):
        for store, record in candidates:
            if record.id == text:
                return store, record
    try:
        wanted = _candidate_names(name)
    except SourceError:
        wanted = []
    for full in wanted:
        for store, record in candidates:
            if full in record.names:
                return store, record
    for full in wanted:
        found = _by_digest(full, candidates)
        if found is not None:
            return found
    if _HEX.fullmatch(text):
        matches = [(s, r) for s, r in candidates if r.id.startswith(text)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise SourceError(f"{what}: image id prefix {text} is ambiguous "
                              f"({len(matches)} images)")
    found = _by_short_name(name, candidates)
    if found is not None:
        return found
    raise SourceError(f"{what}: no such image in the local podman store ({where})")


def _by_short_name(name: str, candidates: Sequence[_Candidate]) -> _Candidate | None:
    """podman's last resort for a short name: the first image with a name in any registry
    whose path ends in it (``bar:1`` finds ``quay.io/foo/bar:1``)."""
    try:
        short = _split_name(name)
    except SourceError:
        return None
    if short.domain:
        return None
    suffix = "/" + short.path
    if short.tag or not short.digest:
        suffix += ":" + (short.tag or "latest")
    if short.digest:
        suffix += "@" + short.digest
    for store, record in candidates:
        if any(n.endswith(suffix) for n in record.names):
            return store, record
    return None


def _by_digest(full: str, candidates: Sequence[_Candidate]) -> _Candidate | None:
    """An image with a name in the same repository and that manifest digest."""
    head, at, digest = full.partition("@")
    if not at:
        return None
    repo = head.rsplit(":", 1)[0] if head.rfind(":") > head.rfind("/") else head
    for store, record in candidates:
        digests = [record.digest, *record.digests]
        repos = {n.partition("@")[0].rsplit(":", 1)[0] for n in record.names}
        if digest in digests and repo in repos:
            return store, record
    return None


def _read_big_data(store: _Store, image_id: str, key: str) -> bytes | None:
    return podmanstore.read_big_data(store.image_dir(image_id), key)


def _storage_manifest(store: _Store, record: podmanstore.ImageRecord, what: str) -> bytes:
    image_id = record.id
    keys: list[str] = []
    if record.digest:
        keys.append(podmanstore.manifest_key(record.digest))
    keys.append(podmanstore.MANIFEST_KEY)
    keys += [k for k in record.big_data_names
             if podmanstore.is_manifest_key(k) and k not in keys]
    for key in keys:
        data = _read_big_data(store, image_id, key)
        if data is None:
            continue
        with contextlib.suppress(SourceError):
            if oci.media_type_of(data, what) in oci.MANIFEST_TYPES:
                return data
    raise SourceError(f"{what}: image {image_id[:12]} has no OCI or Docker schema 2 manifest")


def open_containers_storage(ref: Reference) -> Image:
    what = ref.text if ref.text.startswith(CONTAINERS_STORAGE) else \
        f"{CONTAINERS_STORAGE}:{ref.text}"
    stores, _ = _stores(ref)
    candidates: list[_Candidate] = []
    for store in stores:
        with podmanstore.read_locked(store):
            candidates += [(store, r) for r in
                           _records(podmanstore.images, store.images_json, what)]
    where = ", ".join(str(s.root) for s in stores)
    store, record = _find_image(ref.name, candidates, what, where)
    _check_driver(store, what)
    with podmanstore.read_locked(store):
        layers = {r.id: r for s in [store, *stores] for r in
                  _records(podmanstore.layers, s.layers_json, what)}
        manifest_bytes = _storage_manifest(store, record, what)
        manifest = oci.parse_manifest(manifest_bytes, f"{what}: manifest")
        config = _read_big_data(store, record.id, manifest.config.digest)
    if config is None:
        raise SourceError(f"{what}: the config {manifest.config.digest} is missing from the "
                          "store")
    check_bytes(config, manifest.config.digest, f"{what}: config")
    try:
        chain = podmanstore.layer_chain(record.layer, layers) if record.layer else []
    except podmanstore.PodmanStoreError as exc:
        raise SourceError(f"{what}: {exc}") from exc
    ids = oci.diff_ids(config, f"{what}: config")
    built = tuple(_storage_layer(stores, store, i, r, manifest, ids)
                  for i, r in enumerate(chain))
    return Image(reference=ref.text, names=record.names, manifest=manifest_bytes,
                 manifest_digest=digest_bytes(manifest_bytes), config=config,
                 config_digest=manifest.config.digest, layers=built, source_id=record.id)


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


def _squash_file(store: _Store, layer_id: str) -> Path | None:
    """The squash file of a layer of a squash store (None for any other store)."""
    from squashstore.store import Store

    if store.driver != "overlay" or not Store.is_store(store.root):
        return None
    return Store(store.root).squash_file(layer_id)


def _layer_store(stores: Sequence[_Store], preferred: _Store, layer_id: str) -> _Store:
    for store in [preferred, *stores]:
        if store.tar_split(layer_id).exists() or store.diff_dir(layer_id).is_dir():
            return store
    return preferred


class _ChunkStream(io.RawIOBase):
    """A rebuilt layer tar read straight from its chunks: `read` hands a whole chunk over
    when it fits and slices it otherwise, so each byte is copied once at most. (Through
    `blobs.open_verified`, whose digests a local layer does not need, every byte went through
    two 1 MiB buffers: ~0.55 s of CPU per 300 MB, as much as rebuilding the tar.)

    A chunk may be a `DiffFile` (a file's content still in the diff directory): the tar
    reader can take it as it is (`take_reference`, for a writer that reads the file
    itself); anything else that reaches it reads and checks it here."""

    def __init__(self, chunks: Iterator[bytes | DiffFile]) -> None:
        super().__init__()
        self._chunks = chunks
        self._file: Iterator[bytes] | None = None
        """The chunks of a `DiffFile` being read here, before the rest of `_chunks`."""
        self._pending = b""
        self._offset = 0

    def readable(self) -> bool:
        return True

    def _next(self) -> bytes | None:
        """The next chunk of bytes (a `DiffFile`'s read here), or None at the end."""
        while True:
            if self._file is not None:
                data = next(self._file, None)
                if data is not None:
                    return data
                self._file = None
            chunk = next(self._chunks, None)
            if type(chunk) is not DiffFile:
                return chunk  # type: ignore[return-value]
            self._file = iter(chunk.chunks())

    def take_reference(self, size: int) -> DiffFile | None:
        """The `DiffFile` of the next `size` bytes, when they are one file's whole content
        and nothing of it was read; None (nothing consumed) otherwise."""
        if self._offset != len(self._pending) or self._file is not None:
            return None
        chunk = next(self._chunks, None)
        if isinstance(chunk, DiffFile):
            if chunk.size == size:
                self._pending, self._offset = b"", 0
                return chunk
            self._file = iter(chunk.chunks())
            return None
        if chunk is not None:
            self._pending, self._offset = chunk, 0
        return None

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            rest = [self._pending[self._offset:]]
            while (chunk := self._next()) is not None:
                rest.append(chunk)
            self._pending, self._offset = b"", 0
            return b"".join(rest)
        while self._offset == len(self._pending):
            chunk = self._next()
            if chunk is None:
                return b""
            self._pending, self._offset = chunk, 0
        if not self._offset and size >= len(self._pending):
            data, self._pending = self._pending, b""
            return data
        data = self._pending[self._offset:self._offset + size]
        self._offset += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def _rebuilt(chunks: Iterator[bytes | DiffFile]) -> Iterator[BinaryIO]:
    """The layer tar `chunks` as a stream; on a normal exit the rest is read, so the checks
    the rebuild makes as it goes (each file's CRC-64) cover the whole layer."""
    stream = _ChunkStream(chunks)
    yield cast(BinaryIO, stream)
    while stream.read(CHUNK):
        pass


def _storage_layer(stores: Sequence[_Store], preferred: _Store, index: int,
                   record: podmanstore.LayerRecord, manifest: oci.Manifest,
                   ids: Sequence[str]) -> Layer:
    layer_id = record.id
    diff_id = record.diff_digest or (ids[index] if index < len(ids) else "")
    size = record.diff_size
    if len(manifest.layers) == len(ids) and index < len(manifest.layers):
        descriptor = manifest.layers[index]
        digest, media_type, blob_size = descriptor.digest, descriptor.media_type, descriptor.size
    else:
        digest, media_type, blob_size = diff_id, oci.OCI_LAYER, size
    store = _layer_store(stores, preferred, layer_id)
    describe = layer_name(index, diff_id)

    def open_layer() -> AbstractContextManager[BinaryIO]:
        chunks: Iterator[bytes | DiffFile]
        tar_split = store.tar_split(layer_id)
        diff = store.diff_dir(layer_id)
        if not diff.is_dir():
            raise SourceError(f"{describe}: the layer's files ({diff}) are missing")
        squash = _squash_file(store, layer_id)
        if squash is not None and tar_split.exists():
            # A squash store's layer: its files are in the squash file, whether or not it is
            # mounted on diff (squashstore.storelayer).
            chunks = tar_from_squash(tar_split, squash, describe)
        elif tar_split.exists():
            # Trust containers/storage's records, as podman does: the rebuilt tar is checked
            # file by file against tar-split's CRC-64s, not hashed again as a whole.
            chunks = tar_parts_from_tar_split(tar_split, diff, describe)
        else:
            if store.driver != "overlay":
                raise SourceError(f"{describe}: the layer has no tar-split, and a "
                                  f"{store.driver} layer directory is not a diff")
            if size > 2 * 512 and _is_empty_dir(diff):
                raise SourceError(f"{describe}: the layer has no tar-split and its files "
                                  f"({diff}) are not there (an unmounted additional store?)")
            chunks = tar_from_diff_dir(diff, describe)
        return _rebuilt(iter(chunks))

    return Layer(index, diff_id, digest, media_type, blob_size, open_layer)
