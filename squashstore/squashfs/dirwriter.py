"""Writing the directory table (libsquashfs's ``dir_writer``): directory listings.

This module owns how one directory's entries become a listing: runs of entries under a
header (at most 256 per header, one inode block per header, inode numbers within a signed
16-bit delta of the header's), a new header wherever a listing crosses a metadata block
(and there an index point, name included, that an extended directory inode records), and
the listing's place in the directory table. The inode writer (`inodewriter.py`) writes
the directory's inode from the `Listing` it gets back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from squashstore.squashfs import format as fmt
from squashstore.squashfs.compress import Codec
from squashstore.squashfs.metawriter import MetadataWriter
from squashstore.tree import Inode

_ENTRY_SIZE = fmt.DirEntry.STRUCT.size
_DIR_HEADER = fmt.DirHeader.STRUCT
_HEADER_SIZE = _DIR_HEADER.size


@dataclass(frozen=True)
class Listing:
    """Where one directory's listing is in the directory table, and its index."""

    block: int
    offset: int
    file_size: int
    """The directory inode's size: the listing's length plus `DIR_SIZE_EXTRA`."""
    index_count: int
    index: bytes
    """The packed index records (empty when the listing fits one metadata block)."""


class DirWriter:
    """The directory table of one image."""

    def __init__(self, codec: Codec, compress: bool) -> None:
        self.table = MetadataWriter(codec, compress)

    def add(
        self,
        entries: list[tuple[bytes, Inode]],
        refs: Mapping[int, int],
        numbers: Mapping[int, int],
    ) -> Listing:
        """Writes the listing of sorted `entries`, whose inodes are already written
        (`refs` and `numbers` by `id(inode)`)."""
        listing, index = _listing(entries, refs, numbers)
        start = self.table.tell()
        listing_ref = self.table.tell_ref()
        self.table.write(listing)
        records = bytearray()
        for position, name in index:
            index_block = fmt.ref_block(self.table.ref_of(start + position))
            records += fmt.DirIndex(position, index_block, len(name) - 1).pack() + name
        return Listing(
            block=fmt.ref_block(listing_ref),
            offset=fmt.ref_offset(listing_ref),
            file_size=len(listing) + fmt.DIR_SIZE_EXTRA,
            index_count=len(index),
            index=bytes(records),
        )


def _listing(
    entries: list[tuple[bytes, Inode]], refs: Mapping[int, int], numbers: Mapping[int, int]
) -> tuple[bytearray, list[tuple[int, bytes]]]:
    """A directory's listing bytes and its index points (listing offset, first name)."""
    listing = bytearray()
    index: list[tuple[int, bytes]] = []
    count = 0
    count_at = 0
    base_block = -1
    base_number = 0
    index_at = 0
    pack_entry = fmt.DirEntry.STRUCT.pack
    for raw, child in entries:
        key = id(child)
        ref = refs[key]
        number = numbers[key]
        block = ref >> 16
        delta = number - base_number
        grown = len(listing) + _ENTRY_SIZE + len(raw) - index_at > fmt.METADATA_SIZE
        if (
            count == 0
            or count == fmt.DIR_HEADER_MAX_ENTRIES
            or block != base_block
            or grown
            or not fmt.DIR_INODE_DELTA_MIN <= delta <= fmt.DIR_INODE_DELTA_MAX
        ):
            if count:
                _patch_count(listing, count_at, count, base_block, base_number)
                if grown:
                    index.append((len(listing), raw))
                    index_at = len(listing)
            count_at = len(listing)
            listing += bytes(_HEADER_SIZE)
            count = 0
            base_block = block
            base_number = number
            delta = 0
        # The entry's type is the basic one, which is the tree's `Kind` value.
        listing += pack_entry(ref & 0xFFFF, delta, child.kind, len(raw) - 1)
        listing += raw
        count += 1
    if count:
        _patch_count(listing, count_at, count, base_block, base_number)
    return listing, index


def _patch_count(listing: bytearray, at: int, count: int, block: int, number: int) -> None:
    _DIR_HEADER.pack_into(listing, at, count - 1, block, number)
