"""The tar format's fixed facts: block size, type flags, header field offsets, PAX keys,
tar-split entry types and the OCI whiteout names, defined once for the reader, the header
encoder, the tar-split recorder and reader, and the layer merge."""

from __future__ import annotations

from zlib import adler32

BLOCK = 512
"""Size of a tar header and of the unit content is padded to."""
ZERO_BLOCK = bytes(BLOCK)
END_OF_ARCHIVE = bytes(2 * BLOCK)



def block_sum(block: bytes) -> int:
    """``sum(block)`` of a 512-byte header block (the tar checksum's sum), in C: the low half
    of zlib's Adler-32 is 1 + the byte sum modulo 65521, exact for 256 bytes (at most
    65,280). Iterating the block's bytes in Python cost more than the rest of a header."""
    view = memoryview(block)
    return (adler32(view[:256]) & 0xFFFF) + (adler32(view[256:]) & 0xFFFF) - 2


# Type flags (one byte), as Go's archive/tar names them.
TYPE_REG = b"0"
TYPE_REGA = b"\x00"
TYPE_LINK = b"1"
TYPE_SYMLINK = b"2"
TYPE_CHAR = b"3"
TYPE_BLOCK = b"4"
TYPE_DIR = b"5"
TYPE_FIFO = b"6"
TYPE_CONT = b"7"
TYPE_XHEADER = b"x"
TYPE_XGLOBAL = b"g"
TYPE_GNU_SPARSE = b"S"
TYPE_GNU_LONGNAME = b"L"
TYPE_GNU_LONGLINK = b"K"

HEADER_ONLY_TYPES = frozenset((TYPE_LINK, TYPE_SYMLINK, TYPE_CHAR, TYPE_BLOCK, TYPE_DIR,
                               TYPE_FIFO))
"""Types whose size field never announces content (Go's isHeaderOnlyType)."""

MAGIC_USTAR = b"ustar\x00"
VERSION_USTAR = b"00"
MAGIC_GNU = b"ustar "
VERSION_GNU = b" \x00"
TRAILER_STAR = b"tar\x00"

MAX_SPECIAL_FILE = 1 << 20
"""Largest PAX header or GNU long name/link Go's reader accepts (maxSpecialFileSize)."""

# PAX record keys.
PAX_PATH = "path"
PAX_LINKPATH = "linkpath"
PAX_SIZE = "size"
PAX_UID = "uid"
PAX_GID = "gid"
PAX_UNAME = "uname"
PAX_GNAME = "gname"
PAX_MTIME = "mtime"
PAX_ATIME = "atime"
PAX_CTIME = "ctime"
PAX_XATTR = "SCHILY.xattr."
PAX_SPARSE_OFFSET = "GNU.sparse.offset"
PAX_SPARSE_NUMBYTES = "GNU.sparse.numbytes"
PAX_SPARSE_MAP = "GNU.sparse.map"
PAX_SPARSE_NUMBLOCKS = "GNU.sparse.numblocks"
PAX_SPARSE_NAME = "GNU.sparse.name"
PAX_SPARSE_SIZE = "GNU.sparse.size"
PAX_SPARSE_REALSIZE = "GNU.sparse.realsize"
PAX_SPARSE_MAJOR = "GNU.sparse.major"
PAX_SPARSE_MINOR = "GNU.sparse.minor"

# OCI layer whiteouts.
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

# vbatts/tar-split entry types.
SPLIT_FILE = 1
SPLIT_SEGMENT = 2

QUOTE_LIMIT = 200
"""At most this many characters of a name are quoted in an error line."""


def quote(name: str) -> str:
    """`name` quoted for an error line, cut to `QUOTE_LIMIT` characters."""
    if len(name) <= QUOTE_LIMIT:
        return repr(name)
    return repr(name[:QUOTE_LIMIT]) + f"... ({len(name)} characters)"
