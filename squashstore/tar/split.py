"""tar-split, both directions: recording how to rebuild a tar stream, and rebuilding one.

`TarSplitRecorder` writes, while squashstore's canonical tar streams past, the gzip'd JSON
lines that let containers/storage rebuild that exact tar from the mounted layer (for
``podman save`` and ``podman push``). The rest of this module reads them back:

containers/storage keeps no layer tars: it keeps each layer's files unpacked (overlay's
``<graphroot>/overlay/<id>/diff``) plus ``overlay-layers/<id>.tar-split.gz``, gzip'd JSON lines
in vbatts/tar-split's format. A line of type 2 (segment) carries raw tar bytes (headers,
padding, the end-of-archive blocks) base64'd in ``payload``; a line of type 1 (file) names an
entry (``name``, or base64 ``name_raw`` when not UTF-8) whose ``size`` content bytes are read
from the diff directory. Concatenated they reproduce the original layer tar byte for byte.
This module owns that reconstruction and, for a layer without a tar-split, an equivalent tar
made by walking the diff directory (overlay whiteouts and opaque directories turned into OCI
``.wh.`` entries). Both are produced as iterators of byte chunks.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import functools
import gzip
import hashlib
import json
import os
import queue
import stat
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TypeVar

from fastcrc import crc64

from squashstore.image import SourceError
from squashstore.tar import format as f
from squashstore.tar.format import SPLIT_FILE as FILE
from squashstore.tar.format import SPLIT_SEGMENT as SEGMENT
from squashstore.tar.writer import encode_header

CHUNK = 1 << 20
_json_string = json.encoder.encode_basestring_ascii
"""A str as json.dumps writes it (ASCII, escaped): the C encoder json.dumps itself uses."""


_LINES_BUFFER = 1 << 18
_b64 = functools.partial(binascii.b2a_base64, newline=False)
"""base64.b64encode without its Python wrapper."""
"""JSON lines gathered before one gzip write (a write per line cost more than the JSON)."""


class TarSplitRecorder:
    """Writes a tar-split metadata file: how to reassemble the stream from a directory.

    The JSON lines are the bytes ``json.dumps(entry, separators=(",", ":"))`` gives (keys in
    the order type, name or name_raw, size, payload, position), written by hand: json.dumps
    cost more per entry than the rest of the recording."""

    def __init__(self, out: IO[bytes]) -> None:
        self._gz = gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=1)
        self._position = 0
        self._segment = bytearray()
        self._lines: list[str] = []
        self._buffered = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._thread: threading.Thread | None = None
        """Gzips the lines (zlib lets go of the GIL), started with the first batch: the
        thread that streams only hands them over (gzip was ~0.3 s of its CPU per 40,000
        entries)."""
        self._failed: list[BaseException] = []

    def segment(self, raw: bytes) -> None:
        """Raw tar bytes (headers, padding, the end marker) kept as they are."""
        self._segment += raw

    def file(self, name: str, size: int, crc: int | None) -> None:
        """An entry whose `size` content bytes come from the file `name` (CRC-64/ISO)."""
        self._flush_segment()
        if name.isascii():
            field = '"name":' + _json_string(name)
        else:
            raw = name.encode("utf-8", "surrogateescape")
            try:
                field = '"name":' + _json_string(raw.decode("utf-8"))
            except UnicodeDecodeError:
                field = '"name_raw":"' + _b64(raw).decode() + '"'
        sized = f',"size":{size}' if size else ""
        payload = '"' + _b64(crc.to_bytes(8, "big")).decode() + '"' if crc is not None \
            else "null"
        self._emit(f'{{"type":{FILE},{field}{sized},"payload":{payload},')

    def entry(self, header: bytes, name: str, size: int, crc: int, padding: bytes) -> None:
        """`segment(header)`, `file(name, size, crc)`, `segment(padding)` in one call (the
        same lines: the segment of the header and what came before, then the file)."""
        if not name.isascii():
            self.segment(header)
            self.file(name, size, crc)
            self.segment(padding)
            return
        segment = self._segment
        segment += header
        position = self._position
        sized = f',"size":{size}' if size else ""
        line = (f'{{"type":{SEGMENT},"payload":"{_b64(segment).decode()}","position":'
                f'{position}}}\n{{"type":{FILE},"name":{_json_string(name)}{sized},"payload":'
                f'"{_b64(crc.to_bytes(8, "big")).decode()}","position":{position + 1}}}\n')
        self._position = position + 2
        segment.clear()
        segment += padding
        self._lines.append(line)
        self._buffered += len(line)
        if self._buffered >= _LINES_BUFFER:
            self._write_lines()

    def close(self) -> None:
        self._flush_segment()
        self._write_lines()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._failed:
            raise self._failed[0]
        self._gz.close()

    def _flush_segment(self) -> None:
        if self._segment:
            payload = _b64(self._segment).decode()
            self._emit(f'{{"type":{SEGMENT},"payload":"{payload}",')
            self._segment.clear()

    def _emit(self, head: str) -> None:
        """One JSON line: `head` (the object up to its last key) and the position."""
        line = f'{head}"position":{self._position}}}\n'
        self._position += 1
        self._lines.append(line)
        self._buffered += len(line)
        if self._buffered >= _LINES_BUFFER:
            self._write_lines()

    def _write_lines(self) -> None:
        if self._lines:
            data = "".join(self._lines).encode()
            self._lines.clear()
            self._buffered = 0
            if self._failed:
                raise self._failed[0]
            if self._thread is None:
                self._thread = threading.Thread(
                    target=_gzip_worker, args=(self._queue, self._gz, self._failed),
                    name="tar-split-gzip", daemon=True)
                self._thread.start()
                # An abandoned recorder (an error mid-way) must not leave it waiting.
                weakref.finalize(self, self._queue.put, None)
            self._queue.put(data)


def _gzip_worker(work: queue.Queue[bytes | None], gz: gzip.GzipFile,
                 failed: list[BaseException]) -> None:
    while (data := work.get()) is not None:
        if not failed:
            try:
                gz.write(data)
            except BaseException as exc:  # raised again by the recorder's next call
                failed.append(exc)
_OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")
_SKIPPED_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.")


def _entry_name(entry: dict[str, object], where: str) -> bytes:
    raw = entry.get("name_raw")
    if isinstance(raw, str) and raw:
        try:
            return base64.b64decode(raw, validate=True)
        except binascii.Error as exc:
            raise SourceError(f"{where}: invalid name_raw ({exc})") from exc
    name = entry.get("name")
    if not isinstance(name, str):
        raise SourceError(f"{where}: file entry without a name")
    return name.encode("utf-8", "surrogateescape")


def _safe_relative(name: bytes, where: str) -> bytes:
    """`name` as a path relative to the diff directory; never leaves it."""
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    if b".." in parts or not parts:
        raise SourceError(f"{where}: entry name {name!r} escapes the layer")
    return b"/".join(parts)


T = TypeVar("T")
ContentOf = Callable[[bytes, int, "bytes | None"], Iterable[T]]
"""``content_of(name, size, crc)``: the `size` content bytes of the file `name` (relative,
never leaving the layer), for `rebuild_tar`; `crc` is what tar-split recorded (or None),
for `crc_checked`."""


def crc_checked(chunks: Iterable[bytes], crc: bytes | None, failure: str) -> Iterator[bytes]:
    """`chunks` passed on, then checked against the CRC-64/ISO tar-split recorded, as
    containers/storage checks it; a mismatch raises SourceError(`failure`)."""
    checksum: int | None = None
    for data in chunks:
        if crc is not None:
            checksum = crc64.go_iso(data) if checksum is None else crc64.go_iso(data, checksum)
        yield data
    if crc is not None and checksum is not None and checksum.to_bytes(8, "big") != crc:
        raise SourceError(failure)


class DiffFile:
    """One file's content as tar-split names it, not yet read: `size` bytes of the file
    `name` (relative, never leaving the layer) below the layer's diff directory `diff`, and
    the CRC-64/ISO containers/storage recorded (or None). `where` names the layer in
    errors. A reference a rebuilt layer hands out instead of the bytes
    (`tar_parts_from_tar_split`), so whoever writes the content reads it once, itself
    (`DiffFileReader`, then `check`)."""

    __slots__ = ("crc", "diff", "name", "size", "where")

    def __init__(self, diff: bytes, name: bytes, size: int, crc: bytes | None,
                 where: str) -> None:
        self.diff, self.name, self.size, self.crc, self.where = diff, name, size, crc, where

    @property
    def path(self) -> bytes:
        return self.diff + b"/" + self.name

    def chunks(self) -> Iterable[bytes]:
        """The content read here and checked (for a reader that wants the bytes)."""
        return _file_content(self.diff, self.name, self.size, self.crc, self.where)

    def content(self) -> bytes:
        """The content read here at once, not checked (a small file, for a writer that
        computes the CRC-64 anyway and then calls `check`); the errors of `DiffFileReader`."""
        return _whole_file(self.diff, self.name, self.size, self.where)

    def sha256(self) -> bytes:
        """The sha256 of the content, read again (and checked again against the CRC)."""
        digest = hashlib.sha256()
        crc: int | None = None
        with DiffFileReader(self) as reader:
            while data := reader.read(CHUNK):
                digest.update(data)
                crc = crc64.go_iso(data) if crc is None else crc64.go_iso(data, crc)
        self.check(crc)
        return digest.digest()

    def check(self, crc: int | None) -> None:
        """Raise the error containers/storage gives if `crc` (the CRC-64 of the `size`
        bytes read) is not the recorded one."""
        if self.crc is not None and crc is not None and crc.to_bytes(8, "big") != self.crc:
            raise _crc_failed(self.path, self.where)


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_SYS_OPENAT2 = 437
"""openat2(2)'s number, the same on every Linux architecture (Linux 5.6+)."""
_RESOLVE_BENEATH_NO_LINKS = 0x08 | 0x04 | 0x02
"""RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS."""
_openat2: list[Callable[[int, bytes], int]] = []
"""The openat2 call, once made (empty: not tried yet; `os.open` stands in where the
kernel or a seccomp filter refuses openat2)."""


def _make_openat2() -> Callable[[int, bytes], int]:
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                    ("resolve", ctypes.c_uint64)]

    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                        ctypes.c_size_t]
    how = OpenHow(_OPEN_FLAGS, 0, _RESOLVE_BENEATH_NO_LINKS)
    pointer, size = ctypes.addressof(how), ctypes.sizeof(how)

    def openat2(dirfd: int, name: bytes) -> int:
        fd = syscall(_SYS_OPENAT2, dirfd, name, pointer, size)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return int(fd)

    openat2.how = how  # type: ignore[attr-defined]  # keeps the struct alive
    return openat2


def _no_openat2(dirfd: int, name: bytes) -> int:
    return os.open(name, _OPEN_FLAGS, dir_fd=dirfd)


_DIRS: list[dict[bytes, int]] = []
"""The open `diff_dirs` caches, innermost last."""


@contextlib.contextmanager
def diff_dirs() -> Iterator[None]:
    """While this is open, `open_diff_file` opens each layer directory once for all its
    files (a writer reading a whole image), and closes them at the end."""
    cache: dict[bytes, int] = {}
    _DIRS.append(cache)
    try:
        yield
    finally:
        _DIRS.remove(cache)
        for fd in cache.values():
            os.close(fd)


def open_diff_file(diff: bytes, name: bytes, where: str) -> int:
    """The one rule for opening the file `name` (relative, `_safe_relative` already) of
    the layer directory `diff`: read-only, never through a symlink in any component of
    `name` nor out of `diff` (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS; where the
    kernel refuses openat2, only the last component is O_NOFOLLOW), never waiting (a
    FIFO planted there reads as empty, so as too short, instead of blocking)."""
    if not _openat2:
        try:
            _openat2.append(_make_openat2())
        except (OSError, AttributeError):  # pragma: no cover - no libc syscall()
            _openat2.append(_no_openat2)
    cache = _DIRS[-1] if _DIRS else None
    dirfd = cache.get(diff) if cache is not None else None
    if dirfd is None:
        try:
            dirfd = os.open(diff, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _unreadable(diff + b"/" + name, exc, where) from exc
        if cache is not None:
            cache[diff] = dirfd
    try:
        try:
            return _openat2[0](dirfd, name)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EPERM) or _openat2[0] is _no_openat2:
                raise
            _openat2[0] = _no_openat2  # pragma: no cover - an old kernel, a seccomp filter
            return _no_openat2(dirfd, name)  # pragma: no cover
    except OSError as exc:
        raise _unreadable(diff + b"/" + name, exc, where) from exc
    finally:
        if cache is None:
            os.close(dirfd)


def _unreadable(path: bytes, exc: OSError, where: str) -> SourceError:
    return SourceError(f"{where}: cannot read {os.fsdecode(path)}: {exc.strerror}")


def _too_short(path: bytes, size: int, where: str) -> SourceError:
    return SourceError(f"{where}: {os.fsdecode(path)} is shorter than the {size} bytes "
                       "the layer recorded")


def _crc_failed(path: bytes, where: str) -> SourceError:
    return SourceError(f"{where}: file integrity checksum failed for {os.fsdecode(path)}")


class DiffFileReader:
    """A `DiffFile`'s bytes as a stream: `read(n)` gives exactly n bytes (fewer only at
    `size`); a file shorter than recorded is the same SourceError as for a rebuilt tar.
    Close it (or use it as a context manager)."""

    def __init__(self, ref: DiffFile) -> None:
        self._path = ref.path
        self._where = ref.where
        self._size = ref.size
        self._left = ref.size
        self._fd = open_diff_file(ref.diff, ref.name, ref.where)

    def read(self, size: int = -1) -> bytes:
        left = self._left
        if size < 0 or size > left:
            size = left
        if not size:
            return b""
        try:
            data = os.read(self._fd, size)
            while 0 < len(data) < size:
                more = os.read(self._fd, size - len(data))
                if not more:
                    break
                data += more
        except OSError as exc:
            raise _unreadable(self._path, exc, self._where) from exc
        if len(data) != size:
            raise _too_short(self._path, self._size, self._where)
        self._left = left - size
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DiffFileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _file_content(diff: bytes, name: bytes, size: int, crc: bytes | None,
                  where: str) -> Iterable[bytes]:
    """`size` bytes of the file `name` below `diff` (never through a symlink), checked
    ("file integrity checksum failed"). A file of at most `CHUNK` bytes is read, checked
    and closed at once (the usual file: no generators per file)."""
    if size > CHUNK:
        return _streamed_file_content(diff, name, size, crc, where)
    data = _whole_file(diff, name, size, where)
    if crc is not None and crc64.go_iso(data).to_bytes(8, "big") != crc:
        raise _crc_failed(diff + b"/" + name, where)
    return (data,) if data else ()


def _whole_file(diff: bytes, name: bytes, size: int, where: str) -> bytes:
    """The `size` bytes of the file `name` below `diff`, read at once (unchecked)."""
    fd = open_diff_file(diff, name, where)
    try:
        data = os.read(fd, size)
        while 0 < len(data) < size:
            more = os.read(fd, size - len(data))
            if not more:
                break
            data += more
    except OSError as exc:
        raise _unreadable(diff + b"/" + name, exc, where) from exc
    finally:
        os.close(fd)
    if len(data) != size:
        raise _too_short(diff + b"/" + name, size, where)
    return data


def _streamed_file_content(diff: bytes, name: bytes, size: int, crc: bytes | None,
                           where: str) -> Iterator[bytes]:
    """`_file_content` of a large file, chunk by chunk."""
    path = diff + b"/" + name
    fd = open_diff_file(diff, name, where)

    def chunks() -> Iterator[bytes]:
        remaining = size
        while remaining:
            try:
                data = os.read(fd, min(CHUNK, remaining))
            except OSError as exc:
                raise _unreadable(path, exc, where) from exc
            if not data:
                raise _too_short(path, size, where)
            remaining -= len(data)
            yield data

    try:
        yield from crc_checked(chunks(), crc, str(_crc_failed(path, where)))
    finally:
        os.close(fd)


_DECODER = json.JSONDecoder()


def _parse_line(line: bytes, where: str) -> dict[str, object]:
    try:
        entry, _ = _DECODER.raw_decode(line.decode())
    except ValueError as exc:
        raise SourceError(f"{where}: invalid tar-split line ({exc})") from exc
    if not isinstance(entry, dict):
        raise SourceError(f"{where}: invalid tar-split line")
    return entry


def _payload(entry: dict[str, object], where: str) -> bytes:
    payload = entry.get("payload")
    if payload is None:
        return b""
    if not isinstance(payload, str):
        raise SourceError(f"{where}: invalid segment payload")
    try:
        return binascii.a2b_base64(payload, strict_mode=True)  # b64decode(validate=True)
    except binascii.Error as exc:
        raise SourceError(f"{where}: invalid segment payload ({exc})") from exc


def tar_from_tar_split(tar_split: Path, diff_dir: Path, where: str) -> Iterator[bytes]:
    """The layer tar rebuilt from `tar_split` (a ``.tar-split.gz``) and `diff_dir`.

    `where` names the layer in errors.
    """
    diff = os.fsencode(diff_dir)

    def content_of(name: bytes, size: int, crc: bytes | None) -> Iterable[bytes]:
        return _file_content(diff, name, size, crc, where)

    return rebuild_tar(tar_split, content_of, where)


def tar_parts_from_tar_split(tar_split: Path, diff_dir: Path,
                             where: str) -> Iterator[bytes | DiffFile]:
    """`tar_from_tar_split` with each file's content left where it is: a `DiffFile` in
    place of its bytes (whoever needs them reads them; `DiffFile.chunks`)."""
    diff = os.fsencode(diff_dir)

    def content_of(name: bytes, size: int, crc: bytes | None) -> tuple[DiffFile]:
        return (DiffFile(diff, name, size, crc, where),)

    return rebuild_tar(tar_split, content_of, where)


_BATCH = 1 << 18
"""Bytes of a tar-split's JSON lines parsed in one go."""
_LOADS = json.JSONDecoder().decode


def _line_batches(tar_split: Path, where: str) -> Iterator[list[bytes]]:
    """The lines of a gzip'd tar-split (without their newlines), a batch at a time; a file
    that cannot be read is a SourceError."""
    try:
        with gzip.open(tar_split, "rb") as stream:
            rest = b""
            while data := stream.read(_BATCH):
                lines = (rest + data).split(b"\n")
                rest = lines.pop()
                yield lines
            if rest:
                yield [rest]
    except (OSError, EOFError) as exc:
        raise SourceError(f"{where}: cannot read {tar_split}: {exc}") from exc


def _entries(lines: list[bytes], where: str) -> list[dict[str, object]]:
    """The tar-split entries of `lines`: parsed as one JSON array (one call for the batch,
    not one per line) when that gives one object per line; else line by line, so a
    blank line is skipped and an error names the first bad line as before."""
    try:
        parsed = _LOADS("[" + b",".join(lines).decode() + "]")
    except ValueError:
        parsed = None
    if (isinstance(parsed, list) and len(parsed) == len(lines)
            and all(type(entry) is dict for entry in parsed)):
        return parsed
    return [_parse_line(line, where) for line in lines if line.strip()]


def rebuild_tar(tar_split: Path, content_of: ContentOf[T], where: str) -> Iterator[bytes | T]:
    """The tar `tar_split` describes: its segments as recorded, each file's content from
    `content_of` (a diff directory, a squash file; its errors pass through). `where` names
    the layer in errors."""
    for lines in _line_batches(tar_split, where):
        for entry in _entries(lines, where):
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
                    crc = _payload(entry, where) or None
                    name = entry.get("name")
                    if (type(name) is str and "name_raw" not in entry and name.isascii()
                            and name and name[0] not in "/." and "//" not in name
                            and "/." not in name and name[-1] != "/"):
                        # What `_safe_relative` leaves of a clean relative name: itself.
                        raw = name.encode()
                    else:
                        raw = _safe_relative(_entry_name(entry, where), where)
                    yield from content_of(raw, size, crc)
            else:
                raise SourceError(f"{where}: unknown tar-split entry type {kind!r}")


# --- a layer without a tar-split: walk the diff directory ----------------------------------


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    values: dict[bytes, bytes] = {}
    for name in sorted(names):
        key = os.fsencode(name)
        try:
            values[key] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return values


def _header(name: bytes, st: os.stat_result, kind: bytes, xattrs: dict[bytes, bytes],
            linkname: bytes = b"", size: int = 0) -> bytes:
    device = kind in (f.TYPE_CHAR, f.TYPE_BLOCK)
    return encode_header(
        os.fsdecode(name), kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
        size=size, mtime=int(st.st_mtime), linkname=os.fsdecode(linkname),
        devmajor=os.major(st.st_rdev) if device else 0,
        devminor=os.minor(st.st_rdev) if device else 0,
        xattrs={key.decode("utf-8", "surrogateescape"): value for key, value in xattrs.items()
                if not key.startswith(_SKIPPED_XATTR_PREFIXES)})


def _whiteout(name: bytes, st: os.stat_result, mtime: int | None = None) -> bytes:
    """An empty regular file `name` with the owner, mode and time of `st` (the whiteout
    device, or for an opaque marker its directory, then with time 0), as containers/storage
    writes them."""
    return encode_header(os.fsdecode(name), f.TYPE_REG, mode=stat.S_IMODE(st.st_mode) & 0o777,
                         uid=st.st_uid, gid=st.st_gid,
                         mtime=int(st.st_mtime) if mtime is None else mtime)


def _is_opaque(xattrs: dict[bytes, bytes]) -> bool:
    return any(xattrs.get(k) == b"y" for k in _OPAQUE_XATTRS)


def _walk_entry(root: bytes, rel: bytes, links: dict[tuple[int, int], bytes],
                where: str) -> Iterator[bytes]:
    path = os.path.join(root, rel)
    st = os.lstat(path)
    mode = st.st_mode
    parent, _, base = rel.rpartition(b"/")
    if stat.S_ISCHR(mode) and st.st_rdev == 0:
        yield _whiteout((parent + b"/" if parent else b"") + f.WHITEOUT_PREFIX.encode() + base, st)
        return
    xattrs = _xattrs(path)
    if stat.S_ISDIR(mode):
        yield _header(rel + b"/", st, f.TYPE_DIR, xattrs)
        if _is_opaque(xattrs):
            yield _whiteout(rel + b"/" + f.OPAQUE_MARKER.encode(), st, mtime=0)
        for child in sorted(os.listdir(path)):
            yield from _walk_entry(root, rel + b"/" + child, links, where)
        return
    if st.st_nlink > 1 and not stat.S_ISDIR(mode):
        first = links.setdefault((st.st_dev, st.st_ino), rel)
        if first != rel:
            yield _header(rel, st, f.TYPE_LINK, xattrs, linkname=first)
            return
    if stat.S_ISREG(mode):
        yield _header(rel, st, f.TYPE_REG, xattrs, size=st.st_size)
        yield from _file_content(root, rel, st.st_size, None, where)
        if st.st_size % f.BLOCK:
            yield bytes(f.BLOCK - st.st_size % f.BLOCK)
    elif stat.S_ISLNK(mode):
        yield _header(rel, st, f.TYPE_SYMLINK, xattrs, linkname=os.readlink(path))
    elif stat.S_ISCHR(mode):
        yield _header(rel, st, f.TYPE_CHAR, xattrs)
    elif stat.S_ISBLK(mode):
        yield _header(rel, st, f.TYPE_BLOCK, xattrs)
    elif stat.S_ISFIFO(mode):
        yield _header(rel, st, f.TYPE_FIFO, xattrs)
    # sockets cannot be represented in a tar and are left out, as tar does


def tar_from_diff_dir(diff_dir: Path, where: str) -> Iterator[bytes]:
    """A tar equivalent to the layer whose unpacked files are `diff_dir` (overlay layout)."""
    root = os.fsencode(diff_dir)
    links: dict[tuple[int, int], bytes] = {}
    try:
        for child in sorted(os.listdir(root)):
            yield from _walk_entry(root, child, links, where)
    except OSError as exc:
        raise SourceError(f"{where}: cannot read {diff_dir}: {exc.strerror}") from exc
    yield bytes(2 * f.BLOCK)
