"""Tar headers written by hand in the shapes real tar writers produce, for the tests.

`entry(...)` encodes one entry (its header blocks and padded content) in one of `SHAPES`:
PAX (an ``x`` header, optionally preceded by a decoy ``x`` header, or with a decoy
``path`` record before the real one, and a fractional mtime), GNU (magic ``ustar  \\0``,
atime and ctime set where ustar has its prefix, ``L``/``K`` headers for long names,
optionally a decoy ``L``/``K`` first), ustar (a long name split into prefix and name) and
v7. Go's archive/tar (podman's reader) reads every shape as the same entry: the last of
repeated headers wins. Independent of the code under test on purpose.
"""

from __future__ import annotations

SHAPES = ("pax", "pax-decoy-header", "pax-decoy-record", "gnu", "gnu-decoy", "ustar",
          "pax-sparse")

TYPES = {"file": b"0", "link": b"1", "symlink": b"2", "chr": b"3", "dir": b"5", "fifo": b"6",
         "whiteout": b"0", "opaque": b"0"}


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\x00"


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def header(name: bytes, typeflag: bytes, *, size: int = 0, mode: int = 0o644, uid: int = 0,
           gid: int = 0, mtime: int = 0, linkname: bytes = b"", magic: str = "ustar",
           prefix: bytes = b"", atime: int | None = None, ctime: int | None = None,
           devmajor: int = 0, devminor: int = 0, raw: dict[int, bytes] | None = None) -> bytes:
    """One 512-byte header block; `raw` overwrites fields by offset before the checksum."""
    block = bytearray(512)
    block[0:len(name[:100])] = name[:100]
    block[100:108] = _octal(mode, 8)
    block[108:116] = _octal(uid, 8)
    block[116:124] = _octal(gid, 8)
    block[124:136] = _octal(size, 12)
    block[136:148] = _octal(mtime, 12)
    block[156:157] = typeflag
    block[157:157 + len(linkname[:100])] = linkname[:100]
    if magic == "ustar":
        block[257:265] = b"ustar\x0000"
        block[345:345 + len(prefix)] = prefix
    elif magic == "gnu":
        block[257:265] = b"ustar  \x00"
        if atime is not None:
            block[345:357] = _octal(atime, 12)
        if ctime is not None:
            block[357:369] = _octal(ctime, 12)
    if magic != "v7":
        block[329:337] = _octal(devmajor, 8)
        block[337:345] = _octal(devminor, 8)
    for offset, value in (raw or {}).items():
        block[offset:offset + len(value)] = value
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}".encode() + b"\x00 "
    return bytes(block)


def pax_record(key: str | bytes, value: str | bytes) -> bytes:
    k = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
    v = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    body = b" " + k + b"=" + v + b"\n"
    n = len(body) + 1
    while len(str(n).encode() + body) != n:
        n += 1
    return str(n).encode() + body


def special(typeflag: bytes, data: bytes, name: bytes = b"././@PaxHeader",
            magic: str = "ustar") -> bytes:
    """A PAX (``x``, ``g``) or GNU long-name (``L``, ``K``) header with its data."""
    return header(name, typeflag, size=len(data), magic=magic) + _pad(data)


def entry(shape: str, name: str, kind: str, *, data: bytes = b"", target: str = "",
          mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int = 0,
          xattrs: dict[str, bytes] | None = None, devices: tuple[int, int] = (0, 0)) -> bytes:
    """`name` encoded in `shape`; the content padded to a block."""
    raw_name = name.encode("utf-8", "surrogateescape")
    raw_target = target.encode("utf-8", "surrogateescape")
    typeflag = TYPES[kind]
    size = len(data) if typeflag == b"0" else 0
    fields = {"size": size, "mode": mode, "uid": uid, "gid": gid, "mtime": mtime,
              "devmajor": devices[0], "devminor": devices[1]}
    out = b""
    records = b"".join(pax_record("SCHILY.xattr." + k, v) for k, v in (xattrs or {}).items())
    if shape == "pax-sparse" and kind == "file":
        # GNU sparse 1.0: leading zero bytes become a hole, the rest one data extent.
        start = len(data) - len(data.lstrip(b"\x00"))
        extents = [(start, len(data) - start)] if start < len(data) else []
        text = f"{len(extents)}\n".encode() + b"".join(
            f"{off}\n{length}\n".encode() for off, length in extents)
        body = text + bytes(-len(text) % 512) + data[start:]
        records += (pax_record("GNU.sparse.major", "1") + pax_record("GNU.sparse.minor", "0")
                    + pax_record("GNU.sparse.name", raw_name)
                    + pax_record("GNU.sparse.realsize", str(len(data))))
        fields["size"] = len(body)
        return (special(b"x", records)
                + header(b"GNUSparseFile.0/x", typeflag, **fields)  # type: ignore[arg-type]
                + _pad(body))
    if shape.startswith("pax"):
        if shape == "pax-decoy-header":
            out += special(b"x", pax_record("path", "decoy-" + name)
                           + pax_record("linkpath", "decoy"))
        if shape == "pax-decoy-record":
            records = pax_record("path", "decoy") + pax_record("linkpath", "decoy") + records
        records += pax_record("path", raw_name) + pax_record("mtime", f"{mtime}.75")
        if raw_target:
            records += pax_record("linkpath", raw_target)
        out += special(b"x", records)
        out += header(b"short-name", typeflag, linkname=b"short-target" if raw_target else b"",
                      **fields)  # type: ignore[arg-type]
    elif shape.startswith("gnu"):
        if records:
            out += special(b"x", records)
        if shape == "gnu-decoy":
            out += special(b"L", b"decoy-name\x00", b"././@LongLink", "gnu")
            out += special(b"K", b"decoy-target\x00", b"././@LongLink", "gnu")
        if len(raw_name) > 100 or shape == "gnu-decoy":
            out += special(b"L", raw_name + b"\x00", b"././@LongLink", "gnu")
        if len(raw_target) > 100 or (shape == "gnu-decoy" and raw_target):
            out += special(b"K", raw_target + b"\x00", b"././@LongLink", "gnu")
        out += header(raw_name, typeflag, linkname=raw_target, magic="gnu",
                      atime=0o13375561762, ctime=0o13375561763, **fields)  # type: ignore[arg-type]
    else:  # ustar: a long name split at a slash into prefix and name
        if records:
            out += special(b"x", records)
        prefix, short = b"", raw_name
        if len(raw_name) > 100:
            cut = raw_name.rfind(b"/", 0, 156)
            prefix, short = raw_name[:cut], raw_name[cut + 1:]
        out += header(short, typeflag, linkname=raw_target, prefix=prefix,
                      **fields)  # type: ignore[arg-type]
    return out + _pad(data)


def global_header() -> bytes:
    """A PAX global header whose records Go's reader (and so podman) ignores."""
    return special(b"g", pax_record("mtime", "5") + pax_record("uid", "77")
                   + pax_record("comment", "ignored"), b"pax_global_header")


def archive(*entries: bytes, end: bool = True) -> bytes:
    return b"".join(entries) + (bytes(1024) if end else b"")
