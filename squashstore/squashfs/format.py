"""The squashfs 4.0 on-disk format: constants, record layouts and reference helpers.

This module owns every byte layout of the format and nothing else: the superblock, the
inode header and the fixed part of each inode type (basic and extended), directory headers,
entries and index entries, fragment, export, id and xattr table records, the xattr key and
value headers, the flag bits and compressor ids, the device-number encoding, and the
helpers for metadata references (``block << 16 | offset``) and data size words. Records are
small frozen dataclasses with `pack()` and `unpack(buf, offset)` built on `struct`
(little-endian); variable-length tails (names, block lists, symlink targets) are documented
on each record and handled by the writer and the reader. No I/O and no compression here.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

MAGIC = 0x73717368
VERSION_MAJOR = 4
VERSION_MINOR = 0
SUPERBLOCK_SIZE = 96
METADATA_SIZE = 8192
"""Largest uncompressed payload of one metadata block."""
METADATA_UNCOMPRESSED = 0x8000
"""Bit of a metadata block's u16 header: the block is stored raw."""
DATA_UNCOMPRESSED = 1 << 24
"""Bit of a data block's or fragment's u32 size word: the block is stored raw."""
DATA_SIZE_MASK = DATA_UNCOMPRESSED - 1
INVALID_BLK = 0xFFFF_FFFF_FFFF_FFFF
"""A table position that is absent (export table, xattr table)."""
INVALID_FRAG = 0xFFFF_FFFF
"""A file's fragment index when it has no fragment."""
INVALID_XATTR = 0xFFFF_FFFF
"""An extended inode's xattr index when it has no xattrs."""
NAME_MAX = 256
"""Longest name a directory entry can hold, in bytes."""
DIR_HEADER_MAX_ENTRIES = 256
"""Most entries one directory header may count."""
DIR_INODE_DELTA_MIN = -32768
DIR_INODE_DELTA_MAX = 32767
BASIC_DIR_MAX_SIZE = 0xFFFF
"""A basic directory's u16 `file_size` (listing length + 3) must not exceed this."""
DIR_SIZE_EXTRA = 3
"""A directory's `file_size` is its listing length plus this (for ``.`` and ``..``)."""
BASIC_FILE_MAX = 0xFFFF_FFFF
"""A basic file's size and start position must not exceed this."""
MIN_BLOCK_LOG = 12
MAX_BLOCK_LOG = 20
PAD_TO = 4096
"""mksquashfs pads the image to a multiple of this; `bytes_used` excludes the padding."""


class Compressor(enum.IntEnum):
    """Compressor ids of the superblock."""

    GZIP = 1
    LZMA = 2
    LZO = 3
    XZ = 4
    LZ4 = 5
    ZSTD = 6


class Flag(enum.IntFlag):
    """Superblock flag bits."""

    UNCOMPRESSED_INODES = 0x0001
    UNCOMPRESSED_DATA = 0x0002
    CHECK = 0x0004
    UNCOMPRESSED_FRAGMENTS = 0x0008
    NO_FRAGMENTS = 0x0010
    ALWAYS_FRAGMENTS = 0x0020
    DUPLICATES = 0x0040
    EXPORTABLE = 0x0080
    UNCOMPRESSED_XATTRS = 0x0100
    NO_XATTRS = 0x0200
    COMPRESSOR_OPTIONS = 0x0400
    UNCOMPRESSED_IDS = 0x0800


class InodeType(enum.IntEnum):
    """Inode type numbers: 1-7 basic, 8-14 the extended form of the same kind."""

    DIR = 1
    FILE = 2
    SYMLINK = 3
    BLKDEV = 4
    CHRDEV = 5
    FIFO = 6
    SOCKET = 7
    LDIR = 8
    LFILE = 9
    LSYMLINK = 10
    LBLKDEV = 11
    LCHRDEV = 12
    LFIFO = 13
    LSOCKET = 14

    @property
    def basic(self) -> InodeType:
        """The basic type of this kind (what directory entries carry)."""
        return InodeType(self - 7) if self > 7 else self

    @property
    def extended(self) -> InodeType:
        """The extended type of this kind."""
        return InodeType(self + 7) if self <= 7 else self

    @property
    def is_extended(self) -> bool:
        return self > 7


class XattrType(enum.IntEnum):
    """Xattr key prefixes by their on-disk id."""

    USER = 0
    TRUSTED = 1
    SECURITY = 2


XATTR_VALUE_OOL = 0x100
"""Bit of an xattr key's type: the value record holds a u64 reference to the real value."""
XATTR_PREFIXES: dict[XattrType, str] = {
    XattrType.USER: "user.",
    XattrType.TRUSTED: "trusted.",
    XattrType.SECURITY: "security.",
}


def split_xattr_name(name: str) -> tuple[XattrType, bytes] | None:
    """The (prefix type, name without prefix) of a full xattr name; None if not storable."""
    for kind, prefix in XATTR_PREFIXES.items():
        if name.startswith(prefix):
            return kind, name[len(prefix) :].encode("utf-8", "surrogateescape")
    return None


# --- references, size words, devices ---------------------------------------------------


def make_ref(block: int, offset: int) -> int:
    """A metadata reference: position of the block relative to its table, offset inside."""
    return (block << 16) | offset


def ref_block(ref: int) -> int:
    """The metadata block position (relative to its table) of a reference."""
    return ref >> 16


def ref_offset(ref: int) -> int:
    """The offset inside the uncompressed metadata block of a reference."""
    return ref & 0xFFFF


def metadata_header(length: int, compressed: bool) -> bytes:
    """The u16 header of a metadata block whose stored payload is `length` bytes."""
    return struct.pack("<H", length if compressed else length | METADATA_UNCOMPRESSED)


def parse_metadata_header(value: int) -> tuple[int, bool]:
    """(stored length, compressed) of a metadata block's u16 header."""
    return value & ~METADATA_UNCOMPRESSED & 0xFFFF, not value & METADATA_UNCOMPRESSED


def size_word(stored: int, compressed: bool) -> int:
    """The u32 size word of a data block or fragment stored in `stored` bytes."""
    return stored if compressed else stored | DATA_UNCOMPRESSED


RDEV_MAJOR_MAX = 0xFFF
RDEV_MINOR_MAX = 0xFFFFF
"""Largest device numbers the 32-bit encoding holds."""


def encode_rdev(major: int, minor: int) -> int:
    """The u32 device number squashfs stores (the kernel's old 32-bit encoding)."""
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFF_FFFF


def decode_rdev(rdev: int) -> tuple[int, int]:
    """(major, minor) of a stored device number."""
    return (rdev >> 8) & 0xFFF, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)


def block_count(file_size: int, block_size: int, has_fragment: bool) -> int:
    """Number of entries in a regular file's block list."""
    if has_fragment:
        return file_size // block_size
    return (file_size + block_size - 1) // block_size


# --- records ---------------------------------------------------------------------------


class _Record:
    """Base of the fixed-size records: packs and unpacks its fields in declaration order."""

    __slots__: tuple[str, ...] = ()
    STRUCT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self.STRUCT.pack(*(getattr(self, name) for name in self.__slots__))

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        return cls(*cls.STRUCT.unpack_from(buf, offset))

    @classmethod
    def byte_size(cls) -> int:
        return cls.STRUCT.size


@dataclass(frozen=True, slots=True)
class Superblock(_Record):
    """The 96-byte superblock at position 0."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<5I6H8Q")
    magic: int
    inode_count: int
    mtime: int
    block_size: int
    fragment_count: int
    compressor: int
    block_log: int
    flags: int
    id_count: int
    version_major: int
    version_minor: int
    root_inode: int
    bytes_used: int
    id_table: int
    xattr_id_table: int
    inode_table: int
    directory_table: int
    fragment_table: int
    export_table: int


@dataclass(frozen=True, slots=True)
class InodeHeader(_Record):
    """The 16 bytes every inode starts with; `inode_type` selects the body that follows."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<4H2I")
    inode_type: int
    mode: int
    """Permission bits only, ``0o7777`` (mksquashfs stores no type bits; readers must
    take the type from `inode_type`)."""
    uid_index: int
    gid_index: int
    mtime: int
    inode_number: int


@dataclass(frozen=True, slots=True)
class DirInode(_Record):
    """Basic directory body (type 1)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<2I2HI")
    start_block: int
    """Position of the listing's first metadata block, relative to the directory table."""
    nlink: int
    file_size: int
    """Listing length + 3 (u16)."""
    offset: int
    parent_inode: int


@dataclass(frozen=True, slots=True)
class LDirInode(_Record):
    """Extended directory body (type 8); followed by `index_count` `DirIndex` records."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<4I2HI")
    nlink: int
    file_size: int
    start_block: int
    parent_inode: int
    index_count: int
    offset: int
    xattr: int


@dataclass(frozen=True, slots=True)
class DirIndex(_Record):
    """An extended directory's index entry; followed by `name_size + 1` name bytes.

    `index` is the byte offset of a directory header inside the listing, `start_block` the
    position (relative to the directory table) of the metadata block holding that header,
    and the name is that header's first entry name.
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<3I")
    index: int
    start_block: int
    name_size: int


@dataclass(frozen=True, slots=True)
class FileInode(_Record):
    """Basic regular file body (type 2); followed by the u32 block size list."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<4I")
    start_block: int
    fragment: int
    offset: int
    file_size: int


@dataclass(frozen=True, slots=True)
class LFileInode(_Record):
    """Extended regular file body (type 9); followed by the u32 block size list."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<3Q4I")
    start_block: int
    file_size: int
    sparse: int
    """Bytes saved by sparse (all-zero, not stored) blocks."""
    nlink: int
    fragment: int
    offset: int
    xattr: int


@dataclass(frozen=True, slots=True)
class SymlinkInode(_Record):
    """Symlink body (types 3 and 10); followed by `target_size` target bytes, then for
    type 10 a u32 xattr index."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<2I")
    nlink: int
    target_size: int


@dataclass(frozen=True, slots=True)
class DevInode(_Record):
    """Basic block/char device body (types 4, 5)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<2I")
    nlink: int
    rdev: int


@dataclass(frozen=True, slots=True)
class LDevInode(_Record):
    """Extended block/char device body (types 11, 12)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<3I")
    nlink: int
    rdev: int
    xattr: int


@dataclass(frozen=True, slots=True)
class IpcInode(_Record):
    """Basic fifo/socket body (types 6, 7)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<I")
    nlink: int


@dataclass(frozen=True, slots=True)
class LIpcInode(_Record):
    """Extended fifo/socket body (types 13, 14)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<2I")
    nlink: int
    xattr: int


SYMLINK_XATTR = struct.Struct("<I")
"""The u32 xattr index after an extended symlink's target."""
BLOCK_SIZE_ENTRY = struct.Struct("<I")
"""One entry of a regular file's block list."""

INODE_BODY: dict[InodeType, type[_Record]] = {
    InodeType.DIR: DirInode,
    InodeType.FILE: FileInode,
    InodeType.SYMLINK: SymlinkInode,
    InodeType.BLKDEV: DevInode,
    InodeType.CHRDEV: DevInode,
    InodeType.FIFO: IpcInode,
    InodeType.SOCKET: IpcInode,
    InodeType.LDIR: LDirInode,
    InodeType.LFILE: LFileInode,
    InodeType.LSYMLINK: SymlinkInode,
    InodeType.LBLKDEV: LDevInode,
    InodeType.LCHRDEV: LDevInode,
    InodeType.LFIFO: LIpcInode,
    InodeType.LSOCKET: LIpcInode,
}
"""The fixed body that follows the `InodeHeader` for each inode type."""


@dataclass(frozen=True, slots=True)
class DirHeader(_Record):
    """A directory listing's run header; followed by `count + 1` `DirEntry` records."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<3I")
    count: int
    """Number of entries minus one."""
    start_block: int
    """Position (relative to the inode table) of the metadata block of the run's inodes."""
    inode_number: int
    """Base inode number the entries' deltas are relative to."""


@dataclass(frozen=True, slots=True)
class DirEntry(_Record):
    """A directory entry; followed by `name_size + 1` name bytes."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Hh2H")
    offset: int
    """Offset of the inode inside the header's metadata block."""
    inode_delta: int
    inode_type: int
    """Always the BASIC type, even for an extended inode."""
    name_size: int


@dataclass(frozen=True, slots=True)
class FragmentEntry(_Record):
    """One fragment table entry (16 bytes)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QII")
    start_block: int
    size: int
    """A data size word (bit 24 = stored raw)."""
    unused: int = 0


@dataclass(frozen=True, slots=True)
class XattrIdEntry(_Record):
    """One xattr id table entry (16 bytes): where an inode's key/value list is."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QII")
    xattr: int
    """Metadata reference relative to the xattr key/value table start."""
    count: int
    size: int
    """Total on-disk bytes of the list's keys and values."""


@dataclass(frozen=True, slots=True)
class XattrTableHeader(_Record):
    """Header of the xattr id table (the superblock points here); followed by u64
    positions of the xattr id metadata blocks."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QII")
    kv_start: int
    """Absolute position of the first xattr key/value metadata block."""
    id_count: int
    unused: int = 0


@dataclass(frozen=True, slots=True)
class XattrKey(_Record):
    """An xattr key; followed by `name_size` name bytes (without the prefix)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<2H")
    xattr_type: int
    name_size: int


@dataclass(frozen=True, slots=True)
class XattrValue(_Record):
    """An xattr value header; followed by `value_size` bytes (8 for an OOL reference)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<I")
    value_size: int


ID_ENTRY = struct.Struct("<I")
"""One uid/gid table entry."""
EXPORT_ENTRY = struct.Struct("<Q")
"""One export table entry: the inode reference of inode number i + 1."""
TABLE_POINTER = struct.Struct("<Q")
"""One entry of the u64 block position array that follows a lookup table."""
FRAGMENT_ENTRY_SIZE = FragmentEntry.STRUCT.size
XATTR_ID_ENTRY_SIZE = XattrIdEntry.STRUCT.size
