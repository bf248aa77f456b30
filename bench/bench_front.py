"""The front of `migrate` alone: reading the layers, the merge, the canonical tar.

`squash_image` = this front + the squashfs writer. This runs the front without a writer
(`LayerMerge(image.layers)` + `TarStream(None, recorder)`, each file's content read through
`TeeReader` in the writer's chunk size), stage by stage, and prints the streaming thread's
CPU time (`time.thread_time`) and entries. Deterministic comparisons: run one stage under
``valgrind --tool=callgrind`` and compare instruction counts.
Run: .venv/bin/python bench/bench_front.py IMAGE [STAGE...] [--profile]
(IMAGE: any reference `migrate` takes, e.g. ``containers-storage:localhost/bench:1`` with
the podman environment of bench/common.py's `build_image`; STAGE: read, merge, direct,
front; ``direct`` is what migrate's parent keeps of the front when a worker reads podman's
files itself).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

from common import arguments

from squashstore.layers import LayerMerge, content_source
from squashstore.sources import open_image
from squashstore.tar.split import TarSplitRecorder
from squashstore.tarstream import TarStream, TeeReader, header_for

CHUNK = 1 << 17


class _Null(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        return len(data)


def read_stage(image_ref: str) -> int:
    """Every layer's tar read to its end (no parsing)."""
    image = open_image(image_ref)
    total = 0
    for layer in image.layers:
        with layer.open() as stream:
            while chunk := stream.read(1 << 20):
                total += len(chunk)
    return total


def merge_stage(image_ref: str) -> int:
    """The merge, every surviving file's content read and dropped."""
    merge = LayerMerge(open_image(image_ref).layers)
    count = 0
    for entry in merge.entries():
        count += 1
        if entry.content is not None:
            while entry.content.read(CHUNK):
                pass
    return count


def direct_stage(image_ref: str) -> int:
    """What migrate's parent does per entry with a worker, for podman's store: the merge,
    each file taken as where it lies (`content_source`; bytes read only where the layer
    cannot say, e.g. an archive), and the canonical header made (`header_for`)."""
    merge = LayerMerge(open_image(image_ref).layers)
    count = 0
    for entry in merge.entries():
        count += 1
        header_for(entry.path, entry.inode, entry.link_to)
        if entry.content is not None and content_source(entry.content) is None:
            while entry.content.read(CHUNK):
                pass
    return count


def front_stage(image_ref: str) -> int:
    """The merge and the canonical tar (digest, tar-split), as `squash_image` drives them."""
    merge = LayerMerge(open_image(image_ref).layers)
    stream = TarStream(None, TarSplitRecorder(_Null()))
    count = 0
    for entry in merge.entries():
        count += 1
        stream.begin(entry)
        if entry.content is not None:
            tee = TeeReader(entry.content, stream)  # type: ignore[arg-type]
            while tee.read(CHUNK):
                pass
        stream.end()
    stream.close()
    print("digest", stream.digest, "size", stream.size)
    return count


STAGES = {"read": read_stage, "merge": merge_stage, "direct": direct_stage,
          "front": front_stage}


def main() -> int:
    parser = arguments(__doc__)
    parser.add_argument("image", help="any reference `migrate` takes")
    parser.add_argument("stages", nargs="*", default=[], metavar="STAGE",
                        help=f"{', '.join(STAGES)} (default: all)")
    parser.add_argument("--profile", action="store_true", help="cProfile each stage")
    args = parser.parse_args()
    if unknown := [s for s in args.stages if s not in STAGES]:
        parser.error(f"unknown stage {unknown[0]!r} (choose from {', '.join(STAGES)})")
    image_ref, stages = args.image, args.stages or list(STAGES)
    for stage in stages:
        profile = cProfile.Profile() if args.profile else None
        started, cpu = time.perf_counter(), time.thread_time()
        if profile is not None:
            profile.enable()
        count = STAGES[stage](image_ref)
        if profile is not None:
            profile.disable()
        print(f"{stage}: {time.thread_time() - cpu:.2f} s thread CPU, "
              f"{time.perf_counter() - started:.2f} s wall, {count}")
        if profile is not None:
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
