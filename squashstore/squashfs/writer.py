"""The native squashfs 4.0 writer: file content streamed in, a finished image out.

`SquashWriter` owns one image being written and the superblock; the tables are written by
one module each, as libsquashfs splits its writer, over the byte layouts of
`squashfs/format.py` that the reader uses too: file content (blocks, deduplication,
fragments, compression on threads) by `datawriter.py`; the inode table (children-first,
root last, basic or extended forms by mksquashfs's rules) by `inodewriter.py`; directory
listings with headers and indexes by `dirwriter.py`; the id and xattr tables by
`idtable.py` and `xattrwriter.py`; metadata blocks and lookup tables by `metawriter.py`.
`finish(root)` appends the tables in the order the kernel checks (inodes, directories,
fragments, export, ids, xattrs), writes the superblock, pads to 4 KiB, and fsyncs and
renames the file into place atomically. `SquashOptions` and `parse_size` describe the
image to write.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, BinaryIO

from squashstore.atomic import PARTIAL_SUFFIX, fsync_dir
from squashstore.squashfs import format as fmt
from squashstore.squashfs.compress import WRITABLE, CodecError, codec_for
from squashstore.squashfs.dataworker import ProcessDataWriter, WorkerUnavailable
from squashstore.squashfs.datawriter import DataWriter, FileData, fragment_table
from squashstore.squashfs.inodewriter import InodeWriter, TreeInfo, scan
from squashstore.squashfs.metawriter import WriterError, clamp32, write_lookup_table
from squashstore.tree import Inode

if TYPE_CHECKING:
    from squashstore.tar.split import DiffFile

__all__ = [
    "FileData",
    "SquashOptions",
    "SquashWriter",
    "WriteSummary",
    "WriterError",
    "parse_size",
]


@dataclass(frozen=True)
class SquashOptions:
    """How to write an image."""

    compression: str = "zstd"
    """gzip, xz, lz4, zstd or none."""
    level: int | None = None
    """None = the codec's mksquashfs default (gzip 9, xz preset 6, zstd 15, lz4 normal)."""
    block_size: int = 128 * 1024
    """A power of two from 4 KiB to 1 MiB."""
    jobs: int = 0
    """Compression threads; 0 = all cores."""
    export_table: bool = True
    xattrs: bool = True
    mtime: int | None = None
    """Superblock time; None = SOURCE_DATE_EPOCH if set, else the newest mtime in the tree."""


@dataclass(frozen=True)
class WriteSummary:
    """What `SquashWriter.finish` wrote."""

    files: int
    """Regular files in the tree (a hard-linked file counts once)."""
    bytes_in: int
    """Content bytes of those files."""
    bytes_out: int
    """Size of the image file."""
    seconds: float


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*$")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes from ``131072``, ``128K``, ``128k``, ``1M``, ``1MiB``; `WriterError` if not."""
    match = _SIZE_RE.match(text)
    if not match:
        raise WriterError(f"invalid size {text!r} (examples: 131072, 128K, 1M)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _check_options(options: SquashOptions) -> int:
    """Validates `options`; returns the block log."""
    if options.compression not in WRITABLE:
        raise WriterError(
            f"unknown compression {options.compression!r} (choose {', '.join(WRITABLE)})"
        )
    size = options.block_size
    log = size.bit_length() - 1
    if size <= 0 or size != 1 << log or not fmt.MIN_BLOCK_LOG <= log <= fmt.MAX_BLOCK_LOG:
        raise WriterError(f"block size must be a power of two from 4K to 1M, not {size}")
    if options.jobs < 0:
        raise WriterError(f"jobs must be 0 (all cores) or more, not {options.jobs}")
    return log


def _default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _name_of(file: BinaryIO | None) -> str:
    name = getattr(file, "name", "")
    return name if isinstance(name, str) else ""


# --- the writer ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where each table starts (the superblock's pointers)."""

    inode_table: int
    directory_table: int
    fragment_table: int
    export_table: int
    id_table: int
    xattr_table: int


class SquashWriter:
    """Writes one squashfs image; use as a context manager, call `finish` in it.

    With `worker` (and more than one job), file content is written by a worker process
    (`dataworker.py`) while the caller keeps streaming: the same image, on two cores. With
    `tar` too, the caller gives whole tree entries to `add_entry` and the worker also makes
    their canonical tar (`tarstream.TarStream`): its digest and size (`tar_result`) and its
    tar-split (into `tar_split`). `writes_tar` says whether the worker runs.
    """

    def __init__(
        self,
        dest: Path,
        options: SquashOptions,
        worker: bool = False,
        tar: bool = False,
        tar_split: BinaryIO | None = None,
    ) -> None:
        self._started = time.monotonic()
        self._dest = Path(dest)
        self._options = options
        self._block_log = _check_options(options)
        self._block_size = options.block_size
        try:
            self._codec = codec_for(options.compression, options.level, None, self._block_size)
        except CodecError as exc:
            raise WriterError(str(exc)) from None
        self._compress_meta = options.compression != "none"
        self._opts_block = self._codec.options_block()
        try:
            fd, tmp = tempfile.mkstemp(
                prefix=f".{self._dest.name}.", suffix=PARTIAL_SUFFIX, dir=self._dest.parent
            )
        except OSError as exc:
            raise WriterError(f"cannot write in {self._dest.parent}: {exc.strerror}") from None
        self._tmp: Path | None = Path(tmp)
        self._out: BinaryIO = os.fdopen(fd, "w+b")
        start = fmt.SUPERBLOCK_SIZE
        self._out.write(bytes(fmt.SUPERBLOCK_SIZE))
        if self._opts_block is not None:
            self._out.write(fmt.metadata_header(len(self._opts_block), False) + self._opts_block)
            start += 2 + len(self._opts_block)
        jobs = options.jobs or _default_jobs()
        self._finished = False
        self._tar = tar
        self._data: DataWriter | ProcessDataWriter
        if worker and jobs > 1:
            try:
                self._out.flush()
                self._data = ProcessDataWriter(
                    self._out.fileno(), start, options.compression, options.level, jobs,
                    self._dest, self._block_size, tar,
                    None if tar_split is None else tar_split.fileno(),
                    _name_of(tar_split),
                )
            except WorkerUnavailable:  # e.g. a process limit: the same image, one process
                self._data = DataWriter(
                    self._out, start, self._codec, jobs, self._dest, self._block_size
                )
            except BaseException:
                self._out.close()
                self._tmp.unlink(missing_ok=True)
                raise
        else:
            self._data = DataWriter(
                self._out, start, self._codec, jobs, self._dest, self._block_size
            )

    # context manager

    def __enter__(self) -> SquashWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._finished:
            self.abort()

    def abort(self) -> None:
        """Stop and remove the temporary file; the destination is left untouched."""
        self._finished = True
        self._data.close()
        if not self._out.closed:
            self._out.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    # content

    def add_file(self, stream: BinaryIO, size: int, sparse: bool = False,
                 again: Callable[[], bytes] | None = None) -> object:
        """Read exactly `size` bytes of one file's content; return its handle.

        All-zero blocks are never stored. `sparse` says the source file has holes: then,
        as mksquashfs does for files sparse on disk, the inode reports those blocks as
        sparse (an extended inode whose stat shows fewer blocks). `again`: the sha256 of
        the same content read again from its source, if it can be (`DataWriter.add_file`).
        """
        if self._finished:
            raise WriterError("add_file after finish or abort")
        if size < 0:
            raise WriterError(f"negative file size {size}")
        if again is None or isinstance(self._data, ProcessDataWriter):
            return self._data.add_file(stream, size, sparse)
        return self._data.add_file(stream, size, sparse, again)

    def add_bytes(self, data: bytes, again: Callable[[], bytes] | None = None) -> object:
        """`add_file` of content already read (`DataWriter.add_bytes` for a fragment)."""
        if isinstance(self._data, DataWriter) and len(data) < self._block_size \
                and not self._finished:
            return self._data.add_bytes(data, again)
        return self.add_file(io.BytesIO(data), len(data), again=again)

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def writes_tar(self) -> bool:
        """True when `add_entry` is there: a worker makes the canonical tar."""
        return isinstance(self._data, ProcessDataWriter) and self._tar

    def add_entry(
        self, path: str, inode: Inode, link_to: str | None, content: IO[bytes] | None,
        source: DiffFile | None = None,
    ) -> object | None:
        """One entry of the tree in tar order (see `writes_tar`); its content's handle.
        With `source`, the content is read from that file instead of `content`."""
        if self._finished:
            raise WriterError("add_entry after finish or abort")
        assert isinstance(self._data, ProcessDataWriter) and self._tar
        return self._data.add_entry(path, inode, link_to, content, source)

    def tar_result(self) -> tuple[str, int]:
        """(``sha256:`` digest, size) of the canonical tar, once `finish` returned."""
        assert isinstance(self._data, ProcessDataWriter) and self._tar
        return self._data.tar_digest, self._data.tar_size

    # the image

    def finish(self, root: Inode) -> WriteSummary:
        """Write inodes, directories and tables for `root`; fsync; rename into place."""
        if self._finished:
            raise WriterError("finish after finish or abort")
        try:
            summary = self._finish(root)
        except OSError as exc:
            self.abort()
            raise WriterError(f"writing {self._dest}: {exc.strerror}") from None
        except BaseException:
            self.abort()
            raise
        self._finished = True
        return summary

    def _finish(self, root: Inode) -> WriteSummary:
        position = self._data.finish()
        tables = InodeWriter(self._codec, self._compress_meta, self._options.xattrs)
        info = scan(root)
        root_ref = tables.write_inodes(info)
        out = self._out
        out.seek(position)
        layout = self._write_tables(out, position, tables)
        bytes_used = out.tell()
        pad = -bytes_used % fmt.PAD_TO
        out.write(bytes(pad))
        superblock = fmt.Superblock(
            magic=fmt.MAGIC,
            inode_count=len(info.order),
            mtime=clamp32(self._image_mtime(info)),
            block_size=self._block_size,
            fragment_count=len(self._data.fragment_entries),
            compressor=self._codec.compressor,
            block_log=self._block_log,
            flags=int(self._flags()),
            id_count=len(tables.ids),
            version_major=fmt.VERSION_MAJOR,
            version_minor=fmt.VERSION_MINOR,
            root_inode=root_ref,
            bytes_used=bytes_used,
            id_table=layout.id_table,
            xattr_id_table=layout.xattr_table,
            inode_table=layout.inode_table,
            directory_table=layout.directory_table,
            fragment_table=layout.fragment_table,
            export_table=layout.export_table,
        )
        out.seek(0)
        out.write(superblock.pack())
        self._commit()
        files, bytes_in = tables.file_totals
        return WriteSummary(
            files=files,
            bytes_in=bytes_in,
            bytes_out=bytes_used + pad,
            seconds=time.monotonic() - self._started,
        )

    def _write_tables(self, out: BinaryIO, position: int, tables: InodeWriter) -> _Layout:
        """Appends every table at `position` in the order the kernel checks."""
        codec, compress = self._codec, self._compress_meta
        inode_table = position
        blob = tables.inodes.finish()
        out.write(blob)
        position += len(blob)
        directory_table = position
        blob = tables.dirs.table.finish()
        out.write(blob)
        position += len(blob)
        frag_bytes = fragment_table(self._data.fragment_entries)
        fragment_table_at, position = write_lookup_table(
            out, position, frag_bytes, codec, compress
        )
        export_table = fmt.INVALID_BLK
        if self._options.export_table:
            export_table, position = write_lookup_table(
                out, position, tables.export_table(), codec, compress
            )
        id_table, position = write_lookup_table(out, position, tables.ids.table(), codec, compress)
        xattr_table, position = tables.xattrs.write(out, position)
        return _Layout(
            inode_table, directory_table, fragment_table_at, export_table, id_table, xattr_table
        )

    def _flags(self) -> fmt.Flag:
        """The superblock flags mksquashfs 4.5.1 sets for the same options."""
        flags = fmt.Flag.DUPLICATES
        if self._options.export_table:
            flags |= fmt.Flag.EXPORTABLE
        if not self._options.xattrs:
            flags |= fmt.Flag.NO_XATTRS
        if self._opts_block is not None:
            flags |= fmt.Flag.COMPRESSOR_OPTIONS
        if not self._compress_meta:  # -noI -noD -noF -noX
            flags |= (
                fmt.Flag.UNCOMPRESSED_INODES
                | fmt.Flag.UNCOMPRESSED_DATA
                | fmt.Flag.UNCOMPRESSED_FRAGMENTS
                | fmt.Flag.UNCOMPRESSED_XATTRS
            )
        return flags

    def _commit(self) -> None:
        """fsync the temporary file, give it its final mode and rename it into place."""
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        assert self._tmp is not None
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self._dest)
        self._tmp = None
        fsync_dir(self._dest.parent)

    def _image_mtime(self, info: TreeInfo) -> int:
        if self._options.mtime is not None:
            return self._options.mtime
        epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
        if epoch:
            try:
                return int(epoch)
            except ValueError:
                raise WriterError(f"SOURCE_DATE_EPOCH is not an integer: {epoch!r}") from None
        return max(node.mtime for node in info.order)
