"""Writing the id table (libsquashfs's ``id_table``): the uids and gids inodes refer to.

This module owns the mapping from a uid or gid to its index in the image's id table, in
first-use order, and the table's entries; squashfs allows at most 65536 distinct ids.
"""

from __future__ import annotations

from squashstore.squashfs import format as fmt
from squashstore.squashfs.metawriter import WriterError

MAX_IDS = 0x10000


class IdTable:
    """The ids of one image, indexed in the order inodes first use them."""

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}

    def index(self, value: int) -> int:
        """The index of uid or gid `value`, added if new."""
        index = self.ids.get(value)
        if index is None:
            if len(self.ids) >= MAX_IDS:
                raise WriterError("more than 65536 distinct uids and gids")
            if not 0 <= value <= 0xFFFF_FFFF:
                raise WriterError(f"uid or gid {value} does not fit in 32 bits")
            index = self.ids[value] = len(self.ids)
        return index

    def __len__(self) -> int:
        return len(self.ids)

    def table(self) -> bytes:
        """The id table's entries."""
        return b"".join(fmt.ID_ENTRY.pack(value) for value in self.ids)
