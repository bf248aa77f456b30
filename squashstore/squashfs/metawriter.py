"""Writing metadata blocks and lookup tables (libsquashfs's ``meta_writer`` and
``write_table``), and the writer's one error.

This module owns the lowest layer of writing an image's tables: `MetadataWriter` collects
a table in memory as 8 KiB metadata blocks (each compressed unless that grows it) and
hands out references to what it holds; `write_lookup_table` appends a table of fixed-size
entries as metadata blocks followed by the u64 positions of those blocks (the fragment,
export, id and xattr id tables). `WriterError` is the one error every part of the writer
raises; `clamp32` fits a time into an on-disk u32.
"""

from __future__ import annotations

from typing import BinaryIO

from squashstore.image import SquashstoreError
from squashstore.squashfs import format as fmt
from squashstore.squashfs.compress import Codec


class WriterError(SquashstoreError):
    """The image cannot be written: bad options, an invalid tree, or an I/O failure."""


def clamp32(value: int) -> int:
    return min(max(value, 0), 0xFFFF_FFFF)


class MetadataWriter:
    """An in-memory metadata table: 8 KiB blocks, each compressed unless that grows it."""

    def __init__(self, codec: Codec, compress: bool) -> None:
        self._codec = codec
        self._compress = compress
        self.blob = bytearray()
        self._pending = bytearray()
        self.block_starts = [0]
        """Position (relative to the table) of each block started so far."""

    def tell_ref(self) -> int:
        """The reference of the next byte written."""
        return fmt.make_ref(len(self.blob), len(self._pending))

    def tell(self) -> int:
        """The uncompressed offset of the next byte written."""
        return (len(self.block_starts) - 1) * fmt.METADATA_SIZE + len(self._pending)

    def ref_of(self, uncompressed: int) -> int:
        """The reference of an uncompressed offset already written or about to be."""
        block, offset = divmod(uncompressed, fmt.METADATA_SIZE)
        return fmt.make_ref(self.block_starts[block], offset)

    def write(self, data: bytes | bytearray) -> None:
        self._pending += data
        while len(self._pending) >= fmt.METADATA_SIZE:
            self._flush(bytes(self._pending[: fmt.METADATA_SIZE]))
            del self._pending[: fmt.METADATA_SIZE]

    def finish(self) -> bytearray:
        if self._pending:
            self._flush(bytes(self._pending))
            self._pending.clear()
        return self.blob

    def _flush(self, chunk: bytes) -> None:
        packed = self._codec.compress(chunk) if self._compress else chunk
        if len(packed) < len(chunk):
            self.blob += fmt.metadata_header(len(packed), True) + packed
        else:
            self.blob += fmt.metadata_header(len(chunk), False) + chunk
        self.block_starts.append(len(self.blob))


def write_lookup_table(
    out: BinaryIO, position: int, data: bytes, codec: Codec, compress: bool, header: bytes = b""
) -> tuple[int, int]:
    """Writes a table's metadata blocks at `position`, then `header` and the u64 block
    positions.

    Returns (position of the header or pointer array, position after it).
    """
    table = MetadataWriter(codec, compress)
    table.write(data)
    blob = table.finish()
    out.write(blob)
    blocks = (len(data) + fmt.METADATA_SIZE - 1) // fmt.METADATA_SIZE
    pointers = b"".join(
        fmt.TABLE_POINTER.pack(position + start) for start in table.block_starts[:blocks]
    )
    start = position + len(blob)
    out.write(header + pointers)
    return start, start + len(header) + len(pointers)
