"""`pull --lazy`: install a squashstore artifact into a store before its squash file is here.

`install_lazy` does what `squashstore.registry.artifact.install` does (config checked
against its digest and the layer's diff id, the per-layer pull lock, the same publication,
so the image id is the pusher's) except for the squash file: instead of downloading it, it
stages a sparse file of its size, fetches the superblock and every metadata table into it
with Range requests, records where the rest lives (the lazy marker, and ``lazy`` in the
image's metadata), and publishes. The image is listed and runnable at once; the FUSE
server fetches the rest as it is read. `complete` (any later ``pull REF``) finishes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from squashstore import oci
from squashstore.blobs import check_bytes
from squashstore.image import SourceError
from squashstore.lazy import image as lazy_image
from squashstore.lazy import paths as lazy_paths
from squashstore.lazy.chunkdigests import ChunkDigests
from squashstore.lazy.ranges import Span
from squashstore.lazy.remote import client_source, remote_for
from squashstore.publish import STAGED_SQUASH, STAGED_TAR_SPLIT
from squashstore.registry import artifact
from squashstore.registry.client import Client, RegistryOptions
from squashstore.store import Store, Unmounter, sha256_hex


def install_lazy(store: Store, parsed: artifact.Artifact, config: bytes, client: Client,
                 repository: str, options: RegistryOptions, names: tuple[str, ...],
                 reference: str, manifest_digest: str, unmount: Unmounter,
                 prefetch: Sequence[Span] = (),
                 digests: ChunkDigests | None = None) -> artifact.Installed:
    """Install `parsed` lazily; `downloaded` counts the metadata, the `prefetch` spans (a
    start-up prefetch list, fetched in bulk before the image is published) and the
    tar-split fetched. With `digests` (the artifact's chunk digests, checked to be of its
    squash file) every chunk fetched, now and later, is checked before it is cached."""
    what = reference
    lazy_image.check_size(parsed.squash.size, what)
    check_bytes(config, parsed.config.digest, f"{what}: config")
    diff_ids = oci.diff_ids(config, f"{what}: config")
    if len(diff_ids) != 1 or diff_ids[0] != parsed.diff_id or \
            not parsed.diff_id.startswith("sha256:"):
        raise SourceError(f"{what}: the config's diff_ids do not match the squashfs layer's "
                          f"{artifact.DIFF_ID} annotation")
    if parsed.tar_split is None:
        raise SourceError(f"{what}: the artifact has no tar-split: its squash file could "
                          "never be checked against its diff id")
    iid = sha256_hex(config)
    lid = parsed.diff_id.removeprefix("sha256:")
    store.init()
    final = store.squash_file(lid)
    with store.pull_locked(lid):
        present = {i.id: i for i in store.images()}
        published = store.has_layer(lid)  # else a file here is a killed writer's leftover
        if published:
            _refuse_another_lazy_copy(final, parsed, lid, what)
        if iid in present:
            image = store.add_names(iid, names) if names else present[iid]
            return artifact.Installed(image, 0)
        remote = remote_for(client, repository, parsed.squash.digest, parsed.squash.size,
                            reference, options)
        downloaded = 0
        staged_marker = False
        try:
            with store.staging() as stage:
                squash = stage / STAGED_SQUASH
                if not published:
                    source = client_source(client, remote)
                    try:
                        staged_marker = True
                        downloaded += lazy_image.stage(squash, final, remote, source,
                                                       prefetch, digests)
                    finally:
                        source.close()
                split = None
                if parsed.tar_split is not None and (
                        not published or not store.tar_split_file(lid).is_file()):
                    split = stage / STAGED_TAR_SPLIT
                    artifact.download(
                        lambda d: client.open_blob(repository, d.digest, d.size),
                        parsed.tar_split, split, f"{what}: tar-split")
                    downloaded += parsed.tar_split.size
                pub = artifact._publication(parsed, config, squash, split, names, reference,
                                            manifest_digest)
                if staged_marker:
                    pub = dataclasses.replace(
                        pub, image_metadata={**pub.image_metadata, "lazy": asdict(remote)})
                image = store.publish(pub, unmount=unmount)
        except BaseException:
            if staged_marker and not final.is_file():
                # Nothing published: a marker left behind would make a later full copy
                # of this layer look lazy.
                for path in lazy_paths.lazy_files(final):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            raise
    return artifact.Installed(image, downloaded)


def _refuse_another_lazy_copy(final: Path, parsed: artifact.Artifact, lid: str,
                              what: str) -> None:
    """A lazy squash file of this layer already here is a partial cache of what another
    artifact claimed, unchecked until complete: sharing it would run this image from that
    artifact's bytes (a hostile artifact claiming a popular layer's diff id would stand in
    for it in every later lazy pull of that layer). Shared only when it is the same blob."""
    other = artifact.other_lazy_blob(final, parsed.squash.digest)
    if other is None:
        return
    raise SourceError(f"{what}: layer {lid[:12]} is here already, pulled lazily from "
                      f"{other.describe()} and not yet checked against its diff id: pull this "
                      "one without --lazy, or complete that one first (`squashstore pull`)")
