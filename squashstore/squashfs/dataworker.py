"""File content written by a second process: the writer's data path on the other core.

This module owns the split of one image's writing across two processes. The parent's
`ProcessDataWriter` stands in for `DataWriter`: `add_file` only copies each file's bytes,
behind an 8-byte header (size, sparse bit), into a pipe in large writes (which release the
GIL); a fresh interpreter (``python -I -c`` bootstrap, never a fork of the threaded parent)
runs the very same `DataWriter` over those bytes (block splitting, zero blocks, the dedup
hash, fragments, compression on its own threads) and writes the blocks into the parent's
temporary image file through an inherited descriptor. At `finish` the worker drains, and
sends back the end position, the fragment table and every file's record in column arrays;
the parent fills its handles, so the inode table (written by the parent) is byte-identical
to a single-process write. The worker dies with its parent (pipe EOF, ``PR_SET_PDEATHSIG``);
if the worker dies, the parent's next write or `finish` raises one `WriterError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import subprocess
import sys
from array import array
from pathlib import Path
from typing import BinaryIO

from squashstore.image import LayerError
from squashstore.squashfs import format as fmt
from squashstore.squashfs.datawriter import DataWriter, FileData, read_exact
from squashstore.squashfs.metawriter import WriterError

_HEADER = struct.Struct("<Q")
_SPARSE = 1 << 63
_END = (1 << 64) - 1
_RESULT = struct.Struct("<QII")  # end position, fragment entries, files
_SMALL = 256 << 10
"""Files up to this size are copied into the send buffer; larger ones are sent in chunks."""
_FLUSH = 1 << 20
"""Send buffer size (also the chunk size of large files and the pipe's capacity)."""
_F_SETPIPE_SZ = 1031
_PR_SET_PDEATHSIG = 1

_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from squashstore.squashfs.dataworker import main; sys.exit(main(sys.argv[2:]))"
)


class ProcessDataWriter:
    """`DataWriter`'s interface, with the work done by a worker process."""

    def __init__(
        self,
        fd: int,
        start: int,
        compression: str,
        level: int | None,
        jobs: int,
        dest: Path,
        block_size: int,
    ) -> None:
        self._dest = dest
        self._handles: list[FileData] = []
        self._buf = bytearray()
        self.fragment_entries: list[fmt.FragmentEntry | None] = []
        root = str(Path(__file__).resolve().parents[2])
        args = [
            sys.executable, "-I", "-c", _BOOT, root, str(fd), str(start), compression,
            "" if level is None else str(level), str(block_size), str(jobs), str(dest),
            str(os.getpid()),
        ]
        try:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(fd,), cwd="/", close_fds=True,
            )
        except OSError as exc:
            raise WriterError(f"cannot start the data writer process: {exc.strerror}") from None
        assert self._proc.stdin is not None
        self._wfd = self._proc.stdin.fileno()
        with contextlib.suppress(OSError):  # a lower pipe-max-size: smaller writes
            fcntl.fcntl(self._wfd, _F_SETPIPE_SZ, _FLUSH)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def add_file(self, stream: BinaryIO, size: int, sparse: bool = False) -> FileData:
        """Send exactly `size` bytes of one file's content; its handle is filled at finish."""
        handle = FileData(size)
        if size == 0:
            return handle
        self._handles.append(handle)
        buf = self._buf
        buf += _HEADER.pack(size | _SPARSE if sparse else size)
        if size <= _SMALL:
            buf += read_exact(stream, size, size)
            if len(buf) >= _FLUSH:
                self._flush()
            return handle
        self._flush()
        left = size
        while left:
            chunk = stream.read(min(_FLUSH, left))
            if not chunk:
                raise LayerError(f"file content ended early (expected {size} bytes)")
            self._send(chunk)
            left -= len(chunk)
        return handle

    def finish(self) -> int:
        """Waits for the worker to write everything; returns the end position."""
        self._buf += _HEADER.pack(_END)
        self._flush()
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        result = proc.stdout.read()
        code = proc.wait()
        if code != 0 or result[:1] != b"K":
            raise self._died(result, code)
        return self._take(memoryview(result)[1:])

    def close(self) -> None:
        """Stops the worker (what it had not written is dropped)."""
        proc = self._proc
        if proc.returncode is None:
            proc.kill()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        proc.wait()

    def _flush(self) -> None:
        if self._buf:
            self._send(self._buf)
            self._buf = bytearray()

    def _send(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._wfd, view):]
        except BrokenPipeError:
            assert self._proc.stdout is not None
            result = self._proc.stdout.read()
            raise self._died(result, self._proc.wait()) from None

    def _died(self, result: bytes, code: int) -> WriterError:
        if result[:1] == b"E":
            return WriterError(result[1:].decode("utf-8", "replace"))
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        detail = ""
        if self._proc.stderr is not None:
            lines = self._proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
            detail = f": {lines[-1]}" if lines else ""
        return WriterError(f"writing {self._dest}: the data writer process died ({how}){detail}")

    def _take(self, view: memoryview) -> int:
        position, fragments, files = _RESULT.unpack_from(view)
        if files != len(self._handles):
            raise WriterError(f"writing {self._dest}: the data writer process lost files")
        at = _RESULT.size
        columns = []
        for code, count in (("Q", fragments), ("I", fragments), ("q", files), ("Q", files),
                            ("I", files), ("I", files), ("Q", files), ("I", files)):
            column = array(code)
            end = at + column.itemsize * count
            column.frombytes(view[at:end])
            columns.append(column)
            at = end
        blocks = array("I")
        blocks.frombytes(view[at:])
        frag_start, frag_word, same, start, fragment, offset, sparse, nblocks = columns
        self.fragment_entries = [
            fmt.FragmentEntry(a, b) for a, b in zip(frag_start, frag_word, strict=True)
        ]
        handles = self._handles
        at = 0
        for index, handle in enumerate(handles):
            first = same[index]
            if first >= 0:
                known = handles[first]
                handle.start, handle.blocks = known.start, known.blocks
                handle.fragment, handle.offset = known.fragment, known.offset
                handle.sparse = known.sparse
                continue
            handle.start = start[index]
            handle.fragment = fragment[index]
            handle.offset = offset[index]
            handle.sparse = sparse[index]
            count = nblocks[index]
            if count:
                handle.blocks = blocks[at:at + count]
                at += count
        return int(position)


# --- the worker process ----------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux: pipe EOF still ends us
        pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _encode(handles: list[FileData], writer: DataWriter, position: int) -> bytes:
    entries = [entry for entry in writer.fragment_entries if entry is not None]
    seen: dict[int, int] = {}
    same, start, fragment, offset = array("q"), array("Q"), array("I"), array("I")
    sparse, nblocks, blocks = array("Q"), array("I"), array("I")
    for index, handle in enumerate(handles):
        first = seen.setdefault(id(handle), index)
        same.append(first if first != index else -1)
        start.append(handle.start)
        fragment.append(handle.fragment)
        offset.append(handle.offset)
        sparse.append(handle.sparse)
        if first == index:
            nblocks.append(len(handle.blocks))
            blocks.extend(handle.blocks)
        else:
            nblocks.append(0)
    parts = [
        _RESULT.pack(position, len(entries), len(handles)),
        array("Q", [entry.start_block for entry in entries]).tobytes(),
        array("I", [entry.size for entry in entries]).tobytes(),
    ]
    parts += [column.tobytes() for column in (same, start, fragment, offset, sparse, nblocks)]
    parts.append(blocks.tobytes())
    return b"".join(parts)


def main(argv: list[str]) -> int:
    """The worker: argv = fd start compression level block_size jobs dest parent_pid."""
    fd_s, start_s, compression, level_s, block_s, jobs_s, dest, parent_s = argv
    _die_with_parent(int(parent_s))
    from squashstore.errors import SquashstoreError
    from squashstore.squashfs.compress import CodecError, codec_for

    reply = sys.stdout.buffer
    writer: DataWriter | None = None
    try:
        block_size = int(block_s)
        try:
            codec = codec_for(compression, int(level_s) if level_s else None, None, block_size)
        except CodecError as exc:
            raise WriterError(str(exc)) from None
        out = os.fdopen(int(fd_s), "r+b")
        start = int(start_s)
        out.seek(start)
        writer = DataWriter(out, start, codec, int(jobs_s), Path(dest), block_size)
        source = os.fdopen(0, "rb", buffering=_FLUSH)
        handles: list[FileData] = []
        add = writer.add_file
        read = source.read
        unpack = _HEADER.unpack
        while True:
            head = read(8)
            if len(head) != 8:
                return 1  # the parent went away
            (word,) = unpack(head)
            if word == _END:
                break
            handles.append(add(source, word & ~_SPARSE, word >= _SPARSE))
        position = writer.finish()
        out.flush()
        reply.write(b"K" + _encode(handles, writer, position))
        reply.flush()
        return 0
    except SquashstoreError as exc:
        reply.write(b"E" + str(exc).encode("utf-8", "replace"))
        reply.flush()
        return 1
    except OSError as exc:
        reply.write(b"E" + f"writing {dest}: {exc.strerror}".encode("utf-8", "replace"))
        reply.flush()
        return 1
    finally:
        if writer is not None:
            writer.close()
