"""`squashstore export` against `podman export` on a realistic three-layer image.

Run: .venv/bin/python bench/bench_export.py. Builds the image once in a private podman
(tests/support/podman.py; never the machine's store), then times both exports in the same
run and prints wall, CPU and peak memory with their ratios.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from common import ROOT, arguments, build_image, print_table, realistic_tree, timed, tree_stats


def main() -> int:
    arguments(__doc__).parse_args()
    tree = realistic_tree()
    files, size = tree_stats(tree)
    work = Path(tempfile.mkdtemp(prefix="sqs-bench-export-"))
    podman = None
    try:
        podman, image = build_image(work / "podman", tree)
        env = podman.env  # type: ignore[attr-defined]
        ctr = podman.text("create", "--pull=never", image).strip()  # type: ignore[attr-defined]
        theirs = timed(["podman", "export", "-o", str(work / "podman.tar"), ctr], env=env)
        ours = timed([str(ROOT / ".venv/bin/squashstore"), "export", image, "-o",
                      str(work / "squashstore.tar")], env=env)
        rows = [["podman export", f"{theirs.wall:.2f}", f"{theirs.cpu:.2f}", "1.00"],
                ["squashstore export", f"{ours.wall:.2f}", f"{ours.cpu:.2f}",
                 f"{ours.wall / theirs.wall:.2f}"]]
        print_table(f"export of a 3-layer image: {files} files, {size / 1e6:.0f} MB",
                    ["tool", "wall s", "cpu s", "wall ratio"], rows)
    finally:
        if podman is not None:
            podman.close()  # type: ignore[attr-defined]
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
