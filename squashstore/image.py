"""Plain data types for an OCI image read from a source: the image and its layers.

An `Image` is what every transport (`containers-storage:`, `oci:`, `oci-archive:`,
`docker-archive:`, later `docker://`) resolves a reference to: its manifest and config
bytes with their digests, its names and its layers bottom-first. A `Layer` can be opened
any number of times; `Layer.open()` yields the *uncompressed* tar stream and, when the
stream has been read to its end and the context exits normally, checks the digests the
source promised (raising `SourceError` naming the layer on a mismatch). These types hold no
open files; `sources.py` builds them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from squashstore.errors import SquashstoreError as SquashstoreError  # re-exported


class SourceError(SquashstoreError):
    """An image source could not be read: missing, unknown transport, corrupt blob."""


class LayerError(SquashstoreError):
    """A layer's content is invalid (hostile paths, bad hard links, truncated tar)."""


@dataclass(frozen=True)
class Layer:
    """One layer of an image, bottom-first index `index`."""

    index: int
    diff_id: str
    """``sha256:<hex>`` of the uncompressed tar (the config's ``rootfs.diff_ids`` entry)."""
    digest: str
    """The blob digest in the manifest (equals `diff_id` for an uncompressed blob)."""
    media_type: str
    size: int
    """Blob size in bytes as the manifest gives it (-1 when unknown)."""
    opener: Callable[[], AbstractContextManager[BinaryIO]] = field(repr=False, compare=False)
    label: str = ""
    """How errors name this layer, when the source has a better name than its index."""

    def open(self) -> AbstractContextManager[BinaryIO]:
        """The uncompressed tar stream; digests are checked when it is read to the end."""
        return self.opener()

    def describe(self) -> str:
        """How errors name this layer."""
        if self.label:
            return self.label
        return f"layer {self.index}" + (f" ({self.diff_id[:19]})" if self.diff_id else "")


@dataclass(frozen=True)
class Image:
    """An OCI image as a source resolved it."""

    reference: str
    """The reference as the user wrote it, transport included."""
    names: tuple[str, ...]
    """Fully qualified names to carry over (``docker.io/library/alpine:3.19``)."""
    manifest: bytes
    manifest_digest: str
    config: bytes
    config_digest: str
    layers: tuple[Layer, ...]
    """Bottom layer first."""
    source_id: str = ""
    """The source store's own image id, when it has one (hex of the config digest)."""

    @property
    def config_json(self) -> dict[str, Any]:
        value = json.loads(self.config)
        if not isinstance(value, dict):
            raise SourceError(f"{self.reference}: image config is not a JSON object")
        return value
