"""The canonical tar stream of a flattened tree, its digest, and its tar-split record.

`TarStream` turns merged entries (`layers.MergedEntry`) into one POSIX (PAX) tar stream,
in the order they come: header, content, padding. It may write the stream to a file
(`squashstore export`), and it always computes the stream's sha256 and length: that digest
is the store layer's ``diff-digest`` and the image config's ``diff_id``. With a tar-split
file it also records, in vbatts/tar-split's format (gzip'd JSON lines: type 2 raw segments,
type 1 file entries with the CRC-64/ISO of their content), how to rebuild those exact bytes
from the layer's mounted directory, so containers/storage can re-create the layer tar (for
``podman save`` and ``podman push``) byte for byte from a squash mount.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import tarfile
from typing import IO, BinaryIO

from fastcrc import crc64

from squashstore.layers import MergedEntry
from squashstore.tree import Inode, Kind

BLOCK = 512
CHUNK = 1 << 20
_TYPES = {
    Kind.DIR: tarfile.DIRTYPE,
    Kind.FILE: tarfile.REGTYPE,
    Kind.SYMLINK: tarfile.SYMTYPE,
    Kind.CHARDEV: tarfile.CHRTYPE,
    Kind.BLOCKDEV: tarfile.BLKTYPE,
    Kind.FIFO: tarfile.FIFOTYPE,
}


def tarinfo_for(path: str, inode: Inode, link_to: str | None = None) -> tarfile.TarInfo:
    """The tar header of a merged entry (a hard link when `link_to` is given)."""
    name = path or "."
    if inode.kind is Kind.DIR:
        name += "/"
    info = tarfile.TarInfo(name)
    info.mode = inode.mode & 0o7777
    info.uid, info.gid = inode.uid, inode.gid
    info.mtime = inode.mtime
    info.uname = info.gname = ""
    if link_to is not None:
        info.type = tarfile.LNKTYPE
        info.linkname = link_to
    else:
        try:
            info.type = _TYPES[inode.kind]
        except KeyError:
            raise ValueError(f"{path!r}: a {inode.kind.name.lower()} cannot be stored in a "
                             "tar stream") from None
        info.size = inode.size if inode.kind is Kind.FILE else 0
        info.linkname = inode.target
        info.devmajor, info.devminor = inode.rdev
    info.pax_headers = {"SCHILY.xattr." + key: value.decode("utf-8", "surrogateescape")
                        for key, value in sorted(inode.xattrs.items())}
    return info


class TarSplitRecorder:
    """Writes a tar-split metadata file: how to reassemble the stream from a directory."""

    def __init__(self, out: IO[bytes]) -> None:
        self._gz = gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=1)
        self._position = 0
        self._segment = bytearray()

    def segment(self, raw: bytes) -> None:
        self._segment += raw

    def file(self, name: str, size: int, crc: int | None) -> None:
        self._flush_segment()
        entry: dict[str, object] = {"type": 1}
        raw = name.encode("utf-8", "surrogateescape")
        try:
            entry["name"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            entry["name_raw"] = base64.b64encode(raw).decode()
        if size:
            entry["size"] = size
        entry["payload"] = (
            base64.b64encode(crc.to_bytes(8, "big")).decode() if crc is not None else None)
        self._emit(entry)

    def close(self) -> None:
        self._flush_segment()
        self._gz.close()

    def _flush_segment(self) -> None:
        if self._segment:
            self._emit({"type": 2, "payload": base64.b64encode(bytes(self._segment)).decode()})
            self._segment.clear()

    def _emit(self, entry: dict[str, object]) -> None:
        entry["position"] = self._position
        self._position += 1
        self._gz.write(json.dumps(entry, separators=(",", ":")).encode() + b"\n")


class TarStream:
    """Serialise merged entries as one tar stream: written, hashed, tar-split recorded."""

    def __init__(self, out: BinaryIO | None = None,
                 tarsplit: TarSplitRecorder | None = None) -> None:
        self._out = out
        self._split = tarsplit
        self._sha = hashlib.sha256()
        self.size = 0
        self._pending: tuple[str, int, int | None] | None = None

    @property
    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()

    def _raw(self, data: bytes) -> None:
        self._sha.update(data)
        self.size += len(data)
        if self._out is not None:
            self._out.write(data)

    def begin(self, entry: MergedEntry) -> None:
        """Write the header of `entry`; content (if any) follows through `payload`."""
        info = tarinfo_for(entry.path, entry.inode, entry.link_to)
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self._raw(header)
        if self._split is not None:
            self._split.segment(header)
        self._pending = (info.name, info.size, None)

    def payload(self, data: bytes) -> None:
        """Content bytes of the entry begun last."""
        assert self._pending is not None
        self._raw(data)
        name, size, crc = self._pending
        self._pending = (name, size,
                         crc64.go_iso(data) if crc is None else crc64.go_iso(data, crc))

    def end(self) -> None:
        """Close the entry begun last: record it and pad its content to a block."""
        assert self._pending is not None
        name, size, crc = self._pending
        self._pending = None
        if self._split is not None:
            self._split.file(name, size, crc)
        pad = -size % BLOCK
        if pad:
            self._raw(bytes(pad))
            if self._split is not None:
                self._split.segment(bytes(pad))

    def add(self, entry: MergedEntry) -> None:
        """Write a whole entry, copying its content from `entry.content`."""
        self.begin(entry)
        if entry.content is not None:
            remaining = entry.inode.size
            while remaining:
                chunk = entry.content.read(min(CHUNK, remaining))
                if not chunk:
                    raise EOFError(f"{entry.path!r}: content ended {remaining} bytes early")
                self.payload(chunk)
                remaining -= len(chunk)
        self.end()

    def close(self) -> None:
        """Write the end-of-archive marker (two zero blocks)."""
        end = bytes(2 * BLOCK)
        self._raw(end)
        if self._split is not None:
            self._split.segment(end)
            self._split.close()


class TeeReader:
    """A read-only stream that passes every byte it reads on to a `TarStream`."""

    def __init__(self, source: BinaryIO, stream: TarStream) -> None:
        self._source = source
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        if data:
            self._stream.payload(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True
