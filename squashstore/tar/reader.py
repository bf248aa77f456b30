"""A streaming tar reader that reads a layer exactly as podman's parser does.

podman (containers/storage) reads layer tars with Go's ``archive/tar``; this reader follows
its rules (reader.go, format.go, strconv.go of Go 1.19), so a layer means here what it means
to podman:

- the format is told by the magic: GNU (``ustar  \\0``) keeps atime/ctime where ustar and
  PAX keep a name prefix (with Go's fallback for pre-1.8 Go writers), STAR has a shorter
  prefix, V7 has neither; the checksum may be the signed or the unsigned sum;
- numbers are strict: octal fields trimmed of spaces and NULs and then digits ``0-7`` only,
  base-256 fields within int64, PAX numbers decimal int64 (a PAX time ``s[.frac]``); any
  malformed number is ``invalid tar header``;
- the last of several GNU ``L``/``K`` headers and of several PAX ``x`` headers before one
  entry wins (a later ``x`` replaces the earlier one's records whole); a GNU long name
  wins over a PAX ``path``, ``GNU.sparse.name`` over both; a record with an empty value
  keeps the header's own field;
- only ``SCHILY.xattr.*`` records are extended attributes;
- a PAX global header (``g``) is returned as an entry of its own and changes nothing else;
- sparse files (PAX GNU sparse 0.0, 0.1, 1.0 and old GNU ``S``) are read expanded to
  their real size, holes as zeros that are never read from the stream; the map is
  validated as Go validates it;
- an empty stream, or one ending where a header would start (with or without the
  end-of-archive blocks, even inside the last entry's padding), is a normal end; a
  stream ending inside a header or content is ``unexpected EOF``.

Entry types are not judged here: what podman accepts is the layer merge's business.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import IO

from squashstore.tar import format as f

ERR_HEADER = "archive/tar: invalid tar header"
ERR_FIELD_TOO_LONG = "archive/tar: header field too long"
ERR_UNEXPECTED_EOF = "unexpected EOF"
ERR_MISSING_DATA = "archive/tar: sparse file references non-existent data"
ERR_UNREFERENCED_DATA = "archive/tar: sparse file contains unreferenced data"

_CHUNK = 1 << 20
_DECIMAL = re.compile(rb"[+-]?[0-9]+")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_ASCII = bytes(range(128))
_NOT_ASCII = bytes(range(128, 256))
_ZEROS: dict[int, bytes] = {}
_LAYOUT = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12s")
"""A ustar block field by field: name, mode, uid, gid, size, mtime, checksum, type, link
name, magic, version, user and group names, device numbers, prefix, the rest."""
_NUMBERS: dict[bytes, int] = {}
"""Numeric fields already parsed (raw bytes -> value): a layer repeats its modes, owners
and times, so most fields are found here without parsing (errors are never kept)."""
_NUMBERS_LIMIT = 1 << 16
_SPECIAL_TYPES = frozenset((f.TYPE_XHEADER, f.TYPE_XGLOBAL, f.TYPE_GNU_LONGNAME,
                            f.TYPE_GNU_LONGLINK, f.TYPE_GNU_SPARSE, f.TYPE_REGA))
"""Types `TarReader.next` must do more for than return the header."""


class TarError(Exception):
    """A stream Go's archive/tar refuses; the message starts with Go's own error text."""


def _zeros(n: int) -> bytes:
    """`n` zero bytes, shared for the usual read sizes so holes allocate nothing."""
    block = _ZEROS.get(n)
    if block is None:
        block = bytes(n)
        if len(_ZEROS) < 64:
            _ZEROS[n] = block
    return block


def _bad(why: str) -> TarError:
    return TarError(f"{ERR_HEADER} ({why})")


@dataclass(slots=True)
class Header:
    """One entry as Go's `tar.Reader.Next` returns it (names decoded with surrogateescape)."""

    typeflag: bytes
    name: str
    linkname: str
    size: int
    """Logical content size (a sparse file's real size)."""
    mode: int
    uid: int
    gid: int
    mtime: int
    """Seconds, rounded down (as ``st_mtime`` of the extracted file)."""
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes]
    sparse: tuple[tuple[int, int], ...] | None = None
    """For a sparse file: its data extents (offset, length); the rest are holes."""


# --- numbers (Go's parser type in strconv.go) ----------------------------------------------


def _string(field: bytes) -> bytes:
    end = field.find(b"\x00")
    return field if end < 0 else field[:end]


def _octal(field: bytes, what: str) -> int:
    digits = field.strip(b" \x00")
    if not digits:
        return 0
    digits = _string(digits)
    if digits.translate(None, b"01234567"):
        raise _bad(f"{what} field {digits[:20]!r} is not octal")
    return int(digits, 8)


def _numeric(field: bytes, what: str) -> int:
    """A numeric header field: base-256 when the top bit is set, else octal."""
    if field and field[0] & 0x80:
        negative = bool(field[0] & 0x40)
        raw = bytes(c ^ 0xFF for c in field) if negative else field
        value = int.from_bytes(bytes((raw[0] & 0x7F,)) + raw[1:], "big")
        if value >> 63:
            raise _bad(f"{what} field overflows")
        return ~value if negative else value
    return _octal(field, what)


def _decimal(value: bytes, what: str) -> int:
    """Go's strconv.ParseInt(value, 10, 64)."""
    if not _DECIMAL.fullmatch(value):
        raise _bad(f"{what} {value[:40]!r} is not a decimal number")
    number = int(value)
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise _bad(f"{what} {value[:40]!r} is out of range")
    return number


def _pax_time(value: bytes, what: str) -> int:
    """Go's parsePAXTime, as whole seconds rounded down."""
    seconds, dot, fraction = value.partition(b".")
    secs = _decimal(seconds, what)
    if not dot or not fraction:
        return secs
    if fraction.translate(None, b"0123456789"):
        raise _bad(f"{what} {value[:40]!r} is not a time")
    nanos = int(fraction[:9].ljust(9, b"0"))
    if seconds.startswith(b"-") and nanos:
        return secs - 1  # time.Unix(secs, -nanos), rounded down
    return secs


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


# --- PAX records ---------------------------------------------------------------------------


def parse_pax(data: bytes) -> dict[bytes, bytes]:
    """The records of a PAX header (Go's parsePAX, with the sparse 0.0 offset/numbytes
    pairs joined into ``GNU.sparse.map``)."""
    records: dict[bytes, bytes] = {}
    sparse: list[bytes] = []
    rest = data
    while rest:
        size_field, space, _ = rest.partition(b" ")
        if not space:
            raise _bad("PAX record without a length")
        if not _DECIMAL.fullmatch(size_field):
            raise _bad("PAX record length is not a number")
        n = int(size_field)
        if n < 5 or n > len(rest) or n > _INT64_MAX:
            raise _bad("PAX record length out of range")
        body_start = len(size_field) + 1
        if n - body_start <= 0:
            raise _bad("PAX record length out of range")
        record, newline, rest = rest[body_start:n - 1], rest[n - 1:n], rest[n:]
        if newline != b"\n":
            raise _bad("PAX record does not end in a newline")
        key, equals, value = record.partition(b"=")
        if not equals or not key:
            raise _bad("PAX record without a key")
        if key in (b"path", b"linkpath", b"uname", b"gname"):
            if b"\x00" in value:
                raise _bad(f"PAX {key.decode()} holds a NUL byte")
        elif b"\x00" in key:
            raise _bad("PAX key holds a NUL byte")
        if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            expected = b"GNU.sparse.offset" if len(sparse) % 2 == 0 else b"GNU.sparse.numbytes"
            if key != expected or b"," in value:
                raise _bad("GNU sparse 0.0 records out of order")
            sparse.append(value)
        else:
            records[key] = value
    if sparse:
        records[b"GNU.sparse.map"] = b",".join(sparse)
    return records


def _validate_sparse(extents: list[tuple[int, int]], size: int) -> bool:
    """Go's validateSparseEntries."""
    if size < 0:
        return False
    previous_end = 0
    for offset, length in extents:
        if offset < 0 or length < 0 or offset > _INT64_MAX - length:
            return False
        if offset + length > size or previous_end > offset:
            return False
        previous_end = offset + length
    return True


# --- the reader ----------------------------------------------------------------------------


class TarReader:
    """Reads `stream` (a tar) entry by entry: `next()`, then `read()` the entry's content."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._remaining = 0
        """Physical content bytes of the current entry not yet read."""
        self._pad = 0
        self._sparse: list[tuple[int, int]] | None = None
        """Extents left of the current sparse entry: (offset, length) of data."""
        self._pos = 0
        self._size = 0
        """Logical position and size of the current entry."""

    # -- raw reading ------------------------------------------------------------------
    def _read_full(self, n: int) -> bytes:
        """Up to `n` bytes; fewer only at the end of the stream."""
        data = self._stream.read(n)
        if len(data) == n or not data:
            return data
        parts = [data]
        got = len(data)
        while got < n:
            more = self._stream.read(n - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def _physical(self, n: int) -> bytes:
        """Exactly `n` bytes of the current entry's content; truncation is an error."""
        data = self._read_full(n)
        if len(data) != n:
            raise TarError(ERR_UNEXPECTED_EOF)
        self._remaining -= n
        return data

    def _discard(self, n: int) -> None:
        while n:
            got = len(self._read_full(min(n, _CHUNK)))
            if not got:
                raise TarError(ERR_UNEXPECTED_EOF)
            n -= got

    # -- entries ----------------------------------------------------------------------
    def next(self) -> Header | None:
        """The next entry, or None at the end of the archive (Go's Reader.Next)."""
        self._sparse = None
        pax: dict[bytes, bytes] | None = None
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            if (self._remaining or self._pad) and not self._skip_rest():
                return None  # Go: the stream ending inside the padding ends the archive
            read = self._read_header()
            if read is None:
                return None
            hdr, block = read
            kind = hdr.typeflag
            if kind not in _SPECIAL_TYPES and not pax and not long_name and not long_link:
                # The usual entry: nothing to merge into it, no sparse map to read.
                size = hdr.size
                if kind in f.HEADER_ONLY_TYPES:
                    self._remaining = self._pad = 0
                elif size < 0:
                    raise _bad(f"negative size {size}")
                else:
                    self._remaining, self._pad = size, -size % f.BLOCK
                self._pos, self._size = 0, size
                return hdr
            if hdr.typeflag not in f.HEADER_ONLY_TYPES and hdr.size < 0:
                raise _bad(f"negative size {hdr.size}")
            self._start_content(hdr)
            if kind in (f.TYPE_XHEADER, f.TYPE_XGLOBAL):
                pax = parse_pax(self._special())
                if kind == f.TYPE_XGLOBAL:
                    path = pax.get(b"path")
                    if path:
                        hdr.name = _name(path)
                    hdr.size, hdr.xattrs = 0, {}
                    return hdr
                continue
            if kind in (f.TYPE_GNU_LONGNAME, f.TYPE_GNU_LONGLINK):
                value = _string(self._special())
                if kind == f.TYPE_GNU_LONGNAME:
                    long_name = value
                else:
                    long_link = value
                continue
            if pax:
                self._merge_pax(hdr, pax)
            if long_name:
                hdr.name = _name(long_name)
            if long_link:
                hdr.linkname = _name(long_link)
            if hdr.typeflag == f.TYPE_REGA:
                hdr.typeflag = f.TYPE_DIR if hdr.name.endswith("/") else f.TYPE_REG
            # The PAX size may have changed the content length.
            if hdr.typeflag not in f.HEADER_ONLY_TYPES and hdr.size < 0:
                raise _bad(f"negative size {hdr.size}")
            self._start_content(hdr)
            self._sparse_file(hdr, block, pax or {})
            self._pos, self._size = 0, hdr.size
            return hdr

    def _start_content(self, hdr: Header) -> None:
        """Go's handleRegularFile: the content length and padding the header announces."""
        content = 0 if hdr.typeflag in f.HEADER_ONLY_TYPES else hdr.size
        self._remaining, self._pad = content, -content % f.BLOCK

    def _skip_rest(self) -> bool:
        """Skip what is left of the current entry and its padding; False when the stream
        ends inside the padding."""
        if self._remaining:
            self._discard(self._remaining)
            self._remaining = 0
        if self._pad:
            pad, self._pad = self._pad, 0
            return len(self._read_full(pad)) == pad
        return True

    def _special(self) -> bytes:
        """The content of a PAX or GNU long-name header (at most 1 MiB, as Go reads it)."""
        if self._remaining > f.MAX_SPECIAL_FILE:
            raise TarError(ERR_FIELD_TOO_LONG)
        return self._physical(self._remaining)

    def _read_header(self) -> tuple[Header, bytes] | None:
        block = self._read_full(f.BLOCK)
        if not block:
            return None
        if len(block) != f.BLOCK:
            raise TarError(ERR_UNEXPECTED_EOF)
        if block == f.ZERO_BLOCK:
            second = self._read_full(f.BLOCK)
            if not second or second == f.ZERO_BLOCK:
                return None
            if len(second) != f.BLOCK:
                raise TarError(ERR_UNEXPECTED_EOF)
            raise _bad("a zero block followed by data")
        return parse_header(block), block

    def _merge_pax(self, hdr: Header, pax: dict[bytes, bytes]) -> None:
        """Go's mergePAX: records override the header's fields; empty values are ignored."""
        xattrs: dict[str, bytes] = {}
        for key, value in pax.items():
            if not value:
                continue
            if key == b"path":
                hdr.name = _name(value)
            elif key == b"linkpath":
                hdr.linkname = _name(value)
            elif key == b"uid":
                hdr.uid = _decimal(value, "PAX uid")
            elif key == b"gid":
                hdr.gid = _decimal(value, "PAX gid")
            elif key == b"mtime":
                hdr.mtime = _pax_time(value, "PAX mtime")
            elif key in (b"atime", b"ctime"):
                _pax_time(value, "PAX " + key.decode())
            elif key == b"size":
                hdr.size = _decimal(value, "PAX size")
            elif key.startswith(b"SCHILY.xattr."):
                xattrs[_name(key[13:])] = value
        if xattrs:
            hdr.xattrs = xattrs

    # -- sparse files -----------------------------------------------------------------
    def _sparse_file(self, hdr: Header, block: bytes, pax: dict[bytes, bytes]) -> None:
        """Go's handleSparseFile: read the sparse map, if the entry has one."""
        if hdr.typeflag == f.TYPE_GNU_SPARSE:
            extents = self._old_gnu_sparse(hdr, block)
        else:
            found = self._pax_sparse(hdr, pax)
            if found is None:
                return
            extents = found
        if hdr.typeflag in f.HEADER_ONLY_TYPES or not _validate_sparse(extents, hdr.size):
            raise _bad(f"invalid sparse map of {f.quote(hdr.name)}")
        data = sum(length for _, length in extents)
        if data > self._remaining:
            raise TarError(ERR_MISSING_DATA)
        if data < self._remaining:
            raise TarError(ERR_UNREFERENCED_DATA)
        self._sparse = [e for e in extents if e[1]]
        hdr.sparse = tuple(extents)

    def _pax_sparse(self, hdr: Header, pax: dict[bytes, bytes]) -> list[tuple[int, int]] | None:
        major, minor = pax.get(b"GNU.sparse.major"), pax.get(b"GNU.sparse.minor")
        if major == b"0" and minor in (b"0", b"1"):
            is_1_0 = False
        elif major == b"1" and minor == b"0":
            is_1_0 = True
        elif major or minor:
            return None  # an unknown version: a plain file
        elif pax.get(b"GNU.sparse.map"):
            is_1_0 = False
        else:
            return None
        name = pax.get(b"GNU.sparse.name")
        if name:
            hdr.name = _name(name)
        size = pax.get(b"GNU.sparse.size") or pax.get(b"GNU.sparse.realsize")
        if size:
            hdr.size = _decimal(size, "GNU.sparse size")
        if is_1_0:
            return self._sparse_map_1_0()
        return _sparse_map_0_1(pax)

    def _sparse_map_1_0(self) -> list[tuple[int, int]]:
        """The 1.0 map at the start of the content: decimal lines, in whole blocks."""
        buffer = b""
        tokens: list[bytes] = []

        def feed(count: int) -> None:
            nonlocal buffer
            while len(tokens) < count:
                if self._remaining < f.BLOCK:
                    raise TarError(ERR_UNEXPECTED_EOF)
                buffer += self._physical(f.BLOCK)
                *lines, buffer = buffer.split(b"\n")
                tokens.extend(lines)

        feed(1)
        count_token = tokens.pop(0)
        if not _DECIMAL.fullmatch(count_token) or int(count_token) < 0 \
                or int(count_token) > _INT64_MAX // 2:
            raise _bad("GNU sparse 1.0 map has a bad entry count")
        count = int(count_token)
        feed(2 * count)
        extents = []
        for i in range(count):
            extents.append((_decimal(tokens[2 * i], "sparse offset"),
                            _decimal(tokens[2 * i + 1], "sparse length")))
        return extents

    def _old_gnu_sparse(self, hdr: Header, block: bytes) -> list[tuple[int, int]]:
        """Go's readOldGNUSparseMap: entries in the header, then in extension blocks."""
        if _format(block) != "gnu":
            raise _bad("sparse entry in a non-GNU header")
        hdr.size = _numeric(block[483:495], "realsize")
        extents: list[tuple[int, int]] = []
        area, count, extended_at = block[386:482], 4, 482
        while True:
            for i in range(count):
                entry = area[24 * i:24 * i + 24]
                if entry[0] == 0:
                    break
                extents.append((_numeric(entry[:12], "sparse offset"),
                                _numeric(entry[12:], "sparse length")))
            flag = (area if extended_at == 504 else block)[extended_at]
            if not flag:
                return extents
            area = self._read_full(f.BLOCK)
            if len(area) != f.BLOCK:
                raise TarError(ERR_UNEXPECTED_EOF)
            count, extended_at = 21, 504

    # -- content ----------------------------------------------------------------------
    def take_reference(self) -> object | None:
        """The current entry's content as a reference instead of bytes, when none of it was
        read and the stream can give one (``take_reference(size)``: a rebuilt layer whose
        files stay in their diff directory); the content then counts as read. None
        otherwise (a sparse entry, a stream of bytes only)."""
        remaining = self._remaining
        if not remaining or remaining != self._size or self._sparse is not None:
            return None
        take = getattr(self._stream, "take_reference", None)
        if take is None:
            return None
        ref: object | None = take(remaining)
        if ref is not None:
            self._remaining = 0
        return ref

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all with -1) of the current entry's content; b"" at its end."""
        if self._sparse is not None:
            if n >= 0:
                return self._read_sparse(n)
            return b"".join(iter(lambda: self._read_sparse(_CHUNK), b""))
        remaining = self._remaining
        if n < 0 or n > remaining:
            n = remaining
        if not n:
            return b""
        data = self._stream.read(n)
        if len(data) != n:
            data = self._complete(data, n)
        self._remaining = remaining - n
        return data

    def _complete(self, data: bytes, n: int) -> bytes:
        """`data`, a short read, completed to `n` bytes; truncation is an error."""
        if data:
            data += self._read_full(n - len(data))
        if len(data) != n:
            raise TarError(ERR_UNEXPECTED_EOF)
        return data

    def _read_sparse(self, n: int) -> bytes:
        left = self._size - self._pos
        if n < 0 or n > left:
            n = left
        if not n:
            return b""
        extents = self._sparse
        assert extents is not None
        if extents and self._pos >= extents[0][0]:
            offset, length = extents[0]
            take = min(n, offset + length - self._pos)
            data = self._physical(take)
            if self._pos + take == offset + length:
                extents.pop(0)
        else:
            hole_end = extents[0][0] if extents else self._size
            take = min(n, hole_end - self._pos)
            data = _zeros(take)
        self._pos += take
        return data


def _format(block: bytes) -> str:
    """Go's getFormat: ``unknown`` (bad checksum), ``v7``, ``ustar``, ``gnu`` or ``star``."""
    field = block[148:156]
    recorded = _string(field.strip(b" \x00"))
    if recorded.translate(None, b"01234567"):
        return "unknown"
    value = int(recorded, 8) if recorded else 0
    unsigned = f.block_sum(block) - sum(field) + 8 * 32
    if value != unsigned:
        high = len(block.translate(None, _NOT_ASCII)) - len(field.translate(None, _NOT_ASCII))
        if value != unsigned - 256 * high:
            return "unknown"
    magic = block[257:263]
    if magic == f.MAGIC_USTAR:
        return "star" if block[508:512] == f.TRAILER_STAR else "ustar"
    if magic == f.MAGIC_GNU and block[263:265] == f.VERSION_GNU:
        return "gnu"
    return "v7"


def _number(field: bytes, what: str) -> int:
    """`_numeric`, remembered in `_NUMBERS`."""
    value = _numeric(field, what)
    if len(_NUMBERS) >= _NUMBERS_LIMIT:
        _NUMBERS.clear()
    _NUMBERS[field] = value
    return value


def _checksum(field: bytes) -> int:
    """A checksum field's value (remembered), or -1 when it is not octal."""
    try:
        return _number(field, "checksum")
    except TarError:
        return -1


def parse_header(block: bytes) -> Header:
    """One 512-byte header block as Go's readHeader reads it.

    A ustar block whose checksum field was seen before (so is a valid octal number) is
    read field by field from one unpack, its numbers from `_NUMBERS`; anything else (GNU,
    STAR, V7, a first-seen checksum field, a signed checksum) takes the general path,
    which reads the same header for such a block."""
    (name, mode, uid, gid, size, mtime, checksum, typeflag, linkname, magic, _version,
     _uname, _gname, devmajor, devminor, prefix, _) = _LAYOUT.unpack(block)
    get = _NUMBERS.get
    if (checksum[0] & 0x80 or magic != f.MAGIC_USTAR or block[508:] == f.TRAILER_STAR
            or (v if (v := get(checksum)) is not None else _checksum(checksum))
            != f.block_sum(block) - sum(checksum) + 256):
        return _parse_header_general(block)
    end = name.find(b"\x00")
    if end >= 0:
        name = name[:end]
    end = prefix.find(b"\x00")
    if end:
        name = (prefix if end < 0 else prefix[:end]) + b"/" + name
    end = linkname.find(b"\x00")
    if end >= 0:
        linkname = linkname[:end]
    return Header(
        typeflag,
        name.decode("utf-8", "surrogateescape"),
        linkname.decode("utf-8", "surrogateescape"),
        v if (v := get(size)) is not None else _number(size, "size"),
        v if (v := get(mode)) is not None else _number(mode, "mode"),
        v if (v := get(uid)) is not None else _number(uid, "uid"),
        v if (v := get(gid)) is not None else _number(gid, "gid"),
        v if (v := get(mtime)) is not None else _number(mtime, "mtime"),
        v if (v := get(devmajor)) is not None else _number(devmajor, "devmajor"),
        v if (v := get(devminor)) is not None else _number(devminor, "devminor"),
        {},
    )


def _parse_header_general(block: bytes) -> Header:
    """`parse_header` for every kind of block."""
    fmt = _format(block)
    if fmt == "unknown":
        raise _bad("checksum mismatch")
    typeflag = block[156:157]
    name = _string(block[0:100])
    hdr = Header(
        typeflag=typeflag,
        name="",
        linkname=_name(_string(block[157:257])),
        size=_numeric(block[124:136], "size"),
        mode=_numeric(block[100:108], "mode"),
        uid=_numeric(block[108:116], "uid"),
        gid=_numeric(block[116:124], "gid"),
        mtime=_numeric(block[136:148], "mtime"),
        devmajor=0,
        devminor=0,
        xattrs={},
    )
    if fmt != "v7":
        hdr.devmajor = _numeric(block[329:337], "devmajor")
        hdr.devminor = _numeric(block[337:345], "devminor")
        prefix = b""
        if fmt == "ustar":
            prefix = _string(block[345:500])
        elif fmt == "star":
            prefix = _string(block[345:476])
            _numeric(block[476:488], "atime")
            _numeric(block[488:500], "ctime")
        else:  # GNU: atime and ctime where ustar has its prefix
            try:
                if block[345]:
                    _numeric(block[345:357], "atime")
                if block[357]:
                    _numeric(block[357:369], "ctime")
            except TarError:
                # A pre-Go1.8 writer's "GNU" header with a ustar prefix (golang.org/issue/12594)
                candidate = _string(block[345:500])
                if not candidate.translate(None, _ASCII):
                    prefix = candidate
        if prefix:
            name = prefix + b"/" + name
    hdr.name = _name(name)
    return hdr


def _sparse_map_0_1(pax: dict[bytes, bytes]) -> list[tuple[int, int]]:
    """Go's readGNUSparseMap0x1: ``GNU.sparse.numblocks`` pairs in ``GNU.sparse.map``."""
    count_field = pax.get(b"GNU.sparse.numblocks", b"")
    if not _DECIMAL.fullmatch(count_field):
        raise _bad("GNU sparse map has a bad entry count")
    count = int(count_field)
    if count < 0 or count > _INT64_MAX // 2:
        raise _bad("GNU sparse map has a bad entry count")
    parts = pax.get(b"GNU.sparse.map", b"").split(b",")
    if parts == [b""]:
        parts = []
    if len(parts) != 2 * count:
        raise _bad("GNU sparse map does not match its entry count")
    return [(_decimal(parts[i], "sparse offset"), _decimal(parts[i + 1], "sparse length"))
            for i in range(0, len(parts), 2)]
