"""OCI image documents: descriptors, manifests, indexes, configs and the choice of platform.

This module owns the pure parsing and checking of the JSON documents every transport meets
(OCI and Docker schema 2 manifests and indexes/manifest lists, image configs, the
``index.json`` of an OCI layout), choosing an image from an index by reference name and by
platform (the host's by default), and synthesising an OCI manifest for sources that have none
(docker-archive). It does no I/O: transports hand it bytes and a function that fetches a blob.
"""

from __future__ import annotations

import json
import platform as _platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from squashstore.blobs import Compression, check_bytes, digest_bytes, parse_digest
from squashstore.image import SourceError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"

_LAYER_COMPRESSION = {
    OCI_LAYER: Compression.NONE,
    OCI_LAYER + "+gzip": Compression.GZIP,
    OCI_LAYER + "+zstd": Compression.ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": Compression.NONE,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": Compression.GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": Compression.GZIP,
    "application/vnd.docker.image.rootfs.diff.tar.zstd": Compression.ZSTD,
}
_MEDIA_TYPE_OF = {
    Compression.NONE: OCI_LAYER,
    Compression.GZIP: OCI_LAYER + "+gzip",
    Compression.ZSTD: OCI_LAYER + "+zstd",
}


@dataclass(frozen=True)
class Platform:
    """An image platform: ``linux/arm/v7`` is os linux, architecture arm, variant v7."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest or index says about one blob."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, compare=False)
    platform: Platform | None = None


@dataclass(frozen=True)
class Manifest:
    """An image manifest: its config and layer descriptors, bottom layer first."""

    config: Descriptor
    layers: tuple[Descriptor, ...]


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """`data` parsed as a JSON object; `SourceError` naming `what` otherwise."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"{what}: invalid JSON ({exc})") from exc
    except RecursionError:
        raise SourceError(f"{what}: JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise SourceError(f"{what}: not a JSON object")
    return value


def parse_descriptor(value: object, what: str) -> Descriptor:
    """A descriptor from its JSON object."""
    if not isinstance(value, dict):
        raise SourceError(f"{what}: descriptor is not a JSON object")
    digest = value.get("digest")
    media_type = value.get("mediaType", "")
    size = value.get("size", -1)
    if not isinstance(digest, str) or not isinstance(media_type, str):
        raise SourceError(f"{what}: descriptor without a digest or media type")
    if not isinstance(size, int) or isinstance(size, bool):
        raise SourceError(f"{what}: descriptor {digest} has an invalid size")
    parse_digest(digest, what)
    annotations = value.get("annotations") or {}
    if not isinstance(annotations, dict):
        annotations = {}
    return Descriptor(media_type, digest, size,
                      {str(k): str(v) for k, v in annotations.items()},
                      _descriptor_platform(value.get("platform")))


def _descriptor_platform(value: object) -> Platform | None:
    if not isinstance(value, dict):
        return None
    os_name, arch = value.get("os"), value.get("architecture")
    if not isinstance(os_name, str) or not isinstance(arch, str):
        return None
    variant = value.get("variant", "")
    return normalize_platform(Platform(os_name, arch, variant if isinstance(variant, str)
                                       else ""))


def media_type_of(data: bytes, what: str) -> str:
    """The media type a manifest or index document declares (or implies by its fields)."""
    doc = load_json(data, what)
    media_type = doc.get("mediaType")
    if isinstance(media_type, str) and media_type:
        return media_type
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc and "layers" in doc:
        return OCI_MANIFEST
    raise SourceError(f"{what}: neither an image manifest nor an index")


def parse_index(data: bytes, what: str) -> tuple[Descriptor, ...]:
    """The manifest descriptors of an image index (or Docker manifest list)."""
    doc = load_json(data, what)
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise SourceError(f"{what}: index without a manifests list")
    return tuple(parse_descriptor(m, what) for m in manifests)


def parse_manifest(data: bytes, what: str) -> Manifest:
    """An image manifest (OCI or Docker schema 2)."""
    doc = load_json(data, what)
    media_type = doc.get("mediaType", OCI_MANIFEST)
    if media_type in INDEX_TYPES:
        raise SourceError(f"{what}: expected an image manifest, found an index")
    if media_type not in MANIFEST_TYPES:
        raise SourceError(f"{what}: unsupported manifest media type {media_type!r}")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise SourceError(f"{what}: manifest without a layers list")
    return Manifest(parse_descriptor(doc.get("config"), what),
                    tuple(parse_descriptor(layer, what) for layer in layers))


def layer_compression(media_type: str) -> str | None:
    """The compression a layer media type declares; None when it is unknown."""
    return _LAYER_COMPRESSION.get(media_type)


def layer_media_type(compression: str) -> str:
    """The OCI layer media type for a compression."""
    return _MEDIA_TYPE_OF[compression]


def diff_ids(config: bytes, what: str) -> tuple[str, ...]:
    """The config's ``rootfs.diff_ids``, checked for form."""
    doc = load_json(config, what)
    rootfs = doc.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise SourceError(f"{what}: image config without rootfs.diff_ids")
    for diff_id in ids:
        parse_digest(diff_id, what)
    return tuple(ids)


# --- platforms -------------------------------------------------------------------------

_MACHINE_TO_PLATFORM = {
    "x86_64": ("amd64", ""), "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""), "arm64": ("arm64", ""),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv5tel": ("arm", "v5"),
    "i386": ("386", ""), "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", ""),
    "mips64": ("mips64", ""), "loongarch64": ("loong64", ""),
}


def host_platform() -> Platform:
    """The platform of this machine, as OCI indexes name it."""
    machine = _platform.machine().lower()
    arch, variant = _MACHINE_TO_PLATFORM.get(machine, (machine, ""))
    return Platform("linux", arch, variant)


def normalize_platform(value: Platform) -> Platform:
    """Aliases folded as containerd does (``aarch64`` -> ``arm64``, arm64's ``v8`` dropped)."""
    arch, variant = value.architecture.lower(), value.variant.lower()
    arch = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386"}.get(
        arch, arch)
    if arch == "arm64" and variant == "v8":
        variant = ""
    if arch == "arm" and variant in ("", "7", "armv7"):
        variant = "v7"
    return Platform(value.os.lower(), arch, variant)


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]`` (``linux/arm64``, ``linux/arm/v7``) or just ``arch``."""
    parts = text.strip().split("/")
    if len(parts) == 1 and parts[0]:
        parts = ["linux", parts[0]]
    if len(parts) not in (2, 3) or not all(parts):
        raise SourceError(f"invalid platform {text!r} (expected OS/ARCH[/VARIANT], "
                          "e.g. linux/arm64)")
    return normalize_platform(Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else ""))


def choose_platform(manifests: Sequence[Descriptor], wanted: Platform, what: str
                    ) -> Descriptor:
    """The manifest of an index for `wanted`; `SourceError` listing what is there otherwise."""
    wanted = normalize_platform(wanted)
    for descriptor in manifests:
        if descriptor.platform == wanted:
            return descriptor
    present = sorted({str(d.platform) for d in manifests if d.platform is not None})
    listing = ", ".join(present) if present else "none declared"
    raise SourceError(f"{what}: no image for platform {wanted} (present: {listing})")


# --- resolving an index to one manifest --------------------------------------------------

Fetch = Callable[[Descriptor], bytes]
"""Returns the bytes of the blob a descriptor names (not yet verified)."""


def fetch_verified(fetch: Fetch, descriptor: Descriptor, what: str) -> bytes:
    """The blob's bytes, checked against the descriptor's digest and size."""
    data = fetch(descriptor)
    check_bytes(data, descriptor.digest, f"{what}: {descriptor.digest}")
    if descriptor.size >= 0 and len(data) != descriptor.size:
        raise SourceError(f"{what}: {descriptor.digest} is {len(data)} bytes, descriptor "
                          f"says {descriptor.size}")
    return data


def resolve_manifest(fetch: Fetch, top: Descriptor, wanted: Platform | None, what: str,
                     depth: int = 0) -> tuple[bytes, Descriptor]:
    """Follow `top` through indexes to one image manifest: ``(manifest bytes, descriptor)``."""
    if depth > 4:
        raise SourceError(f"{what}: indexes nested too deeply")
    data = fetch_verified(fetch, top, what)
    media_type = top.media_type or media_type_of(data, what)
    if media_type in INDEX_TYPES or (media_type not in MANIFEST_TYPES
                                     and media_type_of(data, what) in INDEX_TYPES):
        chosen = choose_platform(parse_index(data, what), wanted or host_platform(), what)
        return resolve_manifest(fetch, chosen, wanted, what, depth + 1)
    return data, top


def select_from_index(manifests: Sequence[Descriptor], tag: str, wanted: Platform | None,
                      what: str) -> Descriptor:
    """The entry of a layout's ``index.json`` named `tag` (its ref.name annotation).

    Without a tag the index must hold one image, or several for different platforms.
    """
    if tag:
        candidates = [m for m in manifests if m.annotations.get(REF_NAME) == tag]
        if not candidates:
            names = sorted({m.annotations.get(REF_NAME, "") for m in manifests} - {""})
            listing = ", ".join(names) if names else "none"
            raise SourceError(f"{what}: no image tagged {tag!r} (tags present: {listing})")
    else:
        candidates = list(manifests)
    if not candidates:
        raise SourceError(f"{what}: the index lists no images")
    if len(candidates) == 1:
        return candidates[0]
    if all(c.platform is not None for c in candidates):
        return choose_platform(candidates, wanted or host_platform(), what)
    names = sorted({m.annotations.get(REF_NAME, m.digest) for m in candidates})
    raise SourceError(f"{what}: holds several images, choose one with :TAG "
                      f"({', '.join(names)})")


def synthesize_manifest(config: bytes, layers: Sequence[Descriptor]) -> bytes:
    """An OCI image manifest for a config and layer descriptors (docker-archive has none)."""
    def entry(d: Descriptor) -> dict[str, Any]:
        return {"mediaType": d.media_type, "digest": d.digest, "size": d.size}

    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest_bytes(config),
                   "size": len(config)},
        "layers": [entry(d) for d in layers],
    }
    return json.dumps(doc, separators=(",", ":")).encode()
