"""What the benchmarks share: a realistic tree, a private podman, and timing of commands.

The realistic tree is a Python site-packages of tens of thousands of files (numpy, scipy,
pandas installed with pip into a cache directory once), the metadata-heavy kind of tree HPC
jobs import from; without the network it falls back to the machine's /usr/lib/python3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SQUASHSTORE_BENCH_CACHE", Path.home() / ".cache/squashstore-bench"))
PACKAGES = ("numpy", "scipy", "pandas")
LARGE_PACKAGES = (*PACKAGES, "sympy", "matplotlib", "scikit-learn", "botocore", "networkx",
                  "babel", "plotly", "django", "kubernetes", "ansible-core")
"""A Python environment of ~35,000 files (~41,000 entries), for `--large` runs."""

sys.path.insert(0, str(ROOT / "tests"))


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """A bench's command line: ``--help`` prints its docstring; an unknown argument is a
    usage error, not ignored (a mistyped ``--large`` would silently bench the small tree)."""
    return argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def realistic_tree(packages: tuple[str, ...] = PACKAGES, name: str = "site-packages") -> Path:
    """A directory of a real Python package tree (built once, then cached)."""
    target = CACHE / name
    done = CACHE / f"{name}.done"
    if done.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target",
                             str(target), *packages], capture_output=True, text=True)
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
    """Run `argv` to completion; its wall time, CPU time (user+sys) and peak RSS."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, argv)
    return Timing(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def build_image(podman_root: Path, tree: Path) -> tuple[Any, str]:
    """A private podman and, in it, a three-layer image of `tree` (two dirs copied twice)."""
    from support.podman import make_podman

    podman = make_podman(podman_root)
    ctx = podman_root / "ctx"
    (ctx / "tree").mkdir(parents=True)
    shutil.copytree(tree, ctx / "tree" / "site-packages", symlinks=True)
    extra = sorted(p for p in tree.iterdir() if p.is_dir())[:2]
    (ctx / "Containerfile").write_text(
        "FROM scratch\nCOPY tree/ /usr/lib/python3/\nCMD [\"/none\"]\n"
        + "".join(f"COPY tree/site-packages/{p.name} /usr/lib/python3/site-packages/{p.name}\n"
                  for p in extra))
    podman.run("build", "--network", "none", "--pull=never", "-t", "localhost/bench:1",
               str(ctx), timeout=3600)  # --large on a loaded machine takes over 5 minutes
    return podman, "localhost/bench:1"
