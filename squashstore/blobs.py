"""Opening a layer blob as a verified, uncompressed tar stream.

This module owns what every transport does with a layer blob once it has a raw byte stream:
recognising its compression (uncompressed, gzip, zstd), decompressing it with bounded memory
while it is read, hashing both the compressed bytes (the blob digest) and the uncompressed
bytes (the ``diff_id``), and, when the consumer has finished normally, reading the rest of the
stream and checking the digests and size the source promised. Any failure (corrupt or
truncated compression, digest or size mismatch) becomes a `SourceError` naming the layer.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Protocol, cast

import zstandard

from squashstore.image import SourceError

CHUNK = 1 << 20
"""Bytes read at a time when draining or copying."""

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OTHER_MAGICS = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x04\x22\x4d\x18": "lz4"}


class Compression:
    """Names of the compressions a layer blob may have."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


def sniff_compression(head: bytes) -> str:
    """The compression of a blob whose first bytes are `head` (at least 6 bytes if present)."""
    if head.startswith(GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(ZSTD_MAGIC):
        return Compression.ZSTD
    for magic, name in _OTHER_MAGICS.items():
        if head.startswith(magic):
            raise SourceError(f"{name} compressed layers are not supported")
    return Compression.NONE


def parse_digest(digest: str, what: str) -> tuple[str, str]:
    """``(algorithm, hex)`` of an ``algorithm:hex`` digest; `what` names it in errors."""
    algorithm, sep, value = digest.partition(":")
    if not sep or algorithm not in ("sha256", "sha512") or not _is_hex(value, algorithm):
        raise SourceError(f"{what}: invalid or unsupported digest {digest!r}")
    return algorithm, value


def _is_hex(value: str, algorithm: str) -> bool:
    length = 64 if algorithm == "sha256" else 128
    return len(value) == length and all(c in "0123456789abcdef" for c in value)


def digest_bytes(data: bytes, algorithm: str = "sha256") -> str:
    """The ``algorithm:hex`` digest of `data`."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def check_bytes(data: bytes, digest: str, what: str) -> None:
    """Raise `SourceError` unless `data` has `digest`."""
    algorithm, _ = parse_digest(digest, what)
    actual = digest_bytes(data, algorithm)
    if actual != digest:
        raise SourceError(f"{what}: digest mismatch (expected {digest}, got {actual})")


class _Watcher(Protocol):
    def update(self, data: bytes, /) -> None: ...


class ZstdFrames:
    """Follows the frame structure of a zstd stream as its bytes pass, to tell a complete
    stream from a truncated one (the decompressor's stream reader ends silently on either).

    Only headers are looked at: magic, frame header descriptor, block headers, skippable
    frames; block contents and checksums are skipped by length.
    """

    _ZSTD = 0xFD2FB528
    _FCS_SIZES = (0, 2, 4, 8)
    _DID_SIZES = (0, 1, 2, 4)

    def __init__(self) -> None:
        self._state = "magic"
        self._buf = b""
        self._skip = 0
        self._checksum = False
        self.frames = 0
        self.valid = True

    def _need(self) -> int:
        return {"magic": 4, "skippable": 4, "fhd": 1, "block": 3}[self._state]

    def update(self, data: bytes) -> None:
        i, end = 0, len(data)
        while i < end and self.valid:
            if self._skip:
                n = min(self._skip, end - i)
                self._skip -= n
                i += n
                continue
            take = min(self._need() - len(self._buf), end - i)
            self._buf += data[i:i + take]
            i += take
            if len(self._buf) == self._need():
                header, self._buf = self._buf, b""
                self._advance(int.from_bytes(header, "little"))

    def _advance(self, value: int) -> None:
        if self._state == "magic":
            if value == self._ZSTD:
                self._state = "fhd"
            elif value & 0xFFFFFFF0 == 0x184D2A50:
                self._state = "skippable"
            else:
                self.valid = False
        elif self._state == "skippable":
            self._skip, self._state = value, "magic"
        elif self._state == "fhd":
            single = bool(value & 0x20)
            fcs = self._FCS_SIZES[value >> 6] or (1 if single else 0)
            self._skip = (0 if single else 1) + self._DID_SIZES[value & 3] + fcs
            self._checksum = bool(value & 0x04)
            self._state = "block"
        else:  # block header: last flag, type, size
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3:
                self.valid = False
                return
            self._skip = 1 if kind == 1 else size
            if last:
                self._skip += 4 if self._checksum else 0
                self._state = "magic"
                self.frames += 1

    def complete(self) -> bool:
        """Whether the bytes so far end exactly after a frame."""
        return (self.valid and self.frames > 0 and self._state == "magic" and not self._buf
                and not self._skip)


class HashingReader(io.RawIOBase):
    """A raw reader that counts every byte read through it and hashes them with each of
    `algorithms` (none: only counting)."""

    def __init__(self, inner: BinaryIO, algorithms: Iterable[str] = ("sha256",),
                 watchers: Iterable[_Watcher] = ()) -> None:
        super().__init__()
        self._inner = inner
        self._hashes = {a: hashlib.new(a) for a in algorithms}
        self._watchers = tuple(watchers)
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._inner.read(len(buffer))
        if not data:
            return 0
        n = len(data)
        buffer[:n] = data
        for h in self._hashes.values():
            h.update(data)
        for w in self._watchers:
            w.update(data)
        self.count += n
        return n

    def digest(self, algorithm: str = "sha256") -> str:
        """``algorithm:hex`` of the bytes read so far."""
        return f"{algorithm}:{self._hashes[algorithm].hexdigest()}"


class IterReader(io.RawIOBase):
    """A raw reader over an iterator of byte chunks (for generated tar streams)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        super().__init__()
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Fills `buffer` from as many chunks as it takes (fewer bytes only at the end)."""
        filled, size = 0, len(buffer)
        while filled < size:
            if not self._pending:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._pending = memoryview(chunk)
                continue
            n = min(size - filled, len(self._pending))
            buffer[filled:filled + n] = self._pending[:n]
            self._pending = self._pending[n:]
            filled += n
        return filled


class _GuardedReader(io.RawIOBase):
    """Reads the decompressed stream, turning decompression failures into `SourceError`."""

    def __init__(self, inner: BinaryIO, describe: str) -> None:
        super().__init__()
        self._inner = inner
        self._describe = describe

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            data = self._inner.read(len(buffer))
        except EOFError as exc:
            raise SourceError(f"{self._describe}: blob is truncated ({exc})") from exc
        except (gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as exc:
            raise SourceError(f"{self._describe}: blob is corrupt ({exc})") from exc
        n = len(data)
        buffer[:n] = data
        return n


@dataclass(frozen=True)
class Expect:
    """What a source promised about one blob; empty strings and -1 mean 'not promised'."""

    describe: str
    """How errors name the blob (`Layer.describe()`)."""
    digest: str = ""
    """Digest of the blob as stored (possibly compressed)."""
    diff_id: str = ""
    """Digest of the uncompressed tar."""
    size: int = -1
    """Size in bytes of the blob as stored."""
    compression: str | None = None
    """Known compression, or None to recognise it from the first bytes."""


def _decompressor(raw: BinaryIO, compression: str) -> BinaryIO:
    if compression == Compression.GZIP:
        return cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="rb"))
    if compression == Compression.ZSTD:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return cast(BinaryIO, reader)
    return raw


def _drain(stream: BinaryIO) -> None:
    while stream.read(CHUNK):
        pass


def _algorithm(digest: str, what: str) -> set[str]:
    return {parse_digest(digest, what)[0]} if digest else set()


@contextmanager
def _naming(describe: str) -> Iterator[None]:
    """Prefixes `describe` to a `SourceError` that does not name the blob yet."""
    try:
        yield
    except SourceError as exc:
        if describe in str(exc):
            raise
        raise SourceError(f"{describe}: {exc}") from exc


@contextmanager
def open_verified(raw: BinaryIO, expect: Expect) -> Iterator[BinaryIO]:
    """The uncompressed stream of the blob `raw`; checks `expect` when read to its end.

    `raw` is closed when the context exits. Digests are checked only on a normal exit: the
    remaining bytes are read first, so a consumer may stop at the tar's end-of-archive.
    An uncompressed blob is hashed once for both its digest and its diff_id. Errors of the
    consumer pass through untouched.
    """
    try:
        with _naming(expect.describe):
            digest_alg = _algorithm(expect.digest, expect.describe)
            diff_alg = _algorithm(expect.diff_id, expect.describe)
            maybe_plain = expect.compression in (None, Compression.NONE)
            frames = ZstdFrames()
            blob = HashingReader(raw, digest_alg | (diff_alg if maybe_plain else set()),
                                 (frames,) if expect.compression in (None, Compression.ZSTD)
                                 else ())
            hashed_raw = io.BufferedReader(blob, CHUNK)
            compression = expect.compression
            if compression is None:
                compression = sniff_compression(hashed_raw.peek(8)[:8])
            stream: BinaryIO
            if compression == Compression.NONE:
                stream, tar = hashed_raw, blob
            else:
                guarded = _GuardedReader(_decompressor(hashed_raw, compression),
                                         expect.describe)
                tar = HashingReader(cast(BinaryIO, guarded), diff_alg)
                stream = io.BufferedReader(tar, CHUNK)
        yield stream
        with _naming(expect.describe):
            _drain(stream)
            _drain(hashed_raw)
            if compression == Compression.ZSTD and not frames.complete():
                raise SourceError(f"{expect.describe}: blob is truncated (incomplete zstd "
                                  "frame)")
            _check(expect, blob, tar)
    finally:
        raw.close()


def _check(expect: Expect, blob: HashingReader, tar: HashingReader) -> None:
    name = expect.describe
    if expect.size >= 0 and blob.count != expect.size:
        raise SourceError(f"{name}: blob is {blob.count} bytes, expected {expect.size} "
                          "(truncated or corrupt)")
    if expect.digest:
        actual = blob.digest(expect.digest.partition(":")[0])
        if actual != expect.digest:
            raise SourceError(f"{name}: blob digest mismatch (expected {expect.digest}, "
                              f"got {actual})")
    if expect.diff_id:
        actual = tar.digest(expect.diff_id.partition(":")[0])
        if actual != expect.diff_id:
            raise SourceError(f"{name}: uncompressed content does not match its diff_id "
                              f"(expected {expect.diff_id}, got {actual})")


def opener(open_raw: Callable[[], BinaryIO], expect: Expect
           ) -> Callable[[], AbstractContextManager[BinaryIO]]:
    """A `Layer.opener`: opens the raw blob with `open_raw` and verifies it against `expect`.

    `open_raw` may raise `OSError` or `SourceError`; either becomes a `SourceError` naming
    the blob.
    """

    def open_layer() -> AbstractContextManager[BinaryIO]:
        try:
            raw = open_raw()
        except OSError as exc:
            raise SourceError(f"{expect.describe}: cannot open blob: {exc}") from exc
        except SourceError as exc:
            raise SourceError(f"{expect.describe}: {exc}") from exc
        return open_verified(raw, expect)

    return open_layer
