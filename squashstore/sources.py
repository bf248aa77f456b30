"""Image sources: a SOURCE reference in skopeo's transport syntax resolved to an `Image`.

This module owns the public entry of image reading, `open_image(reference, platform)`, and
the parsing of references (`parse_reference`): ``containers-storage:NAME`` (the default when
no transport is written; the local podman store, read in place through its tar-splits),
``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]`` (members read in place with tarfile, never
extracted: that reads the archive *file*, whose members are blobs; the layer blobs
themselves are read only by `squashstore.tar.reader`, as podman reads them),
``docker-archive:FILE[:NAME|:@N]`` and ``docker://`` (`squashstore.registry`). Image names
are `squashstore.names`' (``alpine`` -> ``docker.io/library/alpine:latest``). The
documents are parsed by `oci`, blobs verified by `blobs`, local layers rebuilt by `tar.split`
and the local store found by `podmanconf`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from squashstore import names, oci
from squashstore.blobs import (
    Compression,
    Expect,
    IterReader,
    check_bytes,
    digest_bytes,
    open_verified,
    opener,
    sniff_compression,
)
from squashstore.image import Image, Layer, SourceError
from squashstore.podmanconf import StorageConfig, load_storage_config
from squashstore.registry.client import RegistryOptions
from squashstore.storelayer import tar_from_squash
from squashstore.tar.split import tar_from_diff_dir, tar_from_tar_split

CONTAINERS_STORAGE = "containers-storage"
OCI_DIR = "oci"
OCI_ARCHIVE = "oci-archive"
DOCKER_ARCHIVE = "docker-archive"
DOCKER = "docker"
TRANSPORTS = (CONTAINERS_STORAGE, OCI_DIR, OCI_ARCHIVE, DOCKER_ARCHIVE, DOCKER)
_OTHER_SKOPEO_TRANSPORTS = ("dir", "docker-daemon", "ostree", "sif", "tarball", "atomic")
_TRANSPORT_TOKEN = re.compile(r"[a-z][a-z0-9-]*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class Reference:
    """A parsed SOURCE reference."""

    transport: str
    """One of `TRANSPORTS`."""
    path: str
    """The file or directory of a file transport; for containers-storage an explicit store
    ``[driver@graphroot+runroot]`` when one was written, else empty."""
    name: str
    """containers-storage: the image name or id; oci/oci-archive: the TAG; docker-archive:
    the NAME or ``@N``; empty when none was written."""
    text: str
    """The reference as written."""


def parse_reference(text: str) -> Reference:
    """Split a SOURCE into transport, path and name; `SourceError` on an unusable one."""
    if not text.strip():
        raise SourceError("empty image reference")
    if text.startswith("docker://"):
        return Reference(DOCKER, "", text[len("docker://"):], text)
    prefix, sep, rest = text.partition(":")
    if not sep or not _TRANSPORT_TOKEN.fullmatch(prefix) or (
            prefix not in TRANSPORTS + _OTHER_SKOPEO_TRANSPORTS + ("docker",)
            and _looks_like_name_with_colon(rest)):
        return _storage_reference(text, text)
    if prefix == DOCKER:
        raise SourceError(f"{text}: write docker://HOST/REPO[:TAG|@DIGEST]")
    if prefix not in TRANSPORTS:
        raise SourceError(f"{text}: unknown or unsupported transport {prefix!r} "
                          f"(supported: {', '.join(TRANSPORTS)})")
    if prefix == CONTAINERS_STORAGE:
        return _storage_reference(rest, text)
    path, _, name = rest.partition(":")
    if not path:
        raise SourceError(f"{text}: {prefix}: needs a path")
    return Reference(prefix, path, name, text)


def _looks_like_name_with_colon(rest: str) -> bool:
    """After ``word:``, is this a tag (``alpine:3.19``) or a port (``host:5000/x``)?"""
    if _TAG.fullmatch(rest.partition("@")[0]):
        return True
    return re.match(r"[0-9]+/", rest) is not None


def _storage_reference(rest: str, text: str) -> Reference:
    store = ""
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise SourceError(f"{text}: unterminated [store specification]")
        store, rest = rest[1:end], rest[end + 1:]
    if not rest:
        raise SourceError(f"{text}: no image name")
    return Reference(CONTAINERS_STORAGE, store, rest, text)


# --- names --------------------------------------------------------------------------------


def _split_name(text: str) -> names.Name:
    return names.parse(text)


def normalize_name(text: str) -> str:
    """A fully qualified name: ``alpine`` -> ``docker.io/library/alpine:latest``."""
    return names.registry_name(text)


def _candidate_names(text: str) -> list[str]:
    """The fully qualified names a (short) name may mean, in podman's order."""
    return names.local_candidates(text)


# --- public entry -------------------------------------------------------------------------


def open_image(reference: str, platform: str | None = None,
               registry: RegistryOptions | None = None) -> Image:
    """The image `reference` names; `platform` (``linux/arm64``) chooses from a multi-arch
    index (default: this host's platform).

    For ``containers-storage:`` this briefly takes containers/storage's read locks (fcntl
    record locks) on the graph root's and the additional stores' lock files: do not call it
    while this process holds a lock on one of those files, since closing our descriptor
    would release it. `Layer.open` takes no locks. `registry` holds the registry options
    of a ``docker://`` reference.
    """
    ref = parse_reference(reference)
    if ref.transport == DOCKER:
        from squashstore.registry.docker import open_docker

        return open_docker(ref.text, platform, registry)
    wanted = oci.parse_platform(platform) if platform else None
    if ref.transport == CONTAINERS_STORAGE:
        return _open_containers_storage(ref)
    if ref.transport == OCI_DIR:
        return _open_layout(_DirFiles(Path(ref.path), ref.text), ref, wanted)
    if ref.transport == OCI_ARCHIVE:
        return _open_layout(_ArchiveFiles(Path(ref.path), ref.text), ref, wanted)
    return _open_docker_archive(_ArchiveFiles(Path(ref.path), ref.text), ref)


def _never() -> AbstractContextManager[BinaryIO]:
    raise AssertionError("not an opener")


def _layer_name(index: int, diff_id: str) -> str:
    return Layer(index, diff_id, "", "", -1, _never).describe()


def _blob_layer(index: int, diff_id: str, descriptor: oci.Descriptor,
                open_raw: Callable[[], BinaryIO], compression: str | None) -> Layer:
    expect = Expect(_layer_name(index, diff_id), digest=descriptor.digest, diff_id=diff_id,
                    size=descriptor.size, compression=compression)
    return Layer(index, diff_id, descriptor.digest, descriptor.media_type, descriptor.size,
                 opener(open_raw, expect))


# --- files of a layout or archive ---------------------------------------------------------


class _Files:
    """Named files of an OCI layout or an image archive."""

    what: str

    def read(self, name: str) -> bytes:
        with self.open_raw(name)() as f:
            return f.read()

    def open_raw(self, name: str) -> Callable[[], BinaryIO]:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError


def _missing(what: str, name: str) -> SourceError:
    return SourceError(f"{what}: {name} is missing")


class _DirFiles(_Files):
    def __init__(self, root: Path, what: str) -> None:
        self.root, self.what = root, what
        if not root.is_dir():
            raise SourceError(f"{what}: no such directory {root}")

    def _path(self, name: str) -> Path:
        return self.root / _clean_member(name, self.what)

    def open_raw(self, name: str) -> Callable[[], BinaryIO]:
        path = self._path(name)

        def open_file() -> BinaryIO:
            try:
                return path.open("rb")
            except FileNotFoundError:
                raise _missing(self.what, name) from None
        return open_file

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size


def _clean_member(name: str, what: str) -> str:
    clean = posixpath.normpath("/" + name).lstrip("/")
    if not clean or clean.startswith(".."):
        raise SourceError(f"{what}: invalid member name {name!r}")
    return clean


class _Member(io.RawIOBase):
    """One member of a tar archive, read in place through `tarfile.extractfile`."""

    def __init__(self, archive: Path, member: tarfile.TarInfo) -> None:
        super().__init__()
        self._file = archive.open("rb")
        try:
            tar = tarfile.open(fileobj=self._file, mode="r:*")  # noqa: SIM115 (lives with self)
            inner = tar.extractfile(member)
        except (tarfile.TarError, OSError):
            self._file.close()
            raise
        if inner is None:
            self._file.close()
            raise OSError(f"{member.name} is not a regular file")
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
            self._file.close()
        super().close()


class _ArchiveFiles(_Files):
    def __init__(self, archive: Path, what: str) -> None:
        self.archive, self.what = archive, what
        try:
            with tarfile.open(archive, mode="r:*") as tar:
                members = tar.getmembers()
        except FileNotFoundError:
            raise SourceError(f"{what}: no such file {archive}") from None
        except IsADirectoryError:
            raise SourceError(f"{what}: {archive} is a directory, not an archive") from None
        except (tarfile.TarError, EOFError) as exc:
            raise SourceError(f"{what}: {archive} is not a tar archive") from exc
        except OSError as exc:
            raise SourceError(f"{what}: cannot read {archive}: {exc.strerror}") from exc
        self.members = {_clean_member(m.name, what): m for m in members if m.name.strip("./")}

    def member(self, name: str) -> tarfile.TarInfo:
        key = _clean_member(name, self.what)
        for _ in range(16):
            info = self.members.get(key)
            if info is None:
                raise _missing(self.what, name)
            if info.issym():
                key = _clean_member(posixpath.join(posixpath.dirname(key), info.linkname),
                                    self.what)
            elif info.islnk():
                key = _clean_member(info.linkname, self.what)
            elif info.isfile():
                return info
            else:
                raise SourceError(f"{self.what}: {name} is not a regular file")
        raise SourceError(f"{self.what}: {name}: too many levels of links")

    def open_raw(self, name: str) -> Callable[[], BinaryIO]:
        info = self.member(name)
        return lambda: io.BufferedReader(_Member(self.archive, info), 1 << 20)

    def exists(self, name: str) -> bool:
        try:
            self.member(name)
        except SourceError:
            return False
        return True

    def size(self, name: str) -> int:
        return self.member(name).size


# --- oci: and oci-archive: -----------------------------------------------------------------


def _blob_path(digest: str) -> str:
    algorithm, _, value = digest.partition(":")
    return f"blobs/{algorithm}/{value}"


def _open_layout(files: _Files, ref: Reference, wanted: oci.Platform | None) -> Image:
    what = ref.text
    if not files.exists("oci-layout"):
        raise SourceError(f"{what}: not an OCI layout (no oci-layout file)")
    layout = oci.load_json(files.read("oci-layout"), f"{what}: oci-layout")
    if not isinstance(layout.get("imageLayoutVersion"), str):
        raise SourceError(f"{what}: oci-layout has no imageLayoutVersion")
    if not files.exists("index.json"):
        raise SourceError(f"{what}: not an OCI layout (no index.json)")
    index = oci.parse_index(files.read("index.json"), f"{what}: index.json")
    top = oci.select_from_index(index, ref.name, wanted, what)

    def fetch(descriptor: oci.Descriptor) -> bytes:
        return files.read(_blob_path(descriptor.digest))

    manifest_bytes, manifest_desc = oci.resolve_manifest(fetch, top, wanted, what)
    manifest = oci.parse_manifest(manifest_bytes, f"{what}: manifest")
    config = oci.fetch_verified(fetch, manifest.config, f"{what}: config")
    ids = _matching_diff_ids(config, len(manifest.layers), what)
    layers = tuple(
        _blob_layer(i, ids[i], d, files.open_raw(_blob_path(d.digest)),
                    oci.layer_compression(d.media_type))
        for i, d in enumerate(manifest.layers))
    return Image(reference=ref.text, names=_layout_names(top), manifest=manifest_bytes,
                 manifest_digest=manifest_desc.digest, config=config,
                 config_digest=manifest.config.digest, layers=layers)


def _matching_diff_ids(config: bytes, count: int, what: str) -> tuple[str, ...]:
    ids = oci.diff_ids(config, f"{what}: config")
    if len(ids) != count:
        raise SourceError(f"{what}: the manifest has {count} layers but the config lists "
                          f"{len(ids)} diff_ids")
    return ids


def _layout_names(top: oci.Descriptor) -> tuple[str, ...]:
    for key in (oci.CONTAINERD_NAME, oci.REF_NAME):
        value = top.annotations.get(key, "")
        if "/" in value or ":" in value:
            with contextlib.suppress(SourceError):
                return (normalize_name(value),)
    return ()


# --- docker-archive: ----------------------------------------------------------------------


def _open_docker_archive(files: _ArchiveFiles, ref: Reference) -> Image:
    what = ref.text
    entry = _docker_entry(files, ref)
    config_name = entry.get("Config")
    layer_names = entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list) or not all(
            isinstance(n, str) for n in layer_names):
        raise SourceError(f"{what}: manifest.json entry without Config or Layers")
    config = files.read(config_name)
    config_digest = digest_bytes(config)
    promised = _digest_in_name(config_name)
    if promised:
        check_bytes(config, promised, f"{what}: config {config_name}")
    ids = _matching_diff_ids(config, len(layer_names), what)
    descriptors = [_docker_layer_descriptor(files, name, ids[i], what)
                   for i, name in enumerate(layer_names)]
    layers = tuple(
        _blob_layer(i, ids[i], d, files.open_raw(layer_names[i]),
                    oci.layer_compression(d.media_type))
        for i, d in enumerate(descriptors))
    manifest = oci.synthesize_manifest(config, descriptors)
    tags = entry.get("RepoTags") or []
    names = tuple(_normalized_or_none(t) for t in tags if isinstance(t, str))
    return Image(reference=ref.text, names=tuple(n for n in names if n), manifest=manifest,
                 manifest_digest=digest_bytes(manifest), config=config,
                 config_digest=config_digest, layers=layers)


def _normalized_or_none(text: str) -> str:
    try:
        return normalize_name(text)
    except SourceError:
        return ""


def _docker_entry(files: _ArchiveFiles, ref: Reference) -> dict[str, Any]:
    what = ref.text
    if not files.exists("manifest.json"):
        raise SourceError(f"{what}: not a docker archive (no manifest.json)")
    try:
        entries = json.loads(files.read("manifest.json"))
    except ValueError as exc:
        raise SourceError(f"{what}: manifest.json is not valid JSON ({exc})") from exc
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) for e in entries):
        raise SourceError(f"{what}: manifest.json lists no images")
    if ref.name.startswith("@"):
        try:
            index = int(ref.name[1:])
            if index < 0:
                raise IndexError(index)
            return dict(entries[index])
        except (ValueError, IndexError):
            raise SourceError(f"{what}: no image {ref.name} in the archive "
                              f"({len(entries)} images)") from None
    if ref.name:
        wanted = normalize_name(ref.name)
        for entry in entries:
            tags = [t for t in entry.get("RepoTags") or [] if isinstance(t, str)]
            if wanted in (_normalized_or_none(t) for t in tags):
                return dict(entry)
        raise SourceError(f"{what}: no image named {ref.name} in the archive")
    if len(entries) > 1:
        tags = [t for e in entries for t in e.get("RepoTags") or []]
        raise SourceError(f"{what}: holds {len(entries)} images, choose one with :NAME or "
                          f":@N ({', '.join(map(str, tags))})")
    return dict(entries[0])


def _digest_in_name(name: str) -> str:
    """The digest a member name carries (``blobs/sha256/<hex>``, ``<hex>.json``), or ''."""
    match = re.fullmatch(r"(?:.*/)?blobs/(sha256|sha512)/([0-9a-f]+)", name)
    if match:
        return f"{match.group(1)}:{match.group(2)}"
    match = re.fullmatch(r"([0-9a-f]{64})\.json", posixpath.basename(name))
    return f"sha256:{match.group(1)}" if match else ""


def _docker_layer_descriptor(files: _ArchiveFiles, name: str, diff_id: str, what: str
                             ) -> oci.Descriptor:
    """A descriptor for a docker-archive layer member: its compression is sniffed; its digest
    is in the name (newer docker), equals the diff_id (uncompressed) or is computed."""
    with files.open_raw(name)() as f:
        try:
            compression = sniff_compression(f.read(8))
        except SourceError as exc:
            raise SourceError(f"{what}: layer {name}: {exc}") from exc
    digest = _digest_in_name(name)
    if not digest and compression == Compression.NONE:
        digest = diff_id
    elif not digest:
        with files.open_raw(name)() as f:
            digest = _hash_stream(f)
    return oci.Descriptor(oci.layer_media_type(compression), digest, files.size(name))


def _hash_stream(f: BinaryIO) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return f"sha256:{h.hexdigest()}"


# --- containers-storage: -----------------------------------------------------------------


@dataclass(frozen=True)
class _Store:
    """One containers/storage image store (the graph root or an additional store)."""

    root: Path
    driver: str

    @property
    def images_dir(self) -> Path:
        return self.root / f"{self.driver}-images"

    @property
    def layers_dir(self) -> Path:
        return self.root / f"{self.driver}-layers"

    def diff_dir(self, layer_id: str) -> Path:
        if self.driver == "vfs":
            return self.root / "vfs" / "dir" / layer_id
        return self.root / self.driver / layer_id / "diff"


@contextlib.contextmanager
def _shared_lock(path: Path) -> Iterator[None]:
    """containers/storage's read lock (an fcntl shared lock) on `path`, when it exists."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _read_locked(store: _Store) -> Iterator[None]:
    # containers/storage takes the layer store's lock before the image store's.
    with _shared_lock(store.layers_dir / "layers.lock"), \
            _shared_lock(store.images_dir / "images.lock"):
        yield


def _load_records(path: Path, what: str) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise SourceError(f"{what}: cannot read {path}: {exc.strerror}") from exc
    try:
        records = json.loads(data) if data.strip() else []
    except ValueError as exc:
        raise SourceError(f"{what}: {path} is not valid JSON ({exc})") from exc
    if not isinstance(records, list):
        raise SourceError(f"{what}: {path} is not a JSON array")
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("id"), str)]


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


def _find_image(name: str, candidates: Sequence[tuple[_Store, dict[str, Any]]], what: str,
                where: str) -> tuple[_Store, dict[str, Any]]:
    """The image `name` means, as podman resolves it; `where` lists the stores for errors."""
    text = name.removeprefix("sha256:")
    if len(text) == 64 and _HEX.fullmatch(text):
        for store, record in candidates:
            if record["id"] == text:
                return store, record
    try:
        wanted = _candidate_names(name)
    except SourceError:
        wanted = []
    for full in wanted:
        for store, record in candidates:
            if full in (record.get("names") or []):
                return store, record
    for full in wanted:
        found = _by_digest(full, candidates)
        if found is not None:
            return found
    if _HEX.fullmatch(text):
        matches = [(s, r) for s, r in candidates if r["id"].startswith(text)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise SourceError(f"{what}: image id prefix {text} is ambiguous "
                              f"({len(matches)} images)")
    found = _by_short_name(name, candidates)
    if found is not None:
        return found
    raise SourceError(f"{what}: no such image in the local podman store ({where})")


def _by_short_name(name: str, candidates: Sequence[tuple[_Store, dict[str, Any]]]
                   ) -> tuple[_Store, dict[str, Any]] | None:
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
        if any(isinstance(n, str) and n.endswith(suffix) for n in record.get("names") or []):
            return store, record
    return None


def _by_digest(full: str, candidates: Sequence[tuple[_Store, dict[str, Any]]]
               ) -> tuple[_Store, dict[str, Any]] | None:
    """An image with a name in the same repository and that manifest digest."""
    head, at, digest = full.partition("@")
    if not at:
        return None
    repo = head.rsplit(":", 1)[0] if head.rfind(":") > head.rfind("/") else head
    for store, record in candidates:
        digests = [record.get("digest"), *(record.get("digests") or [])]
        repos = {n.partition("@")[0].rsplit(":", 1)[0] for n in record.get("names") or []}
        if digest in digests and repo in repos:
            return store, record
    return None


def _big_data_file(store: _Store, image_id: str, key: str) -> Path:
    """containers/storage's file name for an image's big-data item `key`."""
    if key and all(c == "." or c.isdigit() or "a" <= c <= "z" for c in key):
        name = key
    else:
        name = "=" + base64.b64encode(key.encode()).decode()
    return store.images_dir / image_id / name


def _read_big_data(store: _Store, image_id: str, key: str) -> bytes | None:
    for path in (_big_data_file(store, image_id, key),
                 store.images_dir / image_id / ("=" + base64.b64encode(key.encode()).decode())):
        try:
            return path.read_bytes()
        except FileNotFoundError:
            continue
    return None


def _storage_manifest(store: _Store, record: dict[str, Any], what: str) -> bytes:
    image_id = record["id"]
    keys: list[str] = []
    if isinstance(record.get("digest"), str):
        keys.append("manifest-" + record["digest"])
    keys.append("manifest")
    keys += [k for k in record.get("big-data-names") or []
             if isinstance(k, str) and k.startswith("manifest-") and k not in keys]
    for key in keys:
        data = _read_big_data(store, image_id, key)
        if data is None:
            continue
        with contextlib.suppress(SourceError):
            if oci.media_type_of(data, what) in oci.MANIFEST_TYPES:
                return data
    raise SourceError(f"{what}: image {image_id[:12]} has no OCI or Docker schema 2 manifest")


def _layer_chain(top: str, records: dict[str, dict[str, Any]], what: str
                 ) -> list[dict[str, Any]]:
    chain: list[dict[str, Any]] = []
    current: str | None = top
    while current:
        record = records.get(current)
        if record is None:
            raise SourceError(f"{what}: layer {current[:12]} is missing from the store")
        chain.append(record)
        if len(chain) > 1000:
            raise SourceError(f"{what}: layer chain is too long (a loop?)")
        parent = record.get("parent")
        current = parent if isinstance(parent, str) else None
    chain.reverse()
    return chain


def _open_containers_storage(ref: Reference) -> Image:
    what = ref.text if ref.text.startswith(CONTAINERS_STORAGE) else \
        f"{CONTAINERS_STORAGE}:{ref.text}"
    stores, _ = _stores(ref)
    candidates: list[tuple[_Store, dict[str, Any]]] = []
    for store in stores:
        with _read_locked(store):
            candidates += [(store, r) for r in
                           _load_records(store.images_dir / "images.json", what)]
    where = ", ".join(str(s.root) for s in stores)
    store, record = _find_image(ref.name, candidates, what, where)
    _check_driver(store, what)
    with _read_locked(store):
        layers = {r["id"]: r for s in [store, *stores] for r in
                  _load_records(s.layers_dir / "layers.json", what)}
        manifest_bytes = _storage_manifest(store, record, what)
        manifest = oci.parse_manifest(manifest_bytes, f"{what}: manifest")
        config = _read_big_data(store, record["id"], manifest.config.digest)
    if config is None:
        raise SourceError(f"{what}: the config {manifest.config.digest} is missing from the "
                          "store")
    check_bytes(config, manifest.config.digest, f"{what}: config")
    top = record.get("layer")
    chain = _layer_chain(top, layers, what) if isinstance(top, str) and top else []
    ids = oci.diff_ids(config, f"{what}: config")
    built = tuple(_storage_layer(stores, store, i, r, manifest, ids)
                  for i, r in enumerate(chain))
    names = tuple(n for n in record.get("names") or [] if isinstance(n, str))
    return Image(reference=ref.text, names=names, manifest=manifest_bytes,
                 manifest_digest=digest_bytes(manifest_bytes), config=config,
                 config_digest=manifest.config.digest, layers=built, source_id=record["id"])


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
        if (store.layers_dir / f"{layer_id}.tar-split.gz").exists() or \
                store.diff_dir(layer_id).is_dir():
            return store
    return preferred


def _storage_layer(stores: Sequence[_Store], preferred: _Store, index: int,
                   record: dict[str, Any], manifest: oci.Manifest, ids: Sequence[str]) -> Layer:
    layer_id: str = record["id"]
    recorded = record.get("diff-digest")
    diff_id = recorded if isinstance(recorded, str) and recorded else (
        ids[index] if index < len(ids) else "")
    size = record.get("diff-size", -1)
    size = size if isinstance(size, int) else -1
    if len(manifest.layers) == len(ids) and index < len(manifest.layers):
        descriptor = manifest.layers[index]
        digest, media_type, blob_size = descriptor.digest, descriptor.media_type, descriptor.size
    else:
        digest, media_type, blob_size = diff_id, oci.OCI_LAYER, size
    store = _layer_store(stores, preferred, layer_id)
    describe = _layer_name(index, diff_id)

    def open_layer() -> AbstractContextManager[BinaryIO]:
        tar_split = store.layers_dir / f"{layer_id}.tar-split.gz"
        diff = store.diff_dir(layer_id)
        if not diff.is_dir():
            raise SourceError(f"{describe}: the layer's files ({diff}) are missing")
        squash = _squash_file(store, layer_id)
        if squash is not None and tar_split.exists():
            # A squash store's layer: its files are in the squash file, whether or not it is
            # mounted on diff (squashstore.storelayer).
            chunks = tar_from_squash(tar_split, squash, describe)
            expect = Expect(describe, compression=Compression.NONE)
        elif tar_split.exists():
            # Trust containers/storage's records, as podman does: the rebuilt tar is checked
            # file by file against tar-split's CRC-64s, not hashed again as a whole.
            chunks = tar_from_tar_split(tar_split, diff, describe)
            expect = Expect(describe, compression=Compression.NONE)
        else:
            if store.driver != "overlay":
                raise SourceError(f"{describe}: the layer has no tar-split, and a "
                                  f"{store.driver} layer directory is not a diff")
            if size > 2 * 512 and _is_empty_dir(diff):
                raise SourceError(f"{describe}: the layer has no tar-split and its files "
                                  f"({diff}) are not there (an unmounted additional store?)")
            chunks = tar_from_diff_dir(diff, describe)
            expect = Expect(describe, compression=Compression.NONE)
        return open_verified(io.BufferedReader(IterReader(chunks), 1 << 20), expect)

    return Layer(index, diff_id, digest, media_type, blob_size, open_layer)
