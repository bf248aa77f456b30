"""The image config, manifest and records podman will read, checked as podman reads them.

podman 4.3.1 reads a store's ``images.json`` and ``layers.json`` into containers/storage's ``Image``
and ``Layer`` structs, and every image's config into both the OCI image-spec's ``v1.Image``
and containers/image's Docker ``Schema2Image``, all with Go's ``encoding/json``: one value of
the wrong JSON type anywhere (``"Cmd": "x"`` where ``[]string`` is expected, a time that is
not RFC 3339) makes the whole unmarshal fail, and with it every ``podman images`` of every
user whose storage.conf lists the store. This module owns those Go types, written down as
data (`GoType`), and `problems`, which emulates ``encoding/json`` on them: ``null`` fits
every type, unknown keys are ignored, keys match field names case-insensitively (Go's
``EqualFold`` plus its two special folds), every matching key is decoded (a later duplicate
does not hide an earlier bad one). `carried_config` builds the config ``migrate`` stores from
a source config, field by field. The rule for a bad field: what decides how the container
runs or what it is (``config.User``, ``Env``, ``Entrypoint``, ``Cmd``, ``WorkingDir``,
``Volumes``, ``ExposedPorts``, ``Labels``, ``StopSignal``, ``architecture``, ``os``) is
refused (`ConfigError`, one line naming the field: squashing such an image would silently
change it, and podman itself cannot read it), while descriptive metadata that changes nothing
at run time (``created``, ``author``, ``variant``, ``os.version``, ``os.features``, history
entries and their fields) is dropped with a warning. `load` parses JSON text into one line on
error, also for documents nested too deeply for Python's parser. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from squashstore.image import SourceError


class ConfigError(SourceError):
    """A source image config holds a value podman cannot read in a field that matters."""


@dataclass(frozen=True)
class GoType:
    """A Go type as ``encoding/json`` fills it: ``string``, ``bool``, ``int64``, ``uint32``,
    ``time`` (``time.Time``), ``any`` (``interface{}``), ``slice`` / ``map`` of `elem`, or
    ``struct`` with `fields` (JSON key -> type; ``struct{}`` has none)."""

    kind: str
    elem: GoType | None = None
    fields: tuple[tuple[str, GoType], ...] = field(default=())


STRING = GoType("string")
BOOL = GoType("bool")
INT64 = GoType("int64")
UINT32 = GoType("uint32")
TIME = GoType("time")
ANY = GoType("any")
EMPTY_STRUCT = GoType("struct")


def slice_of(elem: GoType) -> GoType:
    return GoType("slice", elem)


def map_of(elem: GoType) -> GoType:
    return GoType("map", elem)


def struct(**fields: GoType) -> GoType:
    return GoType("struct", fields=tuple((k.replace("__", "."), v) for k, v in fields.items()))


STRINGS = slice_of(STRING)

# github.com/opencontainers/image-spec/specs-go/v1 (as vendored by podman 4.3.1)
IMAGE_CONFIG = struct(User=STRING, ExposedPorts=map_of(EMPTY_STRUCT), Env=STRINGS,
                      Entrypoint=STRINGS, Cmd=STRINGS, Volumes=map_of(EMPTY_STRUCT),
                      WorkingDir=STRING, Labels=map_of(STRING), StopSignal=STRING,
                      ArgsEscaped=BOOL)
HISTORY = struct(created=TIME, created_by=STRING, author=STRING, comment=STRING,
                 empty_layer=BOOL)
OCI_IMAGE = struct(created=TIME, author=STRING, architecture=STRING, variant=STRING,
                   os=STRING, os__version=STRING, os__features=STRINGS, config=IMAGE_CONFIG,
                   rootfs=struct(type=STRING, diff_ids=STRINGS), history=slice_of(HISTORY))
# github.com/containers/image/v5/manifest Schema2Image: libimage's inspect reads every
# image's config into it as well, OCI or not (measured: a bad "Healthcheck" in an OCI config
# fails `podman pull`); strslice.StrSlice (Cmd, Entrypoint, Shell) also takes one string,
# so the intersection of the two is what podman reads.
STR_SLICE = GoType("strslice")
DOCKER_CONFIG = struct(
    Hostname=STRING, Domainname=STRING, User=STRING, AttachStdin=BOOL, AttachStdout=BOOL,
    AttachStderr=BOOL, ExposedPorts=map_of(EMPTY_STRUCT), Tty=BOOL, OpenStdin=BOOL,
    StdinOnce=BOOL, Env=STRINGS, Cmd=STR_SLICE,
    Healthcheck=struct(Test=STRINGS, StartPeriod=INT64, Interval=INT64, Timeout=INT64,
                       Retries=INT64),
    ArgsEscaped=BOOL, Image=STRING, Volumes=map_of(EMPTY_STRUCT), WorkingDir=STRING,
    Entrypoint=STR_SLICE, NetworkDisabled=BOOL, MacAddress=STRING, OnBuild=STRINGS,
    Labels=map_of(STRING), StopSignal=STRING, StopTimeout=INT64, Shell=STR_SLICE)
DOCKER_IMAGE = struct(
    id=STRING, parent=STRING, comment=STRING, created=TIME, container=STRING,
    container_config=DOCKER_CONFIG, docker_version=STRING, author=STRING,
    config=DOCKER_CONFIG, architecture=STRING, variant=STRING, os=STRING, size=INT64,
    rootfs=struct(type=STRING, diff_ids=STRINGS), os__version=STRING, os__features=STRINGS,
    history=slice_of(struct(created=TIME, created_by=STRING, author=STRING, comment=STRING,
                            empty_layer=BOOL)))
PLATFORM = struct(architecture=STRING, os=STRING, os__version=STRING, os__features=STRINGS,
                  variant=STRING)
DESCRIPTOR = struct(mediaType=STRING, digest=STRING, size=INT64, urls=STRINGS,
                    annotations=map_of(STRING), platform=PLATFORM)
OCI_MANIFEST = struct(schemaVersion=INT64, mediaType=STRING, config=DESCRIPTOR,
                      layers=slice_of(DESCRIPTOR), annotations=map_of(STRING))

# github.com/containers/storage: images.go Image, layers.go Layer (json tags)
STORAGE_IMAGE = GoType("struct", fields=(
    ("id", STRING), ("digest", STRING), ("digests", STRINGS), ("names", STRINGS),
    ("names-history", STRINGS), ("layer", STRING), ("mapped-layers", STRINGS),
    ("metadata", STRING), ("big-data-names", STRINGS), ("big-data-sizes", map_of(INT64)),
    ("big-data-digests", map_of(STRING)), ("created", TIME), ("flags", map_of(ANY))))
STORAGE_LAYER = GoType("struct", fields=(
    ("id", STRING), ("names", STRINGS), ("parent", STRING), ("metadata", STRING),
    ("mountlabel", STRING), ("created", TIME), ("compressed-diff-digest", STRING),
    ("compressed-size", INT64), ("diff-digest", STRING), ("diff-size", INT64),
    ("compression", INT64), ("uidset", slice_of(UINT32)), ("gidset", slice_of(UINT32)),
    ("flags", map_of(ANY)), ("big-data-names", STRINGS)))
STORAGE_IMAGES = slice_of(STORAGE_IMAGE)
STORAGE_LAYERS = slice_of(STORAGE_LAYER)

_LIMITS = {"int64": (-(1 << 63), (1 << 63) - 1), "uint32": (0, (1 << 32) - 1)}
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
               int: "a number", float: "a number"}


def is_go_time(value: object) -> bool:
    """Whether Go's ``time.Time`` unmarshals the JSON string `value` (RFC 3339, upper-case
    ``T`` and ``Z``, valid date and clock, offset under 24 hours)."""
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        return False
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return parsed.year >= 1


def _fold_equal(key: str, name: str) -> bool:
    """Go's encoding/json key match for an ASCII field name: ASCII case-insensitive, and
    U+017F (long s) and U+212A (Kelvin) match ``s`` and ``k``."""
    if len(key) != len(name):
        return False
    for k, n in zip(key, name, strict=True):
        n = n.lower()
        if (k.lower() == n and k.isascii()) or (k == "\u017f" and n == "s") or (
                k == "\u212a" and n == "k"):
            continue
        return False
    return True


def _field_for(key: str, fields: tuple[tuple[str, GoType], ...]) -> tuple[str, GoType] | None:
    for name, kind in fields:
        if name == key:
            return name, kind
    for name, kind in fields:
        if _fold_equal(key, name):
            return name, kind
    return None


def _what(value: object) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _expected(kind: GoType) -> str:
    if kind.kind == "slice":
        return f"an array of {_expected(kind.elem or ANY).removeprefix('a ')}s"
    if kind.kind == "map":
        return "an object"
    if kind.kind == "struct":
        return "an object"
    if kind.kind == "time":
        return "an RFC 3339 time"
    if kind.kind == "strslice":
        return "a string or an array of strings"
    return {"string": "a string", "bool": "a boolean", "int64": "an integer",
            "uint32": "an unsigned 32-bit integer", "any": "any value"}[kind.kind]


def problems(value: object, kind: GoType, path: str) -> list[str]:
    """Why Go's encoding/json cannot unmarshal `value` into `kind` (empty when it can).

    `path` names the value in the messages (``config.Cmd``)."""
    if value is None or kind.kind == "any":
        return []
    path = path or "(document)"
    bad = [f"{path}: {_what(value)} where podman expects {_expected(kind)}"]
    if kind.kind == "string":
        return [] if isinstance(value, str) else bad
    if kind.kind == "bool":
        return [] if isinstance(value, bool) else bad
    if kind.kind in _LIMITS:
        low, high = _LIMITS[kind.kind]
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        return [] if ok else bad
    if kind.kind == "strslice":
        return [] if isinstance(value, str) else problems(value, STRINGS, path)
    if kind.kind == "time":
        return [] if is_go_time(value) else [
            f"{path}: {json.dumps(value)[:60]} is not a time podman can read (RFC 3339)"]
    if kind.kind == "slice":
        if not isinstance(value, list):
            return bad
        return [p for i, item in enumerate(value)
                for p in problems(item, kind.elem or ANY, f"{path}[{i}]")]
    if not isinstance(value, dict):
        return bad
    if kind.kind == "map":
        return [p for k, item in value.items()
                for p in problems(item, kind.elem or ANY, f"{path}[{json.dumps(k)}]")]
    out = []
    for key, item in value.items():
        match = _field_for(key, kind.fields)
        if match is not None:
            out += problems(item, match[1], key if path == "(document)" else f"{path}.{key}")
    return out


def load(data: bytes, what: str) -> Any:
    """JSON text parsed; `SourceError` naming `what` in one line when it is not JSON or is
    nested too deeply to parse."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"{what}: invalid JSON ({exc})") from exc
    except RecursionError:
        raise SourceError(f"{what}: JSON nested too deeply") from None


# --------------------------------------------------------------------------- migrate's config

REFUSED_CONFIG = ("User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir",
                  "Labels", "StopSignal")
"""``config`` fields migrate keeps; a bad one refuses the image (it changes how it runs)."""
REFUSED_TOP = ("architecture", "os")
DROPPED_TOP = ("variant", "os.version", "os.features", "author", "created")
"""Top-level fields kept when podman can read them, dropped with a warning otherwise."""
HISTORY_FIELDS = ("created", "created_by", "author", "comment")
_TOP_TYPES = dict(OCI_IMAGE.fields)
_CONFIG_TYPES = dict(IMAGE_CONFIG.fields)
_HISTORY_TYPES = dict(HISTORY.fields)


@dataclass(frozen=True)
class Carried:
    """The part of a source config migrate keeps, and what it dropped (one line each)."""

    top: dict[str, Any]
    config: dict[str, Any]
    history: list[dict[str, Any]]
    dropped: tuple[str, ...]


def _exact(source: Mapping[str, Any], name: str) -> list[tuple[str, Any]]:
    """Every key of `source` Go would decode into field `name`, in order."""
    return [(k, v) for k, v in source.items() if _fold_equal(k, name)]


def _go_value(source: Mapping[str, Any], name: str) -> Any:
    """The value Go ends up with in field `name`: the last matching key's (None if none)."""
    found = _exact(source, name)
    return found[-1][1] if found else None


def _object(source: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The object Go decodes into struct field `name` (matching objects merged in order)."""
    merged: dict[str, Any] = {}
    for _key, value in _exact(source, name):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"image config: {name!r} is not a JSON object")
        merged.update(value or {})
    return merged


def carried_config(source: Mapping[str, Any]) -> Carried:
    """Every kept field of `source` checked as podman will read it (see the module's rule).

    Only the exact field names are carried, so no key that Go would fold onto a field
    (``cmd``) survives into the stored config."""
    dropped: list[str] = []
    top: dict[str, Any] = {}
    for name in (*REFUSED_TOP, *DROPPED_TOP):
        for key, value in _exact(source, name):
            bad = problems(value, _TOP_TYPES[name], key)
            if bad and name in REFUSED_TOP:
                raise ConfigError(f"image config: {bad[0]}")
            if bad:
                dropped.append(f"{bad[0]}: dropped")
        value = _go_value(source, name)
        if value is not None and not problems(value, _TOP_TYPES[name], name):
            top[name] = value
    run = _object(source, "config")
    config: dict[str, Any] = {}
    for name in REFUSED_CONFIG:
        for key, value in _exact(run, name):
            bad = problems(value, _CONFIG_TYPES[name], f"config.{key}")
            if bad:
                raise ConfigError(f"image config: {bad[0]}")
        if _go_value(run, name) is not None:
            config[name] = _go_value(run, name)
    history: list[dict[str, Any]] = []
    raw_history = _go_value(source, "history")
    if raw_history is not None and not isinstance(raw_history, list):
        dropped.append(f"history: {_what(raw_history)} where podman expects an array: "
                       "dropped")
        raw_history = []
    for i, entry in enumerate(raw_history or []):
        if not isinstance(entry, dict):
            if entry is not None:
                dropped.append(f"history[{i}]: {_what(entry)}, not an object: dropped")
            continue
        kept: dict[str, Any] = {}
        for name in HISTORY_FIELDS:
            bad = [p for k, v in _exact(entry, name)
                   for p in problems(v, _HISTORY_TYPES[name], f"history[{i}].{k}")]
            value = _go_value(entry, name)
            if bad:
                dropped.append(f"{bad[0]}: dropped")
            elif value is not None:
                kept[name] = value
        history.append(kept)
    _object(source, "rootfs")
    return Carried(top, config, history, tuple(dropped))


def config_problems(config: object) -> list[str]:
    """Why podman cannot read `config` as an image config (as OCI's and Docker's type)."""
    return list(dict.fromkeys([*problems(config, OCI_IMAGE, ""),
                               *problems(config, DOCKER_IMAGE, "")]))


def manifest_problems(manifest: object) -> list[str]:
    """Why podman cannot read `manifest` as an OCI image manifest."""
    return problems(manifest, OCI_MANIFEST, "")
