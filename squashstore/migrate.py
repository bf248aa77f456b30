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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from squashstore import oci
from squashstore.image import Image
from squashstore.imageconfig import ConfigError, carried_config, config_problems, is_go_time, load
from squashstore.mounts import Registry
from squashstore.publish import STAGED_SQUASH, STAGED_TAR_SPLIT
from squashstore.store import (
    Publication,
    Store,
    StoreError,
    StoreImage,
    normalize_name,
    now_rfc3339,
    sha256_hex,
)


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


def rfc3339(value: object) -> str | None:
    """`value` when it is a time podman parses (RFC 3339), else None."""
    return value if isinstance(value, str) and is_go_time(value) else None


def squashed_config_checked(source: dict[str, Any], diff_digest: str
                            ) -> tuple[bytes, tuple[str, ...]]:
    """The one-layer image config and what was dropped from the source's (one line each).

    Every carried field is checked as podman will read it (`squashstore.imageconfig`): a
    value podman cannot read either refuses the image (`ConfigError`) or is dropped.
    """
    carried = carried_config(source)
    config: dict[str, Any] = dict(carried.top)
    config["config"] = carried.config
    history = [{**h, "empty_layer": True} for h in carried.history]
    rootfs = source.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    layers = len(ids) if isinstance(ids, list) else 0
    entry: dict[str, Any] = {
        "created_by": f"squashstore migrate: {layers} layer(s) squashed into one",
        "comment": "squashstore",
    }
    if "created" in carried.top:
        entry["created"] = carried.top["created"]
    config["history"] = [*history, entry]
    config["rootfs"] = {"type": "layers", "diff_ids": [diff_digest]}
    unreadable = config_problems(config)
    if unreadable:  # never expected: carried_config keeps only readable values
        raise ConfigError(f"image config: {unreadable[0]}")
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode(), carried.dropped


def squashed_config(source: dict[str, Any], diff_digest: str) -> bytes:
    """The one-layer image config: the source's run settings and history, one diff id."""
    return squashed_config_checked(source, diff_digest)[0]


def squashed_manifest(config: bytes, diff_digest: str, diff_size: int) -> bytes:
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": "sha256:" + sha256_hex(config),
                   "size": len(config)},
        "layers": [{"mediaType": oci.OCI_LAYER, "digest": diff_digest, "size": diff_size}],
    }
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def source_config(image: Image) -> dict[str, Any]:
    """The source's config as a JSON object (one line on any error, deep nesting included)."""
    value = load(image.config, f"{image.reference}: image config")
    if not isinstance(value, dict):
        raise ConfigError(f"{image.reference}: image config is not a JSON object")
    return value


def podman_names(image: Image) -> tuple[str, ...]:
    """The names podman 4.3.1 gives the image on ``podman pull``: the source's names, else
    for ``oci:PATH[:TAG]`` (whose index names no full reference) ``localhost/PATH:latest``
    with PATH as written, leading slashes stripped: podman drops the tag (measured). When
    that is no valid name (upper case), podman refuses the pull; migrate keeps the image
    unnamed instead, and `gc` never takes an image migrated without a name."""
    if image.names:
        return image.names
    transport, sep, rest = image.reference.partition(":")
    if not sep or transport != "oci":
        return ()
    path = rest.partition(":")[0].lstrip("/")
    try:
        return (normalize_name(f"localhost/{path}:latest"),)
    except StoreError:
        return ()


def publication(image: Image, layer: SquashedLayer, options: dict[str, Any],
                stats: dict[str, Any]) -> Publication:
    source = source_config(image)
    config = squashed_config(source, layer.diff_digest)
    names = podman_names(image)
    manifest = squashed_manifest(config, layer.diff_digest, layer.diff_size)
    created = rfc3339(source.get("created")) or now_rfc3339()
    return Publication(
        squash=layer.path, diff_digest=layer.diff_digest, diff_size=layer.diff_size,
        config=config, manifest=manifest, names=names, created=created,
        tar_split=layer.tar_split if layer.tar_split and layer.tar_split.exists() else None,
        layer_metadata={"options": options, "diff_digest": layer.diff_digest,
                        "diff_size": layer.diff_size},
        image_metadata={
            "source": {"reference": image.reference, "names": list(image.names),
                       "digest": image.manifest_digest, "config_digest": image.config_digest,
                       "id": image.source_id or image.config_digest.removeprefix("sha256:"),
                       "layers": len(image.layers)},
            "migrated": now_rfc3339(), "stats": stats, "named": bool(names)})


def _stats(layer: SquashedLayer) -> dict[str, Any]:
    return {k: getattr(layer, k) for k in ("files", "bytes_in", "bytes_out", "seconds")
            if hasattr(layer, k)}


def own_copy(store: Store, image: Image) -> StoreImage | None:
    """The store's image when `image` is that very image (read from the store itself)."""
    if not image.source_id or image.config_digest != "sha256:" + image.source_id:
        return None
    try:
        found = store.resolve(image.source_id)
    except StoreError:
        return None
    return found if found.id == image.source_id else None


def migrate_image(store: Store, image: Image, options: Any, *, mount: bool = True,
                  backend: str | None = None, registry: Registry | None = None,
                  squasher: Squasher | None = None, progress: bool = False,
                  warn: Callable[[str], None] | None = None) -> StoreImage:
    """Squash ``image`` into ``store`` (or only add its names if already there); mount it.

    The source config is checked before any slow work: a field podman could not read
    refuses the image, or is dropped and reported through `warn`."""
    _config, dropped = squashed_config_checked(source_config(image), "sha256:" + "0" * 64)
    for line in dropped:
        if warn is not None:
            warn(f"warning: {image.reference}: image config: {line}")
    store.init()
    registry = registry or Registry()
    recorded = options_json(options)
    existing = store.find_by_source(image.config_digest, image.manifest_digest, recorded)
    own = own_copy(store, image)
    if own is not None:
        # podman resolved the name to this store's own copy (the store is in storage.conf
        # and the source was removed): nothing to squash.
        existing = own
        if warn is not None:
            warn(f"note: {image.reference}: already in the store as image {own.id[:12]}")
    if existing is not None:
        names = podman_names(image)
        result = store.add_names(existing.id, names) if names else existing
    else:
        with store.staging() as stage:
            squash = squasher or functools.partial(flatten_squasher, progress=progress)
            layer = squash(image, stage / STAGED_SQUASH, options, stage / STAGED_TAR_SPLIT)
            pub = publication(image, layer, recorded, _stats(layer))
            result = store.publish(pub, unmount=registry.umount)
    if mount:
        registry.ensure_mounted(result.id, result.layer, result.squash, result.diff,
                                backend=backend)
    return result
