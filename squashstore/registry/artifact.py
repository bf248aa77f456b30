"""squashstore's own OCI artifact: a store image shipped as is, so a cluster converts once.

The format (docs/artifact-format.md) is an OCI image manifest with ``artifactType``
`ARTIFACT_TYPE` whose config blob is the image's own config (media type `CONFIG_TYPE`, so
no runtime mistakes it for a runnable image; its digest is the image id) and whose layers
are the squash file (`SQUASHFS_TYPE`, annotated with the layer's diff id and size) and,
when the image has one, its gzip'd tar-split (`TAR_SPLIT_TYPE`), start-up prefetch list
(`PREFETCH_TYPE`), and always the squash file's per-chunk digests (`CHUNK_DIGESTS_TYPE`,
which a lazy pull checks every fetched chunk against). `push` uploads them
(chunked, memory flat, blobs the registry has skipped); `install` pulls one into a store
without converting: every blob is hashed while it streams into the writer's staging
directory, a mismatch fails before anything is published, then the same `Store.publish` as
migrate runs with the same config, so the image id is the pusher's. Concurrent installs of
one artifact into a shared store serialise on a per-layer lock file: the first downloads
and publishes, the others find it published.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from squashstore import oci, podmanstore
from squashstore.blobs import HashingReader, check_bytes, digest_bytes
from squashstore.image import SourceError
from squashstore.lazy import chunkdigests, prefetch
from squashstore.lazy import paths as lazy_paths
from squashstore.migrate import rfc3339, squashed_manifest
from squashstore.publish import STAGED_SQUASH, STAGED_TAR_SPLIT
from squashstore.store import (
    Publication,
    Store,
    StoreImage,
    Unmounter,
    now_rfc3339,
    sha256_hex,
)
from squashstore.storelayer import layer_digest

if TYPE_CHECKING:
    from squashstore.lazy.image import Remote

ARTIFACT_TYPE = "application/vnd.squashstore.image.v1"
CONFIG_TYPE = "application/vnd.squashstore.image.config.v1+json"
SQUASHFS_TYPE = "application/vnd.squashstore.image.squashfs.v1"
TAR_SPLIT_TYPE = "application/vnd.squashstore.image.tar-split.v1+gzip"
PREFETCH_TYPE = prefetch.MEDIA_TYPE
CHUNK_DIGESTS_TYPE = chunkdigests.MEDIA_TYPE
TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"
DIFF_ID = "io.squashstore.diff-id"
DIFF_SIZE = "io.squashstore.diff-size"
OPTIONS = "io.squashstore.squash-options"
SOURCE = "io.squashstore.source"
VERSION = "io.squashstore.format-version"
FORMAT_VERSION = "1"
COPY_CHUNK = 1 << 20

Progress = Callable[[int], None]
"""Called with the bytes done so far of the current blob."""


@dataclass(frozen=True)
class Artifact:
    """A parsed squashstore artifact manifest."""

    config: oci.Descriptor
    squash: oci.Descriptor
    tar_split: oci.Descriptor | None
    diff_id: str
    diff_size: int
    annotations: dict[str, str]
    prefetch: oci.Descriptor | None = None
    """The start-up prefetch list (`squashstore.lazy.prefetch`), when the pusher had one."""
    chunk_digests: oci.Descriptor | None = None
    """The squash file's per-chunk digests (`squashstore.lazy.chunkdigests`); None in
    artifacts pushed before they existed."""


def is_artifact(manifest: bytes) -> bool:
    """Whether a manifest is squashstore's artifact (by artifactType or config type)."""
    try:
        doc = json.loads(manifest)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply: not ours
        return False
    if not isinstance(doc, dict):
        return False
    config = doc.get("config")
    return doc.get("artifactType") == ARTIFACT_TYPE or (
        isinstance(config, dict) and config.get("mediaType") == CONFIG_TYPE)


def parse_artifact(manifest: bytes, what: str) -> Artifact:
    doc = oci.load_json(manifest, what)
    config = oci.parse_descriptor(doc.get("config"), f"{what}: config")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise SourceError(f"{what}: artifact without layers")
    parsed = [oci.parse_descriptor(layer, f"{what}: layer") for layer in layers]
    squash = [d for d in parsed if d.media_type == SQUASHFS_TYPE]
    split = [d for d in parsed if d.media_type == TAR_SPLIT_TYPE]
    lists = [d for d in parsed if d.media_type == PREFETCH_TYPE]
    digests = [d for d in parsed if d.media_type == CHUNK_DIGESTS_TYPE]
    if len(squash) != 1 or len(split) > 1 or len(lists) > 1 or len(digests) > 1:
        raise SourceError(f"{what}: a squashstore artifact has one {SQUASHFS_TYPE} layer, "
                          "at most one tar-split, at most one prefetch list and at most one "
                          "chunk digest list")
    for descriptor in (config, *squash, *split, *lists, *digests):
        if descriptor.size < 0:  # unbounded: a lying registry could send without end
            raise SourceError(f"{what}: the manifest gives {descriptor.digest} no size")
    annotations = doc.get("annotations") or {}
    annotations = {str(k): str(v) for k, v in annotations.items()} \
        if isinstance(annotations, dict) else {}
    diff_id = squash[0].annotations.get(DIFF_ID, "")
    size_text = squash[0].annotations.get(DIFF_SIZE, "")
    if not size_text.isdigit() or not size_text.isascii():
        raise SourceError(f"{what}: the squashfs layer has no valid {DIFF_SIZE} annotation "
                          "(a size in bytes)")
    diff_size = int(size_text)
    return Artifact(config, squash[0], split[0] if split else None, diff_id, diff_size,
                    annotations, lists[0] if lists else None,
                    digests[0] if digests else None)


# --------------------------------------------------------------------------- push


def file_digest(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(COPY_CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done)
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class PushPlan:
    """What a push uploads for one store image."""

    config: bytes
    squash: Path
    squash_digest: str
    tar_split: Path | None
    tar_split_digest: str
    manifest: bytes
    prefetch: bytes | None = None
    """The image's start-up prefetch list (`squashstore record`), when it has one."""
    chunk_digests: bytes = b""
    """The squash file's per-chunk digests (`squashstore.lazy.chunkdigests`)."""


def plan_push(store: Store, image: StoreImage, hashing: Progress | None = None) -> PushPlan:
    """The artifact of `image`: its config as podman has it, squash file and tar-split."""
    try:
        config = podmanstore.read_big_data(store.images_dir / image.id,
                                           podmanstore.config_key(image.id))
    except OSError as exc:
        raise SourceError(f"{image.id[:12]}: cannot read the image's config: "
                          f"{exc.strerror}") from exc
    if config is None:
        raise SourceError(f"{image.id[:12]}: the image's config is missing from the store")
    if sha256_hex(config) != image.id:
        raise SourceError(f"{image.id[:12]}: the stored config does not match the image id")
    diff_ids = oci.diff_ids(config, f"{image.id[:12]}: config")
    if len(diff_ids) != 1 or diff_ids[0] != "sha256:" + image.layer:
        raise SourceError(f"{image.id[:12]}: not a one-layer squashstore image")
    listed_chunks = _squash_digests(image.squash, hashing)
    squash_digest = listed_chunks.digest
    chunk_list = listed_chunks.to_bytes()
    split = store.tar_split_file(image.layer)
    tar_split = split if split.is_file() else None
    split_digest = file_digest(tar_split) if tar_split is not None else ""
    squash_meta: dict[str, Any] = image.metadata.get("squash") or {}
    source = image.metadata.get("source") or {}
    title = f"{image.layer[:12]}.sqfs"
    layers: list[dict[str, Any]] = [{
        "mediaType": SQUASHFS_TYPE, "digest": squash_digest,
        "size": image.squash.stat().st_size,
        "annotations": {TITLE: title, DIFF_ID: "sha256:" + image.layer,
                        DIFF_SIZE: str(image.size)}}]
    if tar_split is not None:
        layers.append({"mediaType": TAR_SPLIT_TYPE, "digest": split_digest,
                       "size": tar_split.stat().st_size,
                       "annotations": {TITLE: f"{image.layer[:12]}.tar-split.gz"}})
    listed = prefetch.load(image.squash)
    listing = None
    if listed is not None and (listed.digest, listed.size) == \
            (squash_digest, image.squash.stat().st_size):  # else of an earlier squash file
        listing = listed.to_json()
        layers.append({"mediaType": PREFETCH_TYPE, "digest": digest_bytes(listing),
                       "size": len(listing),
                       "annotations": {TITLE: f"{image.layer[:12]}.prefetch.json"}})
    layers.append({"mediaType": CHUNK_DIGESTS_TYPE, "digest": digest_bytes(chunk_list),
                   "size": len(chunk_list),
                   "annotations": {TITLE: f"{image.layer[:12]}.chunk-digests"}})
    annotations = {VERSION: FORMAT_VERSION,
                   OPTIONS: json.dumps(squash_meta.get("options") or {}, sort_keys=True),
                   SOURCE: json.dumps(source, sort_keys=True)}
    if rfc3339(image.created):
        annotations[CREATED] = image.created
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": "sha256:" + image.id,
                   "size": len(config)},
        "layers": layers,
        "annotations": annotations,
    }
    return PushPlan(config, image.squash, squash_digest, tar_split, split_digest,
                    json.dumps(manifest, indent=2, sort_keys=True).encode(), listing,
                    chunk_list)


def _squash_digests(path: Path, progress: Progress | None) -> chunkdigests.ChunkDigests:
    """The squash file's digest and per-chunk digests, in one read of it."""
    hasher = chunkdigests.Hasher()
    with path.open("rb") as f:
        while chunk := f.read(COPY_CHUNK):
            hasher.update(chunk)
            if progress is not None:
                progress(hasher.size)
    return hasher.result()


# --------------------------------------------------------------------------- pull


BlobOpener = Callable[[oci.Descriptor], BinaryIO]
"""Opens a blob's raw byte stream (a registry `BlobReader`)."""


def download(open_blob: BlobOpener, descriptor: oci.Descriptor, dest: Path, what: str,
             progress: Progress | None = None) -> None:
    """Stream a blob into `dest`, hashing it as it arrives; `SourceError` on a mismatch."""
    algorithm = descriptor.digest.partition(":")[0]
    with open_blob(descriptor) as raw, dest.open("wb") as out:
        reader = HashingReader(raw, (algorithm,))
        while chunk := reader.read(COPY_CHUNK):
            out.write(chunk)
            if progress is not None:
                progress(reader.count)
    if descriptor.size >= 0 and reader.count != descriptor.size:
        raise SourceError(f"{what}: {descriptor.digest} is {reader.count} bytes, expected "
                          f"{descriptor.size} (truncated or corrupt)")
    actual = reader.digest(algorithm)
    if actual != descriptor.digest:
        raise SourceError(f"{what}: blob digest mismatch (expected {descriptor.digest}, got "
                          f"{actual}); nothing was installed")


@dataclass(frozen=True)
class Installed:
    image: StoreImage
    downloaded: int
    """Bytes downloaded (0 when the store already had the layer)."""


def install(store: Store, artifact: Artifact, config: bytes, open_blob: BlobOpener,
            names: tuple[str, ...], reference: str, manifest_digest: str,
            unmount: Unmounter, progress: Callable[[str], Progress | None] | None = None
            ) -> Installed:
    """Install a verified artifact into `store`; concurrent installs download once."""
    what = reference
    check_bytes(config, artifact.config.digest, f"{what}: config")
    diff_ids = oci.diff_ids(config, f"{what}: config")
    if len(diff_ids) != 1 or diff_ids[0] != artifact.diff_id:
        raise SourceError(f"{what}: the config's diff_ids do not match the squashfs layer's "
                          f"{DIFF_ID} annotation")
    if not artifact.diff_id.startswith("sha256:"):
        raise SourceError(f"{what}: unsupported diff id {artifact.diff_id!r}")
    iid = sha256_hex(config)
    lid = artifact.diff_id.removeprefix("sha256:")
    store.init()
    with store.pull_locked(lid):
        present = {i.id: i for i in store.images()}
        # An image of this id whose squash file is a lazy copy of another blob stands on
        # what another artifact claimed, unchecked: installed over, not shared.
        if iid in present and other_lazy_blob(store.squash_file(lid),
                                               artifact.squash.digest) is None:
            image = store.add_names(iid, names) if names else present[iid]
            return Installed(image, 0)
        downloaded = 0
        with store.staging() as stage:
            squash = stage / STAGED_SQUASH
            have = store.squash_file(lid)
            # a lazy one is unchecked; one no layer record names is a killed writer's
            # leftover, which this publish's leftover removal takes away
            fetched = not store.has_layer(lid) or lazy_paths.is_lazy(have)
            if fetched:
                download(open_blob, artifact.squash, squash, f"{what}: squash file",
                         progress("download squash file") if progress else None)
                downloaded += artifact.squash.size
            split: Path | None = None
            # the store's tar-split of a lazy layer is the lazy artifact's claim too
            if artifact.tar_split is not None and (fetched or
                                                   not store.tar_split_file(lid).is_file()):
                split = stage / STAGED_TAR_SPLIT
                download(open_blob, artifact.tar_split, split, f"{what}: tar-split")
                downloaded += artifact.tar_split.size
            if fetched:  # a layer the store has was made or checked by it already
                known = store.tar_split_file(lid)
                check_layer(squash, split or (known if known.is_file() else None), artifact,
                            what)
            pub = _publication(artifact, config, squash, split, names, reference,
                               manifest_digest)
            image = store.publish(pub, unmount=unmount)
    return Installed(image, downloaded)


def other_lazy_blob(squash: Path, digest: str) -> Remote | None:
    """Where the store's squash file `squash` of a layer is lazily pulled from, when it is
    a lazy copy of another blob than `digest` (a partial cache of what another artifact
    claimed, unchecked until complete: never to stand for this artifact's layer); None when
    it is complete (checked when it was installed), absent, or of the same blob."""
    if not lazy_paths.is_lazy(squash):
        return None
    from squashstore.lazy.image import read_marker  # brings requests only for lazy images

    remote = read_marker(squash)
    return remote if remote is not None and remote.digest != digest else None


def check_layer(squash: Path, split: Path | None, artifact: Artifact, what: str) -> None:
    """A downloaded squash file and tar-split hold the layer the artifact claims: the
    canonical tar rebuilt from them has the claimed diff id and size (the layer id the store
    files them under). Without this a hostile artifact could claim another image's layer id
    and have a later ``migrate`` of that image reuse its files; it also refuses a squash
    layer that is not a squash file, or a tar-split that does not match it."""
    if split is None:
        raise SourceError(f"{what}: the artifact has no tar-split: its squash file cannot be "
                          "checked against its diff id")
    digest, size = layer_digest(split, squash, f"{what}: squash file")
    if digest != artifact.diff_id or size != artifact.diff_size:
        raise SourceError(f"{what}: the squash file does not hold the layer it claims "
                          f"({DIFF_ID} {artifact.diff_id[:19]}..., {DIFF_SIZE} "
                          f"{artifact.diff_size}): refused")


def _json_annotation(artifact: Artifact, key: str) -> dict[str, Any]:
    try:
        value = json.loads(artifact.annotations.get(key, "{}"))
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _publication(artifact: Artifact, config: bytes, squash: Path, split: Path | None,
                 names: tuple[str, ...], reference: str, manifest_digest: str) -> Publication:
    source = json.loads(config)
    created = rfc3339(artifact.annotations.get(CREATED)) or rfc3339(source.get("created")) \
        or now_rfc3339()
    return Publication(
        squash=squash, diff_digest=artifact.diff_id, diff_size=artifact.diff_size,
        config=config, manifest=squashed_manifest(config, artifact.diff_id, artifact.diff_size),
        names=names, created=created, tar_split=split,
        layer_metadata={"options": _json_annotation(artifact, OPTIONS),
                        "diff_digest": artifact.diff_id, "diff_size": artifact.diff_size},
        image_metadata={"source": _json_annotation(artifact, SOURCE),
                        "pulled": {"reference": reference, "digest": manifest_digest,
                                   "squash_digest": artifact.squash.digest},
                        "migrated": now_rfc3339(), "stats": {}, "named": bool(names)})


def manifest_digest(manifest: bytes) -> str:
    return digest_bytes(manifest)
