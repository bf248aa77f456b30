"""Pipelines from an image to one flattened artefact: a tar stream or a squash file.

`export_image` streams the merged layers into one tar (``squashstore export``).
`squash_image` streams them into the native squashfs writer in one pass: each surviving
file's bytes go to the writer as they stream past, and through a `TarStream` that computes
the digest of the canonical tar of the flattened tree and records its tar-split, so the
store can give podman a layer whose ``diff-digest`` is true and reproducible. With more
than one job that work is split over two processes (`stream_entries`): this one reads and
merges the layers, the writer's worker process (`squashfs/dataworker.py`) makes the
canonical tar and the squash file's data from the entries it is sent. A file of podman's
store is sent as where it lies (`layers.content_source`), not as its bytes: the writer reads
it from the layer's diff directory itself, once (`tarstream.add_content`).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from squashstore.image import Image, LayerError
from squashstore.layers import LayerMerge, MergedEntry, content_source
from squashstore.progress import Progress
from squashstore.tar.split import TarSplitRecorder, diff_dirs
from squashstore.tarstream import TarStream, add_content, add_small, header_for

if TYPE_CHECKING:
    from squashstore.squashfs.writer import SquashOptions, SquashWriter


@dataclass(frozen=True)
class SquashResult:
    path: Path
    diff_digest: str
    """``sha256:`` of the canonical tar of the flattened tree (the layer's diff_id)."""
    diff_size: int
    tar_split: Path | None
    """A gzip'd tar-split that rebuilds that tar from the mounted squash file."""
    files: int
    bytes_in: int
    bytes_out: int
    seconds: float


@dataclass(frozen=True)
class ExportResult:
    digest: str
    size: int
    files: int
    bytes_in: int


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while an image streams: the merge creates no
    reference cycles (a whole `--large` squash left 0 for `gc.collect()` to find), but the
    tree of tens of thousands of inodes it builds made every full collection walk it
    again (~0.3-0.5 s of CPU). Reference counting still frees everything as before. At
    the end what was made meanwhile is frozen (`gc.freeze`) before the collector comes
    back, or its first collection would walk all of it once more (~0.2 s)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def export_image(image: Image, out: BinaryIO) -> ExportResult:
    """Write the flattened root filesystem of `image` to `out` as one tar stream."""
    merge = LayerMerge(image.layers)
    stream = TarStream(out)
    try:
        with diff_dirs(), gc_paused():
            for entry in merge.entries():
                stream.add(entry)
    except EOFError as exc:
        raise LayerError(f"{image.reference}: {exc}") from exc
    stream.close()
    return ExportResult(stream.digest, stream.size, merge.files, merge.bytes)


def squash_image(image: Image, dest: Path, options: SquashOptions,
                 tar_split: Path | None = None, progress: bool = False) -> SquashResult:
    """Write `image` flattened to the squash file `dest` (atomically) in one pass.

    With `tar_split`, the tar-split record of the canonical tar is written there too;
    with `progress`, a progress line is drawn on stderr (for terminals).
    """
    from squashstore.squashfs.writer import SquashWriter

    started = time.monotonic()
    merge = LayerMerge(image.layers)
    split_file = tar_split.open("wb") if tar_split is not None else None
    try:
        bar = Progress(image.reference, len(image.layers)) if progress else None

        def tick() -> None:
            if bar is not None:
                bar.update(merge.layers_done, merge.files, merge.bytes)

        with SquashWriter(dest, options, worker=True, tar=True,
                          tar_split=split_file) as writer, diff_dirs(), gc_paused():
            entries = stream_entries(writer, merge.entries(), split_file, tick)
            if bar is not None:
                bar.done()
            summary = writer.finish(merge.root)
            digest = entries() if callable(entries) else entries
    except BaseException:
        if split_file is not None:
            split_file.close()
            tar_split.unlink(missing_ok=True)  # type: ignore[union-attr]
        raise
    if split_file is not None:
        split_file.close()
    return SquashResult(
        path=dest, diff_digest=digest[0], diff_size=digest[1], tar_split=tar_split,
        files=merge.files, bytes_in=merge.bytes, bytes_out=summary.bytes_out,
        seconds=time.monotonic() - started)


def stream_entries(
    writer: SquashWriter, entries: Iterable[MergedEntry], split_file: BinaryIO | None,
    tick: Callable[[], None] = lambda: None,
) -> tuple[str, int] | Callable[[], tuple[str, int]]:
    """Give every merged entry to `writer`: its content, and to the canonical tar.

    With two cores the writer's worker process makes the canonical tar (the result is a
    function to call once the writer finished); with one, this thread makes it with a
    `TarStream` (the result is the canonical tar's digest and size). Both write the same
    squash file, tar-split and digest.
    """
    if writer.writes_tar:
        for entry in entries:
            tick()
            content = entry.content
            handle = writer.add_entry(entry.path, entry.inode, entry.link_to, content,
                                      content_source(content))
            if handle is not None:
                entry.inode.data = handle
        return writer.tar_result
    recorder = TarSplitRecorder(split_file) if split_file is not None else None
    stream = TarStream(None, recorder)
    block_size = writer.block_size
    for entry in entries:
        tick()
        content = entry.content
        source = content_source(content)
        if source is not None and entry.inode.size < block_size:
            name, _size, header = header_for(entry.path, entry.inode, entry.link_to)
            entry.inode.data = add_small(stream, name, header, source, writer.add_bytes)
            continue
        stream.begin(entry)
        if content is not None:
            entry.inode.data = add_content(stream, content, source, entry.inode.size,
                                           writer.add_file)
        stream.end()
    stream.close()
    return stream.digest, stream.size
