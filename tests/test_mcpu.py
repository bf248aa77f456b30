"""Migrate's per-entry shortcuts (branch mcpu) write exactly what the general path writes.

A small file of podman's store goes through the worker in a few calls
(`tarstream.add_small`: `DiffFile.content`, `TarStream.whole`, `TarSplitRecorder.entry`,
`DataWriter.add_bytes`), and the parent names each layer directory once (`_LAYER` records)
instead of with every file. Each shortcut must give the bytes of the long way: the same
tar-split lines, digest, squash file and errors.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from fastcrc import crc64
from hypothesis import given, settings
from hypothesis import strategies as st

from squashstore.image import SourceError
from squashstore.squashfs.writer import SquashOptions, SquashWriter
from squashstore.tar.split import DiffFile, TarSplitRecorder, diff_dirs
from squashstore.tarstream import TarStream
from squashstore.tree import Inode, Kind, new_dir

_NAMES = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=40),
    st.text(min_size=1, max_size=20),  # escapes, non-ASCII
    st.binary(min_size=1, max_size=20).map(lambda raw: raw.decode("utf-8", "surrogateescape")),
)
_ENTRIES = st.lists(st.tuples(_NAMES, st.binary(max_size=600), st.integers(0, 1 << 20),
                              st.integers(0, (1 << 64) - 1)), max_size=12)


@settings(deadline=None, max_examples=60)
@given(entries=_ENTRIES, filler=st.integers(0, 2))
def test_recorder_entry_writes_what_segment_file_segment_write(
        entries: list[tuple[str, bytes, int, int]], filler: int) -> None:
    """`entry` = `segment(header)` + `file(...)` + `segment(padding)`, byte for byte, also
    across the recorder's write buffer (`filler` adds lines of 200 kB)."""
    entries = entries + [("x", bytes(200_000), 1, 2)] * filler + entries
    one, two = io.BytesIO(), io.BytesIO()
    fused, plain = TarSplitRecorder(one), TarSplitRecorder(two)
    for name, header, size, crc in entries:
        padding = bytes(-size % 512)
        fused.entry(header or b"h", name, size, crc, padding)
        plain.segment(header or b"h")
        plain.file(name, size, crc)
        plain.segment(padding)
    fused.close()
    plain.close()
    assert one.getvalue() == two.getvalue()


@settings(deadline=None, max_examples=40)
@given(entries=st.lists(st.tuples(_NAMES, st.binary(min_size=1, max_size=3000)), max_size=8),
       big=st.integers(0, 2))
def test_whole_writes_what_begin_payload_end_write(
        entries: list[tuple[str, bytes]], big: int) -> None:
    """`TarStream.whole` = `begin_header` + `payload` + `end`: the same stream, digest,
    size and tar-split, with small pieces and pieces large enough to go to the hash
    thread directly."""
    entries = entries + [("big", os.urandom(70_000))] * big
    outs = [io.BytesIO(), io.BytesIO()]
    splits = [io.BytesIO(), io.BytesIO()]
    streams = [TarStream(outs[i], TarSplitRecorder(splits[i])) for i in range(2)]
    for name, data in entries:
        header = name.encode("utf-8", "surrogateescape")[:512].ljust(512, b"\0")
        crc = streams[0].whole(name, header, data)
        assert crc == crc64.go_iso(data)
        streams[1].begin_header(name, len(data), header)
        streams[1].payload(data)
        streams[1].end()
    for stream in streams:
        stream.close()
    assert outs[0].getvalue() == outs[1].getvalue()
    assert splits[0].getvalue() == splits[1].getvalue()
    assert (streams[0].digest, streams[0].size) == (streams[1].digest, streams[1].size)


def _layers(tmp: Path) -> list[tuple[str, bytes, bytes, bytes]]:
    """Files in two layer directories: (tar path, diff dir, name in it, content); small
    and larger than a block, some under a name that is not their tar path."""
    files = []
    for layer in ("l1", "l2"):
        diff = tmp / layer
        (diff / "sub").mkdir(parents=True)
        for index, size in enumerate((1, 700, 5000, 200_000, 3000)):
            data = os.urandom(size) if index != 4 else b"same" * 750
            name = f"sub/f{index}" if index % 2 else f"f{index}"
            (diff / name).write_bytes(data)
            files.append((f"{layer}-{index}", os.fsencode(diff), name.encode(), data))
    return files


def _write(tmp: Path, tag: str, files: list[tuple[str, bytes, bytes, bytes]],
           sources: bool, crc_of: object = None) -> tuple[bytes, bytes, tuple[str, int]]:
    """The squash file, tar-split and digest of `files` through the worker: read by the
    worker from their layer directories (`sources`), or sent with their bytes."""
    root = new_dir(mtime=1)
    assert root.children is not None
    (tmp / tag).mkdir()
    dest, split = tmp / tag / "out.sqfs", tmp / tag / "out.tsplit"  # gzip keeps the name
    with split.open("wb") as split_file, SquashWriter(
            dest, SquashOptions("lz4", block_size=4096, jobs=2), worker=True, tar=True,
            tar_split=split_file) as writer, diff_dirs():
        assert writer.writes_tar
        for path, diff, name, data in files:
            inode = Inode(Kind.FILE, mode=0o644, mtime=7, size=len(data))
            crc = (crc64.go_iso(data).to_bytes(8, "big") if crc_of is None
                   else crc_of)  # type: ignore[assignment]
            if sources:
                handle = writer.add_entry(path, inode, None, None,
                                          DiffFile(diff, name, len(data), crc, f"layer {path}"))
            else:
                handle = writer.add_entry(path, inode, None, io.BytesIO(data))
            inode.data = handle
            root.children[path] = inode
        writer.finish(root)
        digest = writer.tar_result()
    return dest.read_bytes(), split.read_bytes(), digest


def test_files_read_by_the_worker_from_two_layers_write_what_their_bytes_write(
        tmp_path: Path) -> None:
    """Files of two layer directories (each named once to the worker), small ones (the
    short way) and ones over a block, some under a name in the layer that is not their
    tar path: the same squash file, tar-split and digest as sending their bytes."""
    files = _layers(tmp_path)
    assert _write(tmp_path, "read", files, True) == _write(tmp_path, "sent", files, False)


@pytest.mark.parametrize("crc", [b"\0" * 8, b"odd"])
def test_a_small_file_with_a_wrong_crc_is_refused_by_the_worker(tmp_path: Path,
                                                                 crc: bytes) -> None:
    """A recorded CRC-64 that is not the content's (or not 8 bytes) refuses the file with
    containers/storage's message, on the short way too."""
    files = _layers(tmp_path)[:1]
    with pytest.raises(SourceError, match=r"layer l1-0: file integrity checksum failed for "
                                          r".*/l1/f0$"):
        _write(tmp_path, "bad", files, True, crc_of=crc)
    assert not (tmp_path / "bad" / "out.sqfs").exists()


class _Full(io.RawIOBase):
    """A file that takes `room` bytes, then fails once like a full disk (later writes
    succeed: the failure must not be lost)."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if len(data) > self.room:
            self.room = 1 << 40
            raise OSError(28, "No space left on device")
        self.room -= len(data)
        return len(data)


def test_a_tar_split_that_cannot_be_written_fails_the_recording() -> None:
    """The lines are gzipped on a thread of their own: a write error there is raised by
    the recorder (at the latest by `close`), not lost, and nothing waits forever."""
    recorder = TarSplitRecorder(_Full(1000))
    with pytest.raises(OSError, match="No space left"):
        for index in range(2000):
            recorder.entry(os.urandom(512), f"f{index}", 100, index, bytes(412))
        recorder.close()
