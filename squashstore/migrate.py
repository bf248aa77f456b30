"""migrate: one source image into the squash store, as one squash file and one layer.

Orchestrates the pieces: skip the work when the same source was already migrated with the
same squash options (only its names are added); otherwise squash the image into the writer's
staging directory outside every lock (`squashstore.flatten.squash_image`), derive the new
one-layer config (keeping Env, Entrypoint, Cmd, WorkingDir, User, Labels, ExposedPorts,
Volumes, StopSignal and the history, with ``rootfs.diff_ids`` = the flattened tree's digest)
and manifest, publish them, and leave the image mounted. The config is a pure function of
the source config and the layer digest, so migrating again gives the same image id.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from squashstore.image import Image, SourceError
from squashstore.mounts import Registry
from squashstore.store import Publication, Store, StoreImage, now_rfc3339, sha256_hex

KEPT_CONFIG = ("User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir",
               "Labels", "StopSignal")
KEPT_TOP = ("architecture", "os", "os.version", "os.features", "variant", "author", "created")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


class SquashedLayer(Protocol):
    """What a squasher returns (`squashstore.flatten.SquashResult` has these fields)."""

    @property
    def path(self) -> Path: ...
    @property
    def diff_digest(self) -> str: ...
    @property
    def diff_size(self) -> int: ...
    @property
    def tar_split(self) -> Path | None: ...


Squasher = Callable[[Image, Path, Any, Path], SquashedLayer]
"""(image, dest squash file, options, tar-split path) -> the squashed layer."""


def flatten_squasher(image: Image, dest: Path, options: Any, tar_split: Path,
                     progress: bool = False) -> SquashedLayer:
    from squashstore.flatten import squash_image

    return squash_image(image, dest, options, tar_split=tar_split, progress=progress)


def options_json(options: Any) -> dict[str, Any]:
    """Squash options as the JSON the store records (and compares on re-migration)."""
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        raw = dataclasses.asdict(options)
    elif isinstance(options, dict):
        raw = dict(options)
    else:
        raw = dict(vars(options))
    raw.pop("jobs", None)  # how fast it was written does not change the squash file
    return json.loads(json.dumps(raw, default=str, sort_keys=True))  # type: ignore[no-any-return]


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def rfc3339(value: object) -> str | None:
    """`value` when it is a valid RFC 3339 time (what podman parses), else None."""
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        return None
    try:
        datetime.fromisoformat(value.upper())
    except ValueError:
        return None
    return value


def _object(source: dict[str, Any], key: str) -> dict[str, Any]:
    value = source.get(key) or {}
    if not isinstance(value, dict):
        raise SourceError(f"image config: {key!r} is not a JSON object")
    return value


def squashed_config(source: dict[str, Any], diff_digest: str) -> bytes:
    """The one-layer image config: the source's run settings and history, one diff id.

    Only well-formed values are carried over: podman refuses a whole store whose records
    hold a time it cannot parse.
    """
    config = {k: source[k] for k in KEPT_TOP if k in source}
    if rfc3339(source.get("created")) is None:
        config.pop("created", None)
    run = _object(source, "config")
    config["config"] = {k: run[k] for k in KEPT_CONFIG if run.get(k) is not None}
    history = [{**h, "empty_layer": True} for h in source.get("history") or []
               if isinstance(h, dict)]
    layers = len(_object(source, "rootfs").get("diff_ids") or [])
    entry: dict[str, Any] = {
        "created_by": f"squashstore migrate: {layers} layer(s) squashed into one",
        "comment": "squashstore",
    }
    if rfc3339(source.get("created")):
        entry["created"] = source["created"]
    config["history"] = [*history, entry]
    config["rootfs"] = {"type": "layers", "diff_ids": [diff_digest]}
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def squashed_manifest(config: bytes, diff_digest: str, diff_size: int) -> bytes:
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + sha256_hex(config),
                   "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": diff_digest, "size": diff_size}],
    }
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def publication(image: Image, layer: SquashedLayer, options: dict[str, Any],
                stats: dict[str, Any]) -> Publication:
    source = image.config_json
    config = squashed_config(source, layer.diff_digest)
    manifest = squashed_manifest(config, layer.diff_digest, layer.diff_size)
    created = rfc3339(source.get("created")) or now_rfc3339()
    return Publication(
        squash=layer.path, diff_digest=layer.diff_digest, diff_size=layer.diff_size,
        config=config, manifest=manifest, names=image.names, created=created,
        tar_split=layer.tar_split if layer.tar_split and layer.tar_split.exists() else None,
        layer_metadata={"options": options, "diff_digest": layer.diff_digest,
                        "diff_size": layer.diff_size},
        image_metadata={
            "source": {"reference": image.reference, "names": list(image.names),
                       "digest": image.manifest_digest, "config_digest": image.config_digest,
                       "id": image.source_id or image.config_digest.removeprefix("sha256:"),
                       "layers": len(image.layers)},
            "migrated": now_rfc3339(), "stats": stats})


def _stats(layer: SquashedLayer) -> dict[str, Any]:
    return {k: getattr(layer, k) for k in ("files", "bytes_in", "bytes_out", "seconds")
            if hasattr(layer, k)}


def migrate_image(store: Store, image: Image, options: Any, *, mount: bool = True,
                  backend: str | None = None, registry: Registry | None = None,
                  squasher: Squasher | None = None, progress: bool = False) -> StoreImage:
    """Squash ``image`` into ``store`` (or only add its names if already there); mount it."""
    store.init()
    registry = registry or Registry()
    recorded = options_json(options)
    existing = store.find_by_source(image.config_digest, image.manifest_digest, recorded)
    if existing is not None:
        result = store.add_names(existing.id, image.names) if image.names else existing
    else:
        with store.staging() as stage:
            squash = squasher or functools.partial(flatten_squasher, progress=progress)
            layer = squash(image, stage / "layer.sqfs", options, stage / "layer.tar-split.gz")
            pub = publication(image, layer, recorded, _stats(layer))
            result = store.publish(pub, unmount=registry.umount)
    if mount:
        registry.ensure_mounted(result.id, result.layer, result.squash, result.diff,
                                backend=backend)
    return result
