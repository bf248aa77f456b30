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

import hashlib
from collections.abc import Iterator
from pathlib import Path

from squashstore import tree
from squashstore.image import SourceError, SquashstoreError
from squashstore.squashfs.reader import SquashReader
from squashstore.tar.split import CHUNK, crc_checked, rebuild_tar


def _content(reader: SquashReader, name: bytes, size: int, crc: bytes | None,
             where: str) -> Iterator[bytes]:
    """`size` bytes of the file `name` (relative, checked by `rebuild_tar`) in `reader`."""
    inode = reader.root
    for part in name.split(b"/"):
        found = reader.lookup(inode, part) if inode.kind is tree.Kind.DIR else None
        if found is None:
            raise SourceError(f"{where}: {name.decode(errors='replace')} is not in "
                              f"{reader.path}")
        inode = found
    if inode.kind is not tree.Kind.FILE or inode.size < size:
        raise SourceError(f"{where}: {name.decode(errors='replace')} in {reader.path} is "
                          f"not the {size}-byte file the layer recorded")
    found = inode

    def chunks() -> Iterator[bytes]:
        offset = 0
        while offset < size:
            data = reader.read(found, offset, min(CHUNK, size - offset))
            if not data:
                raise SourceError(f"{where}: {reader.path}: short read")
            offset += len(data)
            yield data

    return crc_checked(chunks(), crc, f"{where}: file integrity checksum failed for "
                                      f"{name.decode(errors='replace')} in {reader.path}")


def tar_from_squash(tar_split: Path, squash: Path, where: str) -> Iterator[bytes]:
    """The layer tar rebuilt from `tar_split` and the squash file `squash`."""
    try:
        with SquashReader(squash) as reader:

            def content_of(name: bytes, size: int, crc: bytes | None) -> Iterator[bytes]:
                return _content(reader, name, size, crc, where)

            yield from rebuild_tar(tar_split, content_of, where)
    except SourceError:
        raise
    except (OSError, EOFError, SquashstoreError) as exc:
        raise SourceError(f"{where}: cannot read {squash}: {exc}") from exc


def layer_digest(tar_split: Path, squash: Path, where: str) -> tuple[str, int]:
    """``("sha256:...", size)`` of the layer tar rebuilt from `tar_split` and `squash`:
    what a layer's diff id and size must be when the two hold the layer they claim."""
    digest, size = hashlib.sha256(), 0
    for chunk in tar_from_squash(tar_split, squash, where):
        digest.update(chunk)
        size += len(chunk)
    return "sha256:" + digest.hexdigest(), size
