"""Tar header encoding: the canonical headers of squashstore's own tar streams.

`encode_header` writes one entry's header the way squashstore has always written it (the
bytes of Python 3.11's ``tarfile.TarInfo.tobuf(PAX_FORMAT, "utf-8", "surrogateescape")``
with empty user and group names): a ustar block, preceded by a PAX ``x`` header
(``././@PaxHeader``) when a name or link is not ASCII or too long for its field, a number
does not fit its octal field, or the entry has extended attributes (``SCHILY.xattr.*``,
sorted by name; ``hdrcharset=BINARY`` first when a value is not UTF-8). Those bytes are
part of every diff_id and tar-split squashstore ever recorded, so they are pinned here,
independent of the Python version, and tested against ``tarfile`` byte for byte.
"""

from __future__ import annotations

import struct

from squashstore.errors import SquashstoreError
from squashstore.tar import format as f

_NUL16 = bytes(16)
_NUL64 = bytes(64)
_NUL155 = bytes(155)
_USTAR_MAGIC = f.MAGIC_USTAR + f.VERSION_USTAR
_PAX_NAME = b"././@PaxHeader"
_LAYOUT = struct.Struct("100s8s8s8s12s12s8sc100s8s64s16s155s12s")
"""A ustar block field by field (name ... prefix, padding); struct pads each with NULs."""
_MODES = [b"%07o\x00" % mode for mode in range(0o10000)]
"""Every mode field, made once (an 8-byte octal field of the permission bits)."""
_MAX8, _MAX12 = 8 ** 7, 8 ** 11
"""The first values an 8-byte and a 12-byte octal field cannot hold."""
_DEVICE_TYPES = (f.TYPE_CHAR, f.TYPE_BLOCK)


class TarFieldError(SquashstoreError):
    """A value (a device number) that no header of the canonical tar can hold."""


def _octal(value: int, width: int) -> bytes:
    if not 0 <= value < 8 ** (width - 1):
        raise TarFieldError(f"number {value} does not fit a {width}-byte tar field")
    return b"%0*o\x00" % (width - 1, value)


def _text(value: str, width: int) -> bytes:
    raw = value.encode("ascii", "replace")[:width]
    return raw + bytes(width - len(raw))


def ustar_block(name: str, typeflag: bytes, mode: int = 0, uid: int = 0, gid: int = 0,
                size: int = 0, mtime: int = 0, linkname: str = "", devmajor: int = 0,
                devminor: int = 0) -> bytes:
    """One ustar header block (no prefix, empty user and group names)."""
    if typeflag in (f.TYPE_CHAR, f.TYPE_BLOCK):
        devices = _octal(devmajor, 8) + _octal(devminor, 8)
    else:
        devices = _NUL16
    block = b"".join((
        _text(name, 100), _octal(mode & 0o7777, 8), _octal(uid, 8), _octal(gid, 8),
        _octal(size, 12), _octal(mtime, 12), b"        ", typeflag, _text(linkname, 100),
        _USTAR_MAGIC, _NUL64, devices, _NUL155, bytes(12)))
    checksum = f.block_sum(block)  # the checksum field counts as eight spaces
    return block[:148] + b"%06o\x00" % checksum + block[155:]


def pax_records(records: dict[str, str]) -> bytes:
    """PAX records ``"LEN KEY=VALUE\\n"``; ``hdrcharset=BINARY`` first when a value holds
    bytes that are not UTF-8 (surrogate-escaped)."""
    binary = False
    for value in records.values():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            binary = True
            break
    out = [b"21 hdrcharset=BINARY\n"] if binary else []
    for key, value in records.items():
        k = key.encode("utf-8", "surrogateescape")
        v = value.encode("utf-8", "surrogateescape")
        length = len(k) + len(v) + 3
        n = p = 0
        while True:
            n = length + len(str(p))
            if n == p:
                break
            p = n
        out.append(b"%d %s=%s\n" % (p, k, v))
    return b"".join(out)


def encode_header(name: str, typeflag: bytes, *, mode: int = 0, uid: int = 0, gid: int = 0,
                  size: int = 0, mtime: int = 0, linkname: str = "", devmajor: int = 0,
                  devminor: int = 0, xattrs: dict[str, bytes] | None = None) -> bytes:
    """The header blocks of one entry (content and padding follow separately); a
    directory's name gets its trailing slash. `TarFieldError` names the entry when a
    number does not fit its field."""
    return encode_fields(name, typeflag, mode, uid, gid, size, mtime, linkname, devmajor,
                         devminor, xattrs)


def encode_fields(name: str, typeflag: bytes, mode: int, uid: int, gid: int, size: int,
                  mtime: int, linkname: str, devmajor: int, devminor: int,
                  xattrs: dict[str, bytes] | None) -> bytes:
    """`encode_header` with positional arguments (the canonical tar calls it per entry).

    The usual entry (ASCII names that fit their fields, numbers that fit theirs, no
    extended attributes) is one ustar block packed in one go; the rest take the general
    path, which writes the same bytes for the usual entry (tested against each other)."""
    if typeflag == f.TYPE_DIR and not name.endswith("/"):
        name += "/"
    if (not xattrs and len(name) <= 100 and len(linkname) <= 100 and name.isascii()
            and linkname.isascii() and 0 <= uid < _MAX8 and 0 <= gid < _MAX8
            and 0 <= size < _MAX12 and 0 <= mtime < _MAX12):
        if typeflag in _DEVICE_TYPES:
            try:
                devices = _octal(devmajor, 8) + _octal(devminor, 8)
            except TarFieldError as exc:
                raise TarFieldError(f"{name[:200]!r}: {exc}") from None
        else:
            devices = _NUL16
        block = _LAYOUT.pack(name.encode(), _MODES[mode & 0o7777], b"%07o\x00" % uid,
                             b"%07o\x00" % gid, b"%011o\x00" % size, b"%011o\x00" % mtime,
                             b"        ", typeflag, linkname.encode(), _USTAR_MAGIC, b"",
                             devices, b"", b"")
        return block[:148] + b"%06o\x00" % f.block_sum(block) + block[155:]
    try:
        return _encode_header(name, typeflag, mode=mode, uid=uid, gid=gid, size=size,
                              mtime=mtime, linkname=linkname, devmajor=devmajor,
                              devminor=devminor, xattrs=xattrs)
    except TarFieldError as exc:
        raise TarFieldError(f"{name[:200]!r}: {exc}") from None


def _encode_header(name: str, typeflag: bytes, *, mode: int, uid: int, gid: int,
                   size: int, mtime: int, linkname: str, devmajor: int, devminor: int,
                   xattrs: dict[str, bytes] | None) -> bytes:
    if typeflag == f.TYPE_DIR and not name.endswith("/"):
        name += "/"
    records = {f.PAX_XATTR + key: value.decode("utf-8", "surrogateescape")
               for key, value in sorted((xattrs or {}).items())}
    for key, value, width in ((f.PAX_PATH, name, 100), (f.PAX_LINKPATH, linkname, 100)):
        if key not in records and (not value.isascii() or len(value) > width):
            records[key] = value
    numbers = {"uid": uid, "gid": gid, "size": size, "mtime": mtime}
    for key, width in (("uid", 8), ("gid", 8), ("size", 12), ("mtime", 12)):
        number = numbers[key]
        if not 0 <= number < 8 ** (width - 1):
            numbers[key] = 0
            records.setdefault(key, str(number))
    block = ustar_block(name, typeflag, mode, numbers["uid"], numbers["gid"], numbers["size"],
                        numbers["mtime"], linkname, devmajor, devminor)
    if not records:
        return block
    data = pax_records(records)
    return (ustar_block(_PAX_NAME.decode(), f.TYPE_XHEADER, size=len(data)) + data
            + bytes(-len(data) % f.BLOCK) + block)
