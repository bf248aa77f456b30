"""The ``docker-archive:FILE[:NAME|:@N]`` transport: ``docker save`` / ``podman save`` archives.

This module owns reading a docker-archive in place: its ``manifest.json`` entry chosen by
name or index, the config, the layer members (compression sniffed, digests from the member
names or computed) and a synthesised OCI manifest (the archive has none).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from typing import Any, BinaryIO

from squashstore import oci
from squashstore.blobs import (
    Compression,
    check_bytes,
    digest_bytes,
    sniff_compression,
)
from squashstore.image import Image, SourceError
from squashstore.sources import (
    Reference,
    normalize_name,
)
from squashstore.transports.common import (
    ArchiveFiles,
    blob_layer,
    matching_diff_ids,
)


def open_docker_archive(files: ArchiveFiles, ref: Reference) -> Image:
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
    ids = matching_diff_ids(config, len(layer_names), what)
    descriptors = [_docker_layer_descriptor(files, name, ids[i], what)
                   for i, name in enumerate(layer_names)]
    layers = tuple(
        blob_layer(i, ids[i], d, files.open_raw(layer_names[i]),
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


def _docker_entry(files: ArchiveFiles, ref: Reference) -> dict[str, Any]:
    what = ref.text
    if not files.exists("manifest.json"):
        raise SourceError(f"{what}: not a docker archive (no manifest.json)")
    try:
        entries = json.loads(files.read("manifest.json"))
    except ValueError as exc:
        raise SourceError(f"{what}: manifest.json is not valid JSON ({exc})") from exc
    except RecursionError:
        raise SourceError(f"{what}: manifest.json is nested too deeply") from None
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


def _docker_layer_descriptor(files: ArchiveFiles, name: str, diff_id: str, what: str
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
