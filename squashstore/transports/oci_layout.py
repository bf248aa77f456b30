"""The ``oci:DIR[:TAG]`` and ``oci-archive:FILE[:TAG]`` transports: an OCI image layout.

This module owns reading an OCI image layout, from a directory or from a tar archive read in
place: ``index.json``, the image chosen by tag and platform (`oci`), its manifest, config and
layer blobs, and the names its annotations give it.
"""

from __future__ import annotations

import contextlib

from squashstore import oci
from squashstore.image import Image, SourceError
from squashstore.sources import (
    Reference,
    normalize_name,
)
from squashstore.transports.common import (
    Files,
    blob_layer,
    blob_path,
    matching_diff_ids,
)


def open_layout(files: Files, ref: Reference, wanted: oci.Platform | None) -> Image:
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
        return files.read(blob_path(descriptor.digest))

    manifest_bytes, manifest_desc = oci.resolve_manifest(fetch, top, wanted, what)
    manifest = oci.parse_manifest(manifest_bytes, f"{what}: manifest")
    config = oci.fetch_verified(fetch, manifest.config, f"{what}: config")
    ids = matching_diff_ids(config, len(manifest.layers), what)
    layers = tuple(
        blob_layer(i, ids[i], d, files.open_raw(blob_path(d.digest)),
                    oci.layer_compression(d.media_type))
        for i, d in enumerate(manifest.layers))
    return Image(reference=ref.text, names=_layout_names(top), manifest=manifest_bytes,
                 manifest_digest=manifest_desc.digest, config=config,
                 config_digest=manifest.config.digest, layers=layers)


def _layout_names(top: oci.Descriptor) -> tuple[str, ...]:
    for key in (oci.CONTAINERD_NAME, oci.REF_NAME):
        value = top.annotations.get(key, "")
        if "/" in value or ":" in value:
            with contextlib.suppress(SourceError):
                return (normalize_name(value),)
    return ()
