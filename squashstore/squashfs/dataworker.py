"""The writer's data path, and the canonical tar, in a second process: the other core.

This module owns the split of one image's writing across two processes. The parent's
`ProcessDataWriter` stands in for `DataWriter`: `add_file` only copies each file's bytes,
behind a fixed record, into a pipe in large writes (which release the GIL); a fresh
interpreter (``python -I -c`` bootstrap, never a fork of the threaded parent) runs the very
same `DataWriter` over those bytes (block splitting, zero blocks, the dedup hash, fragments,
compression on its own threads) and writes the blocks into the parent's temporary image
file through an inherited descriptor. Started with `tar`, it also takes whole merged
entries (`add_entry`: the entry's canonical tar header, made in the parent, and its name,
then the content, or for a file of podman's store where the worker reads it, a
`tar.split.DiffFile`) and runs `tarstream.TarStream` over them, so the canonical tar's
sha256, CRC-64s and tar-split are made there (`flatten.stream_entries`). At `finish`
the worker drains and sends back the end position, the fragment table, every file's record
in column arrays and the tar's digest and size; the parent fills its handles and writes
the inode and directory tables, so the image is byte-identical to a one-process write.
The worker dies with its parent (pipe EOF, ``PR_SET_PDEATHSIG``); if the worker dies, the
parent's next write or `finish` raises one `WriterError`; the worker's own errors come
back as their class and message.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib
import json
import os
import signal
import struct
import subprocess
import sys
from array import array
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

from squashstore.image import LayerError
from squashstore.squashfs import format as fmt
from squashstore.squashfs.datawriter import DataWriter, FileData, read_exact
from squashstore.squashfs.metawriter import WriterError
from squashstore.tree import Inode

if TYPE_CHECKING:
    from squashstore.tar.split import DiffFile


def _error(kind: str, message: str) -> Exception:
    """The worker's error ``module:class`` raised again as such in the parent, when it is
    squashstore's own or a ValueError (what the in-process path raises); else `WriterError`."""
    module, _, name = kind.partition(":")
    if module.startswith("squashstore.") or (module, name) == ("builtins", "ValueError"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
            if isinstance(cls, type) and issubclass(cls, Exception):
                return cls(message)
        except Exception:
            pass
    return WriterError(message)

_RECORD = struct.Struct("<BBHQIIII")
"""Every record's header: tag, flags, layer, content size, and four lengths. A file
(`add_file`) has its content (`size` bytes) next; a tree entry (`add_entry`) its tar name
(as the tar-split records it) and its canonical tar header (made here, by the sender),
then its content if it has any (`_CONTENT`). A file of podman's store (`_DIFF`) has its
tar name, header, name in the layer's diff directory (none when it is the tar name's bytes)
and the CRC-64 podman recorded; the worker reads it from the diff directory of `layer`,
which a `_LAYER` record (the directory, the layer's name for errors) announced first."""
_END, _FILE, _ENTRY, _LAYER, _DIFF = 0, 1, 2, 3, 4
"""Record tags: the end of input, a file's content (`add_file`), a tree entry (`add_entry`),
a layer directory, a tree entry whose content the worker reads itself."""
_SPARSE = _CONTENT = 1
_RESULT = struct.Struct("<QIIQ")  # end position, fragment entries, files, canonical tar size
_SMALL = 256 << 10
"""Files up to this size are copied into the send buffer; larger ones are sent in chunks."""
_FLUSH = 1 << 20
"""Send buffer size (also the chunk size of large files and the pipe's capacity)."""
_F_SETPIPE_SZ = 1031
_PR_SET_PDEATHSIG = 1

_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from squashstore.squashfs.dataworker import main; sys.exit(main(sys.argv[2:]))"
)
"""The worker's start: ``-I`` ignores the environment and the working directory, so it
imports from exactly the parent's module path (a venv, PYTHONPATH, a source checkout)."""


class WorkerUnavailable(WriterError):
    """No worker process could be started (the caller writes in its own process)."""


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
        tar: bool = False,
        tar_split: int | None = None,
        tar_split_name: str = "",
    ) -> None:
        self._dest = dest
        if tar:
            from squashstore.tarstream import header_for

            self._header_for = header_for
        self._handles: list[FileData] = []
        self._buf = bytearray()
        self._layers: dict[tuple[bytes, str], int] = {}
        """Layer directories announced to the worker (`_LAYER`): their numbers."""
        self._diff, self._where, self._layer = b"", "", 0
        """The last layer directory an entry named, and its number."""
        self.fragment_entries: list[fmt.FragmentEntry | None] = []
        self.tar_digest = ""
        """With `tar`: ``sha256:`` of the canonical tar of the entries (after `finish`)."""
        self.tar_size = 0
        path = json.dumps([os.path.abspath(entry) for entry in sys.path])
        mode = "-" if not tar else "T" if tar_split is None else str(tar_split)
        args = [
            sys.executable, "-I", "-c", _BOOT, path, str(fd), str(start), compression,
            "" if level is None else str(level), str(block_size), str(jobs), str(dest),
            str(os.getpid()), mode, tar_split_name,
        ]
        fds = (fd,) if tar_split is None else (fd, tar_split)
        try:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=fds, cwd="/", close_fds=True,
            )
        except OSError as exc:
            raise WorkerUnavailable(
                f"cannot start the data writer process: {exc.strerror}") from None
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
        self._buf += _RECORD.pack(_FILE, _SPARSE if sparse else 0, 0, size, 0, 0, 0, 0)
        return self._content(handle, stream, size)

    def add_entry(
        self, path: str, inode: Inode, link_to: str | None, content: IO[bytes] | None,
        source: DiffFile | None = None,
    ) -> FileData | None:
        """Send one tree entry for the canonical tar (the worker was started with `tar`),
        and its content if it has any (with `source`, where the worker reads it instead);
        returns the content's handle, or None."""
        name, size, header = self._header_for(path, inode, link_to)
        raw = name.encode("utf-8", "surrogateescape")
        buf = self._buf
        if source is not None and size:
            if source.diff is not self._diff or source.where is not self._where:
                self._layer_of(source)
            where = source.name
            same = where == raw
            crc = source.crc or b""
            buf += _RECORD.pack(_DIFF, 0, self._layer, size, len(raw), len(header),
                                0 if same else len(where), len(crc))
            buf += raw
            buf += header
            if not same:
                buf += where
            buf += crc
            handle = FileData(size)
            self._handles.append(handle)
            if len(buf) >= _FLUSH:
                self._flush()
            return handle
        flags = 0 if content is None or size == 0 else _CONTENT
        buf += _RECORD.pack(_ENTRY, flags, 0, size, len(raw), len(header), 0, 0)
        buf += raw
        buf += header
        if not flags:
            if len(buf) >= _FLUSH:
                self._flush()
            return None if content is None else FileData(size)
        assert content is not None
        return self._content(FileData(size), content, size)

    def _layer_of(self, source: DiffFile) -> None:
        """Make the layer directory of `source` the current one (announced once)."""
        self._diff, self._where = source.diff, source.where
        key = (source.diff, source.where)
        layer = self._layers.get(key)
        if layer is None:
            layer = self._layers[key] = len(self._layers)
            where = source.where.encode("utf-8", "surrogateescape")
            self._buf += _RECORD.pack(_LAYER, 0, 0, 0, len(source.diff), len(where), 0, 0)
            self._buf += source.diff
            self._buf += where
        self._layer = layer

    def _content(self, handle: FileData, stream: IO[bytes], size: int) -> FileData:
        self._handles.append(handle)
        buf = self._buf
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
        self._buf += _RECORD.pack(_END, 0, 0, 0, 0, 0, 0, 0)
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

    def _died(self, result: bytes, code: int) -> Exception:
        if result[:1] == b"E":
            kind, _, message = result[1:].decode("utf-8", "replace").partition("\0")
            return _error(kind, message)
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        detail = ""
        if self._proc.stderr is not None:
            lines = self._proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
            detail = f": {lines[-1]}" if lines else ""
        return WriterError(f"writing {self._dest}: the data writer process died ({how}){detail}")

    def _take(self, view: memoryview) -> int:
        position, fragments, files, self.tar_size = _RESULT.unpack_from(view)
        if files != len(self._handles):
            raise WriterError(f"writing {self._dest}: the data writer process lost files")
        at = _RESULT.size
        digest_size = int(view[at])
        self.tar_digest = bytes(view[at + 1:at + 1 + digest_size]).decode()
        at += 1 + digest_size
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


def _encode(handles: list[FileData], writer: DataWriter, position: int, tar_size: int,
            tar_digest: str) -> bytes:
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
        _RESULT.pack(position, len(entries), len(handles), tar_size),
        bytes([len(tar_digest)]) + tar_digest.encode(),
        array("Q", [entry.start_block for entry in entries]).tobytes(),
        array("I", [entry.size for entry in entries]).tobytes(),
    ]
    parts += [column.tobytes() for column in (same, start, fragment, offset, sparse, nblocks)]
    parts.append(blocks.tobytes())
    return b"".join(parts)


class _Entries:
    """The worker's side of `add_entry`: the canonical tar of the entries (`TarStream`)."""

    def __init__(self, mode: str, split_name: str, writer: DataWriter, block_size: int,
                 handles: list[FileData]) -> None:
        from squashstore.tar.split import DiffFile, TarSplitRecorder, diff_dirs
        from squashstore.tarstream import TarStream, add_content, add_small

        self._diff_file, self._add_content, self._add_small = DiffFile, add_content, add_small
        self._writer, self._block_size, self._handles = writer, block_size, handles
        self._layers: list[tuple[bytes, str]] = []
        self.diff_dirs = diff_dirs()
        """Each layer directory opened once for all its files (the worker's lifetime)."""
        self.diff_dirs.__enter__()
        self.split_file = None if mode == "T" else os.fdopen(int(mode), "wb")
        if self.split_file is not None:
            # gzip records the file's name in its header, as it would in the parent.
            self.split_file.raw.name = split_name  # type: ignore[attr-defined]
        recorder = None if self.split_file is None else TarSplitRecorder(self.split_file)
        self.stream = TarStream(None, recorder)

    def add(self, head: tuple[int, ...], source: BinaryIO) -> None:
        """An `_ENTRY` record: the header, and the content from the pipe."""
        _tag, flags, _layer, size, name_size, header_size, _, _ = head
        names = _read(source, name_size + header_size)
        stream = self.stream
        stream.begin_header(names[:name_size].decode("utf-8", "surrogateescape"), size,
                            names[name_size:])
        if flags & _CONTENT:
            self._handles.append(self._add_content(stream, source, None, size,
                                                   self._writer.add_file))
        stream.end()

    def add_diff(self, head: tuple[int, ...], source: BinaryIO) -> None:
        """A `_DIFF` record: the header, and the content read from the layer's directory."""
        _tag, _flags, layer, size, name_size, header_size, diff_name_size, crc_size = head
        at = name_size + header_size
        fields = _read(source, at + diff_name_size + crc_size)
        diff, where = self._layers[layer]
        raw = fields[:name_size]
        ref = self._diff_file(diff, fields[at:at + diff_name_size] if diff_name_size else raw,
                              size, fields[at + diff_name_size:] or None, where)
        name = raw.decode("utf-8", "surrogateescape")
        if size < self._block_size:
            self._handles.append(self._add_small(self.stream, name, fields[name_size:at], ref,
                                                 self._writer.add_bytes))
            return
        stream = self.stream
        stream.begin_header(name, size, fields[name_size:at])
        self._handles.append(self._add_content(stream, source, ref, size,
                                               self._writer.add_file))
        stream.end()

    def add_layer(self, head: tuple[int, ...], source: BinaryIO) -> None:
        """A `_LAYER` record: the next layer directory and the layer's name for errors."""
        diff_size, where_size = head[4], head[5]
        fields = _read(source, diff_size + where_size)
        self._layers.append((fields[:diff_size],
                             fields[diff_size:].decode("utf-8", "surrogateescape")))

    def close(self) -> tuple[int, str]:
        self.diff_dirs.__exit__(None, None, None)
        self.stream.close()
        if self.split_file is not None:
            self.split_file.close()
        return self.stream.size, self.stream.digest


def _read(source: BinaryIO, size: int) -> bytes:
    data = source.read(size)
    if len(data) != size:
        raise _ParentGone
    return data


class _ParentGone(Exception):
    """The input ended mid-record: the parent went away."""


def main(argv: list[str]) -> int:
    """The worker: argv = fd start compression level block_size jobs dest parent_pid tar
    name, where tar is ``-`` (no canonical tar), ``T`` (its digest only) or the tar-split's
    fd, and name that file's name."""
    fd_s, start_s, compression, level_s, block_s, jobs_s, dest, parent_s, tar_mode, name = argv
    _die_with_parent(int(parent_s))
    # No reference cycles are made per entry: the collector would only walk the growing
    # list of handles again and again (flatten.gc_paused says the same of the parent).
    gc.disable()
    # ^C reaches the whole process group: the parent decides, and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
        handles: list[FileData] = []
        entries = (None if tar_mode == "-"
                   else _Entries(tar_mode, name, writer, block_size, handles))
        source = os.fdopen(0, "rb", buffering=_FLUSH)
        add = writer.add_file
        read = source.read
        unpack = _RECORD.unpack
        size = _RECORD.size
        add_diff = entries.add_diff if entries is not None else None
        while True:
            raw = read(size)
            if len(raw) != size:
                return 1  # the parent went away
            head = unpack(raw)
            tag = head[0]
            if tag == _DIFF and add_diff is not None:
                add_diff(head, source)
            elif tag == _ENTRY and entries is not None:
                entries.add(head, source)
            elif tag == _FILE:
                handles.append(add(source, head[3], bool(head[1] & _SPARSE)))
            elif tag == _LAYER and entries is not None:
                entries.add_layer(head, source)
            elif tag == _END:
                break
            else:
                raise WriterError(f"writing {dest}: unexpected record {tag} from the parent")
        position = writer.finish()
        out.flush()
        tar_size, tar_digest = (0, "") if entries is None else entries.close()
        reply.write(b"K" + _encode(handles, writer, position, tar_size, tar_digest))
        reply.flush()
        return 0
    except _ParentGone:
        return 1
    except Exception as exc:  # every failure goes to the parent as one line
        message = f"writing {dest}: {exc.strerror}" if isinstance(exc, OSError) else str(exc)
        kind = f"{type(exc).__module__}:{type(exc).__qualname__}"
        reply.write(b"E" + f"{kind}\0{message}".encode("utf-8", "replace"))
        reply.flush()
        return 1
    finally:
        if writer is not None:
            writer.close()
