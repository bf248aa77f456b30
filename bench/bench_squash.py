"""`squashstore squash rootfs:DIR` against mksquashfs and tar2sqfs on a realistic tree.

Run: .venv/bin/python bench/bench_squash.py [--tree DIR] [--codecs gzip,zstd,lz4]
[--jobs N] [--repeat N]. For each codec at mksquashfs's defaults (gzip 9, zstd 15, lz4
normal; 128 KiB blocks) it times the three writers in the same run, each as its own
process, and prints wall time, CPU time (user + sys), peak RSS and output size, then our
ratios to each peer. tar2sqfs reads a tar of the tree made beforehand (not timed);
mksquashfs and squashstore read the directory. The input is read once, untimed, before
each run so every writer starts with a warm page cache. Speed is reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, print_table, realistic_tree, tree_stats

SQUASHSTORE = [sys.executable, "-m", "squashstore.cli.main"]
LEVEL_ARGS = {"gzip": ["-Xcompression-level", "9"], "zstd": ["-Xcompression-level", "15"],
              "lz4": []}
TAR2SQFS_LEVEL = {"gzip": "level=9", "zstd": "level=15", "lz4": ""}


@dataclass(frozen=True)
class Run:
    wall: float
    cpu: float
    peak_rss_mb: float
    size: int


def measure(argv: list[str], output: Path, stdin: Path | None = None) -> Run:
    """Run `argv` alone; its wall, CPU and peak RSS (from wait4) and `output`'s size."""
    output.unlink(missing_ok=True)
    with open(stdin or os.devnull, "rb") as inp:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=inp, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {err}")
    if proc.stderr:
        proc.stderr.close()
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024,
               output.stat().st_size)


def warm(*paths: Path) -> None:
    """Read every file under `paths` so each writer starts with the same warm page cache
    (this machine drops its page cache often: the first reader would pay the disk)."""
    for top in paths:
        files = [top] if top.is_file() else [
            Path(d) / n for d, _dirs, names in os.walk(top) for n in names]
        for path in files:
            if path.is_file() and not path.is_symlink():
                with open(path, "rb", buffering=0) as f:
                    while f.read(1 << 20):
                        pass


def run_codec(codec: str, tree: Path, tar: Path, work: Path, jobs: int) -> dict[str, Run]:
    procs = str(jobs or os.cpu_count() or 1)
    ours = work / "ours.sqfs"
    mk = work / "mksquashfs.sqfs"
    ng = work / "tar2sqfs.sqfs"
    warm(tree)
    runs = {
        "squashstore": measure([*SQUASHSTORE, "squash", f"rootfs:{tree}", str(ours),
                                "--compression", codec, "--jobs", str(jobs)], ours),
    }
    warm(tree)
    runs |= {
        "mksquashfs": measure(["mksquashfs", str(tree), str(mk), "-noappend", "-quiet",
                               "-no-progress", "-comp", codec, *LEVEL_ARGS[codec],
                               "-processors", procs], mk),
    }
    comp_opts = ["-X", TAR2SQFS_LEVEL[codec]] if TAR2SQFS_LEVEL[codec] else []
    warm(tar)
    runs["tar2sqfs"] = measure(["tar2sqfs", "-q", "-f", "-c", codec, *comp_opts, "-j", procs,
                                str(ng)], ng, stdin=tar)
    for path in (ours, mk, ng):
        path.unlink(missing_ok=True)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, help="directory to squash (default: pip tree)")
    parser.add_argument("--codecs", default="gzip,zstd,lz4")
    parser.add_argument("--jobs", type=int, default=0, help="threads (0 = all cores)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds per codec, interleaved; the fastest run of each counts "
                             "(the machine is shared: the best run is the least disturbed)")
    args = parser.parse_args()
    tree = args.tree or realistic_tree()
    files, size = tree_stats(tree)
    print(f"tree {tree}: {files} files, {size / 2**20:.1f} MiB; {os.cpu_count()} cores")
    env_path = str(ROOT)
    os.environ["PYTHONPATH"] = env_path + os.pathsep + os.environ.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="sqs-bench-squash-") as tmp:
        work = Path(tmp)
        tar = work / "tree.tar"
        with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
            tf.add(tree, arcname=".")
        rows: list[list[str]] = []
        ratios: list[list[str]] = []
        for codec in args.codecs.split(","):
            rounds = [run_codec(codec, tree, tar, work, args.jobs)
                      for _ in range(max(1, args.repeat))]
            runs = {name: min((r[name] for r in rounds), key=lambda run: run.wall)
                    for name in rounds[0]}
            for name, r in runs.items():
                rows.append([codec, name, f"{r.wall:.2f}", f"{r.cpu:.2f}",
                             f"{r.peak_rss_mb:.0f}", f"{r.size / 2**20:.2f}"])
            ours = runs["squashstore"]
            for peer in ("mksquashfs", "tar2sqfs"):
                p = runs[peer]
                ratios.append([codec, f"vs {peer}", f"{ours.wall / p.wall:.2f}x",
                               f"{ours.cpu / p.cpu:.2f}x",
                               f"{ours.peak_rss_mb / p.peak_rss_mb:.2f}x",
                               f"{ours.size / p.size:.4f}x"])
        print_table("runs", ["codec", "writer", "wall s", "cpu s", "peak MiB", "out MiB"],
                    rows)
        print_table("squashstore / peer", ["codec", "peer", "wall", "cpu", "peak rss", "size"],
                    ratios)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
