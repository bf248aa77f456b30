"""A squash store's layer read as a layer tar: its tar-split with the squash file's content.

A squash store (this project's, listed in storage.conf like any additional store) keeps a
layer as ``squashstore/squash/<LID>.sqfs`` plus the tar-split of the layer's canonical tar;
its ``overlay/<LID>/diff`` holds the files only while mounted. A source reader that meets such
a layer (``migrate`` of a name podman resolves to a store's copy, or re-squashing with other
options) reads the squash file itself through this module, never the mount point: the
tar-split's segments are copied and each file's content is read from the squash file (by
path, never following a symlink) and checked against the CRC-64 tar-split recorded, so the
stream is the layer's tar byte for byte.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

from fastcrc import crc64

from squashstore import tree
from squashstore.image import SourceError, SquashstoreError
from squashstore.squashfs.reader import SquashReader
from squashstore.tar.format import SPLIT_FILE as FILE
from squashstore.tar.format import SPLIT_SEGMENT as SEGMENT
from squashstore.tar.split import (
    CHUNK,
    _entry_name,
    _parse_line,
    _payload,
    _safe_relative,
)


def _content(reader: SquashReader, name: bytes, size: int, crc: bytes | None,
             where: str) -> Iterator[bytes]:
    inode = reader.root
    for part in _safe_relative(name, where).split(b"/"):
        found = reader.lookup(inode, part) if inode.kind is tree.Kind.DIR else None
        if found is None:
            raise SourceError(f"{where}: {name.decode(errors='replace')} is not in "
                              f"{reader.path}")
        inode = found
    if inode.kind is not tree.Kind.FILE or inode.size < size:
        raise SourceError(f"{where}: {name.decode(errors='replace')} in {reader.path} is "
                          f"not the {size}-byte file the layer recorded")
    offset = 0
    checksum: int | None = None
    while offset < size:
        data = reader.read(inode, offset, min(CHUNK, size - offset))
        if not data:
            raise SourceError(f"{where}: {reader.path}: short read")
        offset += len(data)
        if crc is not None:
            checksum = crc64.go_iso(data) if checksum is None else crc64.go_iso(data, checksum)
        yield data
    if crc is not None and checksum is not None and checksum.to_bytes(8, "big") != crc:
        raise SourceError(f"{where}: file integrity checksum failed for "
                          f"{name.decode(errors='replace')} in {reader.path}")


def tar_from_squash(tar_split: Path, squash: Path, where: str) -> Iterator[bytes]:
    """The layer tar rebuilt from `tar_split` and the squash file `squash`."""
    try:
        with SquashReader(squash) as reader, gzip.open(tar_split, "rb") as lines:
            for line in lines:
                if not line.strip():
                    continue
                entry = _parse_line(line, where)
                kind = entry.get("type")
                if kind == SEGMENT:
                    data = _payload(entry, where)
                    if data:
                        yield data
                elif kind == FILE:
                    size = entry.get("size", 0)
                    if not isinstance(size, int) or size < 0:
                        raise SourceError(f"{where}: invalid size in tar-split")
                    if size:
                        yield from _content(reader, _entry_name(entry, where), size,
                                            _payload(entry, where) or None, where)
                else:
                    raise SourceError(f"{where}: unknown tar-split entry type {kind!r}")
    except SourceError:
        raise
    except (OSError, EOFError, SquashstoreError) as exc:
        raise SourceError(f"{where}: cannot read {squash}: {exc}") from exc
