"""Reading a layer tar: Python's `tarfile` against squashstore's own reader (Go's rules).

Run: .venv/bin/python bench/bench_tar.py. Tars the realistic tree once (GNU tar, posix
format, in memory), then reads every header and every byte of content with each reader,
best of three CPU times in the same run, and prints the ratio. It also times the export of
a GNU sparse 1.0 file of 4 GiB of holes (the holes are never read from the layer; what is
left is hashing the canonical tar, which is dense by definition).
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable

from common import arguments, print_table, realistic_tree
from test_layers import make_layer

from squashstore.flatten import export_image
from squashstore.image import Image
from squashstore.tar.reader import TarReader
from support import tarshapes


def _with_tarfile(data: bytes) -> int:
    total = 0
    with tarfile.open(fileobj=io.BufferedReader(io.BytesIO(data)), mode="r|") as tar:
        for member in tar:
            content = tar.extractfile(member)
            if content is not None:
                while chunk := content.read(1 << 20):
                    total += len(chunk)
    return total


def _with_ours(data: bytes) -> int:
    total = 0
    reader = TarReader(io.BufferedReader(io.BytesIO(data)))
    while reader.next() is not None:
        while chunk := reader.read(1 << 20):
            total += len(chunk)
    return total


def _best_cpu(read: Callable[[bytes], int], data: bytes) -> tuple[float, int]:
    best, total = float("inf"), 0
    for _ in range(3):
        start = time.process_time()
        total = read(data)
        best = min(best, time.process_time() - start)
    return best, total


class _Null(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        return len(data)


def _sparse_layer(holes: int) -> bytes:
    text = b"1\n%d\n3\n" % (1 << 20)
    body = text + bytes(-len(text) % 512) + b"abc"
    records = b"".join(tarshapes.pax_record(k, v) for k, v in (
        ("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0"), ("GNU.sparse.name", "sparse"),
        ("GNU.sparse.realsize", str(holes)), ("size", str(len(body)))))
    return tarshapes.archive(
        tarshapes.special(b"x", records)
        + tarshapes.header(b"GNUSparseFile.0/sparse", b"0", size=len(body))
        + body + bytes(-len(body) % 512))


def main() -> int:
    arguments(__doc__).parse_args()
    tree = realistic_tree()
    data = subprocess.run(["tar", "--format=posix", "-cf", "-", "-C", str(tree), "."],
                          check=True, capture_output=True).stdout
    counter = TarReader(io.BytesIO(data))
    entries = 0
    while counter.next() is not None:
        entries += 1
    theirs, total_a = _best_cpu(_with_tarfile, data)
    ours, total_b = _best_cpu(_with_ours, data)
    assert total_a == total_b, (total_a, total_b)
    print_table(f"reading a {len(data) / 1e6:.0f} MB layer tar ({entries} entries), "
                "cpu s, best of 3",
                ["reader", "cpu s", "ratio"],
                [["tarfile (r|)", f"{theirs:.2f}", "1.00"],
                 ["squashstore.tar.reader", f"{ours:.2f}", f"{ours / theirs:.2f}"]])
    layer = _sparse_layer(4 << 30)
    image = Image("bench", (), b"", "", b"", "", (make_layer(0, layer),))
    start, cpu = time.perf_counter(), time.process_time()
    result = export_image(image, _Null())  # type: ignore[arg-type]
    print(f"\nexport of a 4 GiB sparse file ({len(layer)} bytes of layer, {result.size} bytes "
          f"of canonical tar): {time.perf_counter() - start:.2f} s wall, "
          f"{time.process_time() - cpu:.2f} s cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
