"""What the transports share: members of a directory or an archive, and verified layers.

This module owns reading the files of an OCI layout directory (`DirFiles`) or of a tar
archive in place, never extracted (`ArchiveFiles`, members checked to stay inside it), the
blob path rule of an OCI layout, matching a config's diff ids to a manifest's layers, and
building a `Layer` whose stream `blobs` verifies against what the source promised.
"""

from __future__ import annotations

import io
import posixpath
import stat
import tarfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO

from squashstore import oci
from squashstore.blobs import (
    Expect,
    opener,
)
from squashstore.image import Layer, SourceError


def never() -> AbstractContextManager[BinaryIO]:
    raise AssertionError("not an opener")


def layer_name(index: int, diff_id: str) -> str:
    return Layer(index, diff_id, "", "", -1, never).describe()


def blob_layer(index: int, diff_id: str, descriptor: oci.Descriptor,
                open_raw: Callable[[], BinaryIO], compression: str | None) -> Layer:
    expect = Expect(layer_name(index, diff_id), digest=descriptor.digest, diff_id=diff_id,
                    size=descriptor.size, compression=compression)
    return Layer(index, diff_id, descriptor.digest, descriptor.media_type, descriptor.size,
                 opener(open_raw, expect))


class Files:
    """Named files of an OCI layout or an image archive."""

    what: str

    def read(self, name: str) -> bytes:
        with self.open_raw(name)() as f:
            return f.read()

    def open_raw(self, name: str) -> Callable[[], BinaryIO]:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError


def missing(what: str, name: str) -> SourceError:
    return SourceError(f"{what}: {name} is missing")


class DirFiles(Files):
    def __init__(self, root: Path, what: str) -> None:
        self.root, self.what = root, what
        if not root.is_dir():
            raise SourceError(f"{what}: no such directory {root}")

    def _path(self, name: str) -> Path:
        return self.root / _clean_member(name, self.what)

    def open_raw(self, name: str) -> Callable[[], BinaryIO]:
        path = self._path(name)

        def open_file() -> BinaryIO:
            try:
                return path.open("rb")
            except FileNotFoundError:
                raise missing(self.what, name) from None
        return open_file

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size


def _clean_member(name: str, what: str) -> str:
    clean = posixpath.normpath("/" + name).lstrip("/")
    if not clean or clean.startswith(".."):
        raise SourceError(f"{what}: invalid member name {name!r}")
    return clean


class _Member(io.RawIOBase):
    """One member of a tar archive, read in place through `tarfile.extractfile`."""

    def __init__(self, archive: Path, member: tarfile.TarInfo) -> None:
        super().__init__()
        self._file = archive.open("rb")
        try:
            tar = tarfile.open(fileobj=self._file, mode="r:*")  # noqa: SIM115 (lives with self)
            inner = tar.extractfile(member)
        except (tarfile.TarError, OSError):
            self._file.close()
            raise
        if inner is None:
            self._file.close()
            raise OSError(f"{member.name} is not a regular file")
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
            self._file.close()
        super().close()


class ArchiveFiles(Files):
    def __init__(self, archive: Path, what: str) -> None:
        self.archive, self.what = archive, what
        try:
            if not stat.S_ISREG(archive.stat().st_mode) and not archive.is_dir():
                # a device or a pipe: /dev/zero made tarfile's compression probing loop
                raise SourceError(f"{what}: {archive} is not a regular file")
            with tarfile.open(archive, mode="r:*") as tar:
                members = tar.getmembers()
        except FileNotFoundError:
            raise SourceError(f"{what}: no such file {archive}") from None
        except IsADirectoryError:
            raise SourceError(f"{what}: {archive} is a directory, not an archive") from None
        except (tarfile.TarError, EOFError) as exc:
            raise SourceError(f"{what}: {archive} is not a tar archive") from exc
        except OSError as exc:
            raise SourceError(f"{what}: cannot read {archive}: {exc.strerror}") from exc
        self.members = {_clean_member(m.name, what): m for m in members if m.name.strip("./")}

    def member(self, name: str) -> tarfile.TarInfo:
        key = _clean_member(name, self.what)
        for _ in range(16):
            info = self.members.get(key)
            if info is None:
                raise missing(self.what, name)
            if info.issym():
                key = _clean_member(posixpath.join(posixpath.dirname(key), info.linkname),
                                    self.what)
            elif info.islnk():
                key = _clean_member(info.linkname, self.what)
            elif info.isfile():
                return info
            else:
                raise SourceError(f"{self.what}: {name} is not a regular file")
        raise SourceError(f"{self.what}: {name}: too many levels of links")

    def open_raw(self, name: str) -> Callable[[], BinaryIO]:
        info = self.member(name)
        return lambda: io.BufferedReader(_Member(self.archive, info), 1 << 20)

    def exists(self, name: str) -> bool:
        try:
            self.member(name)
        except SourceError:
            return False
        return True

    def size(self, name: str) -> int:
        return self.member(name).size


def matching_diff_ids(config: bytes, count: int, what: str) -> tuple[str, ...]:
    ids = oci.diff_ids(config, f"{what}: config")
    if len(ids) != count:
        raise SourceError(f"{what}: the manifest has {count} layers but the config lists "
                          f"{len(ids)} diff_ids")
    return ids


def blob_path(digest: str) -> str:
    algorithm, _, value = digest.partition(":")
    return f"blobs/{algorithm}/{value}"
