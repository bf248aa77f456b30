"""`squashstore migrate` against podman-hpc's pipeline, on a realistic three-layer image.

podman-hpc squashes an image by mounting it (`podman image mount`) and running mksquashfs
over the merged tree; squashstore streams the layers into its own writer. Both are timed in
the same run for lz4 (podman-hpc's codec) and zstd (squashstore's default, level 3 for both),
printing wall time, CPU time, peak memory and output size with ratios.
Run: .venv/bin/python bench/bench_migrate.py [--large]
(``--large``: a ~35,000-file Python environment instead of the 7,637-file one).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import (
    LARGE_PACKAGES,
    ROOT,
    arguments,
    build_image,
    print_table,
    realistic_tree,
    timed,
    tree_stats,
)

SQUASHSTORE = str(ROOT / ".venv/bin/squashstore")
CODECS = {"lz4": ["-comp", "lz4"], "zstd": ["-comp", "zstd", "-Xcompression-level", "3"]}


def podman_hpc(env: dict[str, str], image: str, out: Path, codec: str) -> tuple[float, ...]:
    """podman image mount + mksquashfs of the merged tree (+ unmount), as podman-hpc does."""
    start = timed(["podman", "image", "mount", image], env=env)
    mountpoint = subprocess.run(["podman", "image", "mount", image], env=env, check=True,
                                capture_output=True, text=True).stdout.strip()
    # podman-hpc also passes -xattrs-exclude, which mksquashfs 4.5.1 here does not have.
    squash = timed(["mksquashfs", mountpoint, str(out), "-noappend", "-quiet", "-no-progress",
                    *CODECS[codec]])
    subprocess.run(["podman", "image", "unmount", "-a"], env=env, check=True,
                   capture_output=True)
    return (start.wall + squash.wall, start.cpu + squash.cpu,
            max(start.peak_rss_mb, squash.peak_rss_mb))


def main() -> int:
    parser = arguments(__doc__)
    parser.add_argument("--large", action="store_true",
                        help="the ~35,000-file Python environment (common.LARGE_PACKAGES)")
    tree = (realistic_tree(LARGE_PACKAGES, "site-packages-large")
            if parser.parse_args().large else realistic_tree())
    files, size = tree_stats(tree)
    work = Path(tempfile.mkdtemp(prefix="sqs-bench-migrate-"))
    podman = None
    rows = []
    try:
        podman, image = build_image(work / "podman", tree)
        env = podman.env
        for codec in CODECS:
            wall, cpu, rss = podman_hpc(env, image, work / f"hpc-{codec}.sqfs", codec)
            hpc_size = (work / f"hpc-{codec}.sqfs").stat().st_size
            store = work / f"store-{codec}"
            level = ["--level", "3"] if codec == "zstd" else []
            ours = timed([SQUASHSTORE, "--store", str(store), "migrate", image,
                          "--no-mount", "--compression", codec, *level], env=env)
            our_size = sum(p.stat().st_size for p in (store / "squashstore" / "squash").iterdir())
            rows.append([codec, "podman-hpc (mount+mksquashfs)", f"{wall:.2f}", f"{cpu:.2f}",
                         f"{rss:.0f}", f"{hpc_size / 1e6:.1f}", "1.00"])
            rows.append([codec, "squashstore migrate", f"{ours.wall:.2f}", f"{ours.cpu:.2f}",
                         f"{ours.peak_rss_mb:.0f}", f"{our_size / 1e6:.1f}",
                         f"{ours.wall / wall:.2f}"])
        print_table(f"migrate of a 3-layer image: {files} files, {size / 1e6:.0f} MB",
                    ["codec", "pipeline", "wall s", "cpu s", "peak MB", "out MB", "wall ratio"],
                    rows)
    finally:
        if podman is not None:
            podman.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
