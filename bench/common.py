"""What the benchmarks share: a realistic tree, a private podman, and timing of commands.

The realistic tree is a Python site-packages of tens of thousands of files (numpy, scipy,
pandas installed with pip into a cache directory once), the metadata-heavy kind of tree HPC
jobs import from; without the network it falls back to the machine's /usr/lib/python3.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SQUASHSTORE_BENCH_CACHE", Path.home() / ".cache/squashstore-bench"))
PACKAGES = ("numpy", "scipy", "pandas")

sys.path.insert(0, str(ROOT / "tests"))


def realistic_tree() -> Path:
    """A directory of a real Python package tree (built once, then cached)."""
    target = CACHE / "site-packages"
    done = CACHE / "site-packages.done"
    if done.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target",
                             str(target), *PACKAGES], capture_output=True, text=True)
    if result.returncode != 0:
        fallback = sorted(Path("/usr/lib").glob("python3*"))[-1]
        print(f"pip install failed; using {fallback}", file=sys.stderr)
        return fallback
    done.touch()
    return target


def tree_stats(path: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            files += 1
            size += st.st_size
    return files, size


@dataclass(frozen=True)
class Timing:
    wall: float
    cpu: float
    peak_rss_mb: float


def timed(argv: list[str], env: dict[str, str] | None = None) -> Timing:
    """Run `argv` to completion; wall time, CPU time (user+sys) and peak RSS of the child."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timing(wall, cpu, after.ru_maxrss / 1024)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
