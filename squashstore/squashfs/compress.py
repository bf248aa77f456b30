"""Squashfs block codecs: one `Codec` per compressor, as mksquashfs writes and reads them.

Each codec compresses one data or metadata block (`compress`), decompresses one block while
refusing output larger than the caller's bound (`decompress(data, max_size)`, the guard
against decompression bombs), encodes and decodes its compressor options block exactly as
mksquashfs 4.5 writes it (absent when every option is the default, except lz4 whose options
block is mandatory), and says whether it releases the GIL so the writer may compress on
threads. gzip is a zlib stream, xz an xz stream with the CRC32 check and an LZMA2 dictionary
of the block size, lzma the legacy ``.lzma`` (alone) format (read side only), lz4 a raw
block, zstd one frame per block, lzo needs the optional ``python-lzo`` package. The "none"
codec writes gzip ids with every block stored raw. `codec_for` picks a codec by name or id.
"""

from __future__ import annotations

import lzma
import struct
import threading
import zlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from squashstore.image import SquashstoreError
from squashstore.squashfs.format import Compressor


class CodecError(SquashstoreError):
    """A block could not be decompressed (corrupt, truncated, larger than allowed) or a
    compressor or its options are not supported."""


class Codec(ABC):
    """Compresses and decompresses single squashfs blocks for one compressor."""

    name: ClassVar[str]
    compressor: ClassVar[Compressor]
    releases_gil: ClassVar[bool] = True
    """True when compress/decompress run without the GIL, so threads scale."""
    can_compress: ClassVar[bool] = True

    @abstractmethod
    def compress(self, data: bytes) -> bytes:
        """One compressed block (the caller stores `data` raw when this is not smaller)."""

    @abstractmethod
    def decompress(self, data: bytes, max_size: int) -> bytes:
        """One decompressed block; `CodecError` if corrupt or longer than `max_size`."""

    def options_block(self) -> bytes | None:
        """The payload of the compressor options metadata block, or None to write none."""
        return None


def _too_big(name: str, max_size: int) -> CodecError:
    return CodecError(f"{name} block decompresses to more than {max_size} bytes")


def _corrupt(name: str, exc: Exception | str) -> CodecError:
    return CodecError(f"corrupt {name} block: {exc}")


# --- gzip ------------------------------------------------------------------------------

_GZIP_OPTS = struct.Struct("<IHH")
GZIP_DEFAULT_LEVEL = 9
GZIP_DEFAULT_WINDOW = 15


class GzipCodec(Codec):
    """zlib streams; options {u32 level, u16 window bits, u16 strategies} when not default."""

    name = "gzip"
    compressor = Compressor.GZIP

    def __init__(self, level: int | None = None, window: int = GZIP_DEFAULT_WINDOW) -> None:
        self.level = GZIP_DEFAULT_LEVEL if level is None else level
        if not 1 <= self.level <= 9:
            raise CodecError(f"gzip level must be 1..9, not {self.level}")
        if not 8 <= window <= 15:
            raise CodecError(f"gzip window must be 8..15, not {window}")
        self.window = window

    def compress(self, data: bytes) -> bytes:
        if self.window == GZIP_DEFAULT_WINDOW:
            return zlib.compress(data, self.level)
        obj = zlib.compressobj(self.level, zlib.DEFLATED, self.window)
        return obj.compress(data) + obj.flush()

    def decompress(self, data: bytes, max_size: int) -> bytes:
        obj = zlib.decompressobj()
        try:
            out = obj.decompress(data, max(max_size, 1))
            if not obj.eof:
                # Stopped at the limit or out of input: one more byte tells which.
                if obj.decompress(obj.unconsumed_tail, 1) or len(out) > max_size:
                    raise _too_big(self.name, max_size)
                if not obj.eof:
                    raise _corrupt(self.name, "truncated stream")
        except zlib.error as exc:
            raise _corrupt(self.name, exc) from None
        return out

    def options_block(self) -> bytes | None:
        if self.level == GZIP_DEFAULT_LEVEL and self.window == GZIP_DEFAULT_WINDOW:
            return None
        return _GZIP_OPTS.pack(self.level, self.window, 0)

    @classmethod
    def from_options(cls, payload: bytes) -> GzipCodec:
        level, window, _strategies = _unpack_options(cls.name, _GZIP_OPTS, payload)
        return cls(level, window)


# --- xz and lzma -----------------------------------------------------------------------

_XZ_OPTS = struct.Struct("<II")
XZ_DEFAULT_PRESET = 6


def _lzma_decompress(name: str, dec: Any, data: bytes, max_size: int) -> bytes:
    try:
        out: bytes = dec.decompress(data, max_size)
        if not dec.eof:
            # Stopped at the limit or out of input: one more byte tells which.
            if not dec.needs_input and dec.decompress(b"", 1):
                raise _too_big(name, max_size)
            if not dec.eof:
                raise _corrupt(name, "truncated stream")
    except (lzma.LZMAError, EOFError) as exc:
        raise _corrupt(name, exc) from None
    return out


class XzCodec(Codec):
    """xz streams with CRC32 check, LZMA2 with a dictionary of the block size.

    Options {u32 dictionary size, u32 filter flags} are written only when the dictionary
    differs from the block size (mksquashfs's rule); the level is the xz preset (default 6,
    add 10 for the extreme variant) and is not recorded in the image.
    """

    name = "xz"
    compressor = Compressor.XZ

    def __init__(self, level: int | None, block_size: int, dict_size: int | None = None) -> None:
        preset = XZ_DEFAULT_PRESET if level is None else level
        if not 0 <= preset <= 19:
            raise CodecError(f"xz level must be 0..9 (10..19 for extreme), not {preset}")
        self.preset = preset % 10 | (lzma.PRESET_EXTREME if preset >= 10 else 0)
        self.block_size = block_size
        self.dict_size = block_size if dict_size is None else dict_size
        self._filters = [
            {"id": lzma.FILTER_LZMA2, "preset": self.preset, "dict_size": self.dict_size}
        ]

    def compress(self, data: bytes) -> bytes:
        return lzma.compress(
            data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=self._filters
        )

    def decompress(self, data: bytes, max_size: int) -> bytes:
        return _lzma_decompress(self.name, lzma.LZMADecompressor(lzma.FORMAT_XZ), data, max_size)

    def options_block(self) -> bytes | None:
        if self.dict_size == self.block_size:
            return None
        return _XZ_OPTS.pack(self.dict_size, 0)

    @classmethod
    def from_options(cls, payload: bytes, block_size: int) -> XzCodec:
        dict_size, _filters = _unpack_options(cls.name, _XZ_OPTS, payload)
        return cls(None, block_size, dict_size)


class LzmaCodec(Codec):
    """Legacy lzma (``.lzma`` alone format with a 13-byte header): read side only."""

    name = "lzma"
    compressor = Compressor.LZMA
    can_compress = False

    def compress(self, data: bytes) -> bytes:
        raise CodecError("writing lzma images is not supported; use xz")

    def decompress(self, data: bytes, max_size: int) -> bytes:
        dec = lzma.LZMADecompressor(lzma.FORMAT_ALONE)
        return _lzma_decompress(self.name, dec, data, max_size)


# --- lz4 -------------------------------------------------------------------------------

_LZ4_OPTS = struct.Struct("<II")
LZ4_LEGACY = 1
LZ4_HC_FLAG = 1
LZ4_HC_MIN_LEVEL = 3
LZ4_HC_DEFAULT_LEVEL = 12


class Lz4Codec(Codec):
    """Raw lz4 blocks (no stored size); HC when the level is 3 or more (mksquashfs -Xhc =
    level 12). Options {u32 version 1, u32 flags (1 = HC)} are always written."""

    name = "lz4"
    compressor = Compressor.LZ4

    def __init__(self, level: int | None = None, hc: bool | None = None) -> None:
        import lz4.block

        self._block = lz4.block
        if hc is None:
            hc = level is not None and level >= LZ4_HC_MIN_LEVEL
        if level is not None and not 0 <= level <= 16:
            raise CodecError(f"lz4 level must be 0..16, not {level}")
        self.hc = hc
        self.level = (level or LZ4_HC_DEFAULT_LEVEL) if hc else 0

    def compress(self, data: bytes) -> bytes:
        if self.hc:
            out = self._block.compress(
                data, mode="high_compression", compression=self.level, store_size=False
            )
        else:
            out = self._block.compress(data, store_size=False)
        return bytes(out)

    def decompress(self, data: bytes, max_size: int) -> bytes:
        try:
            return bytes(self._block.decompress(data, uncompressed_size=max_size))
        except self._block.LZ4BlockError as exc:
            raise CodecError(
                f"corrupt lz4 block or larger than {max_size} bytes: {exc}"
            ) from None

    def options_block(self) -> bytes | None:
        return _LZ4_OPTS.pack(LZ4_LEGACY, LZ4_HC_FLAG if self.hc else 0)

    @classmethod
    def from_options(cls, payload: bytes) -> Lz4Codec:
        version, flags = _unpack_options(cls.name, _LZ4_OPTS, payload)
        if version != LZ4_LEGACY:
            raise CodecError(f"unsupported lz4 format version {version}")
        return cls(None, hc=bool(flags & LZ4_HC_FLAG))


# --- zstd ------------------------------------------------------------------------------

_ZSTD_OPTS = struct.Struct("<I")
ZSTD_DEFAULT_LEVEL = 15


class ZstdCodec(Codec):
    """One zstd frame per block; options {u32 level} when the level is not 15."""

    name = "zstd"
    compressor = Compressor.ZSTD

    def __init__(self, level: int | None = None) -> None:
        import zstandard

        self._zstd = zstandard
        self.level = ZSTD_DEFAULT_LEVEL if level is None else level
        if not 1 <= self.level <= 22:
            raise CodecError(f"zstd level must be 1..22, not {self.level}")
        self._local = threading.local()

    def _compressor(self) -> Any:
        comp = getattr(self._local, "comp", None)
        if comp is None:
            comp = self._local.comp = self._zstd.ZstdCompressor(level=self.level)
        return comp

    def _decompressor(self) -> Any:
        dec = getattr(self._local, "dec", None)
        if dec is None:
            dec = self._local.dec = self._zstd.ZstdDecompressor()
        return dec

    def compress(self, data: bytes) -> bytes:
        return bytes(self._compressor().compress(data))

    def decompress(self, data: bytes, max_size: int) -> bytes:
        try:
            declared = self._zstd.frame_content_size(data)
        except self._zstd.ZstdError as exc:
            raise _corrupt(self.name, exc) from None
        if declared > max_size:
            raise _too_big(self.name, max_size)
        try:
            return bytes(self._decompressor().decompress(data, max_output_size=max_size))
        except self._zstd.ZstdError as exc:
            raise CodecError(f"corrupt zstd block or larger than {max_size} bytes: {exc}") from None

    def options_block(self) -> bytes | None:
        if self.level == ZSTD_DEFAULT_LEVEL:
            return None
        return _ZSTD_OPTS.pack(self.level)

    @classmethod
    def from_options(cls, payload: bytes) -> ZstdCodec:
        (level,) = _unpack_options(cls.name, _ZSTD_OPTS, payload)
        return cls(level)


# --- lzo -------------------------------------------------------------------------------

_LZO_OPTS = struct.Struct("<II")
LZO1X_999 = 4
LZO_DEFAULT_LEVEL = 8


class LzoCodec(Codec):
    """lzo1x blocks through the optional ``python-lzo`` package; read side only."""

    name = "lzo"
    compressor = Compressor.LZO
    can_compress = False

    def __init__(self) -> None:
        try:
            import lzo
        except ImportError:
            raise CodecError(
                "lzo images need the python-lzo package (pip install python-lzo)"
            ) from None
        self._lzo: Any = lzo

    def compress(self, data: bytes) -> bytes:
        raise CodecError("writing lzo images is not supported")

    def decompress(self, data: bytes, max_size: int) -> bytes:
        try:
            out = self._lzo.decompress(data, False, max_size)
        except self._lzo.error as exc:
            raise CodecError(f"corrupt lzo block or larger than {max_size} bytes: {exc}") from None
        return bytes(out)

    @classmethod
    def from_options(cls, payload: bytes) -> LzoCodec:
        _unpack_options(cls.name, _LZO_OPTS, payload)
        return cls()


# --- none ------------------------------------------------------------------------------


class NoneCodec(GzipCodec):
    """No compression: writes gzip's id with every block stored raw (mksquashfs -noI -noD
    -noF -noX); reads what gzip reads."""

    name = "none"

    def __init__(self) -> None:
        super().__init__(None)

    def compress(self, data: bytes) -> bytes:
        return data

    def options_block(self) -> bytes | None:
        return None


# --- choosing --------------------------------------------------------------------------

WRITABLE = ("gzip", "xz", "lz4", "zstd", "none")
"""Compressor names the writer accepts."""

_NAMES = {c.name.lower(): c.value for c in Compressor} | {"none": 0}


def _unpack_options(name: str, layout: struct.Struct, payload: bytes) -> tuple[int, ...]:
    if len(payload) < layout.size:
        raise CodecError(f"{name} compressor options block is {len(payload)} bytes, too short")
    return layout.unpack_from(payload)


def compressor_id(name_or_id: str | int) -> int:
    """The compressor id for a name (``none`` is 0) or a validated id."""
    if isinstance(name_or_id, int):
        if name_or_id in _NAMES.values():
            return name_or_id
        raise CodecError(f"unknown squashfs compressor id {name_or_id}")
    try:
        return _NAMES[name_or_id.lower()]
    except KeyError:
        known = ", ".join(WRITABLE)
        raise CodecError(f"unknown compression {name_or_id!r} (choose {known})") from None


def codec_for(
    name_or_id: str | int,
    level: int | None = None,
    options_block: bytes | None = None,
    block_size: int = 128 * 1024,
) -> Codec:
    """The codec for a compressor name or superblock id.

    With `options_block` (a reader passing the image's options payload) the options come
    from it and `level` is ignored; else `level` (None = mksquashfs's default) applies.
    """
    cid = compressor_id(name_or_id)
    if cid == 0:
        return NoneCodec()
    comp = Compressor(cid)
    if options_block is not None:
        return _from_options(comp, options_block, block_size)
    if comp is Compressor.GZIP:
        return GzipCodec(level)
    if comp is Compressor.XZ:
        return XzCodec(level, block_size)
    if comp is Compressor.LZ4:
        return Lz4Codec(level)
    if comp is Compressor.ZSTD:
        return ZstdCodec(level)
    if comp is Compressor.LZMA:
        return LzmaCodec()
    return LzoCodec()


def _from_options(comp: Compressor, payload: bytes, block_size: int) -> Codec:
    if comp is Compressor.GZIP:
        return GzipCodec.from_options(payload)
    if comp is Compressor.XZ:
        return XzCodec.from_options(payload, block_size)
    if comp is Compressor.LZ4:
        return Lz4Codec.from_options(payload)
    if comp is Compressor.ZSTD:
        return ZstdCodec.from_options(payload)
    if comp is Compressor.LZO:
        return LzoCodec.from_options(payload)
    return LzmaCodec()
