"""Image sources: a SOURCE reference in skopeo's transport syntax resolved to an `Image`.

This module owns the public entry of image reading, `open_image(reference, platform)`, and
the parsing of references (`parse_reference`): ``containers-storage:NAME`` (the default when
no transport is written; the local podman store, read in place through its tar-splits),
``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]`` (members read in place with tarfile, never
extracted: that reads the archive *file*, whose members are blobs; the layer blobs
themselves are read only by `squashstore.tar.reader`, as podman reads them) and
``docker-archive:FILE[:NAME|:@N]``, and ``docker://`` (`squashstore.registry`). Image names
are `squashstore.names`' (``alpine`` -> ``docker.io/library/alpine:latest``). The
documents are parsed by `oci`, blobs verified by `blobs`, local layers rebuilt by `tar.split`
and the local store found by `podmanconf`.

Each transport's reading is its own module of `squashstore.transports` (one per transport,
as containers/image has them); `open_image` is the one dispatch to them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from squashstore import names, oci, runtime
from squashstore.image import Image, SourceError
from squashstore.registry.options import RegistryOptions

CONTAINERS_STORAGE = "containers-storage"
OCI_DIR = "oci"
OCI_ARCHIVE = "oci-archive"
DOCKER_ARCHIVE = "docker-archive"
DOCKER = "docker"
TRANSPORTS = (CONTAINERS_STORAGE, OCI_DIR, OCI_ARCHIVE, DOCKER_ARCHIVE, DOCKER)
_OTHER_SKOPEO_TRANSPORTS = ("dir", "docker-daemon", "ostree", "sif", "tarball", "atomic")
_TRANSPORT_TOKEN = re.compile(r"[a-z][a-z0-9-]*")


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
    if names.TAG.fullmatch(rest.partition("@")[0]):
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


def reads_local_podman(reference: str) -> bool:
    """Whether `reference` reads the local podman's own storage (``containers-storage:``,
    the default transport): such a command belongs in rootless podman's namespace, and
    ``--rm-source`` removes the image with podman. False for a reference that does not parse
    (its command reports that)."""
    try:
        return parse_reference(reference).transport == CONTAINERS_STORAGE
    except SourceError:
        return False


def remove_from_podman(reference: str) -> None:
    """``podman rmi`` the image `reference` names when it is in the local podman's storage
    (``--rm-source`` of migrate); nothing for the file transports."""
    if not reads_local_podman(reference):
        return
    ref = parse_reference(reference)
    runtime.podman("rmi", f"[{ref.path}]{ref.name}" if ref.path else ref.name)


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
    from squashstore.transports import containers_storage, docker_archive, oci_layout
    from squashstore.transports.common import ArchiveFiles, DirFiles

    ref = parse_reference(reference)
    if ref.transport == DOCKER:
        from squashstore.registry.docker import open_docker

        return open_docker(ref.text, platform, registry)
    wanted = oci.parse_platform(platform) if platform else None
    if ref.transport == CONTAINERS_STORAGE:
        return containers_storage.open_containers_storage(ref)
    if ref.transport == OCI_DIR:
        return oci_layout.open_layout(DirFiles(Path(ref.path), ref.text), ref, wanted)
    if ref.transport == OCI_ARCHIVE:
        return oci_layout.open_layout(ArchiveFiles(Path(ref.path), ref.text), ref, wanted)
    return docker_archive.open_docker_archive(ArchiveFiles(Path(ref.path), ref.text), ref)
