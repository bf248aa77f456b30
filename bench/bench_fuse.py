"""Benchmark: squashstore's FUSE server against squashfuse_ll, squashfuse and the kernel.

One run packs one realistic Python tree (``pip install --target`` of a few large packages;
/usr/lib/python3 when pip cannot) into one squashfs image with mksquashfs (zstd, 128 KiB
blocks), then for every backend measures, fresh (unmount, drop the page cache, mount again)
and warm (the same mount once more): ``find``, ``lstat`` of every path, reading every byte
(MB/s), reading the files of 1 MiB and more (sequential MB/s), and
``python -c 'import ...'`` through the mount (PYTHONPATH into it), plus the FUSE servers'
peak RSS. It prints medians and the ratios against squashfuse_ll and the kernel.
Needs root (loop mounts, ``/proc/sys/vm/drop_caches``). Speed is reported, never asserted.

    sudo .venv/bin/python bench/bench_fuse.py [--tree DIR] [--runs 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("numpy", "scipy", "pandas", "sympy")
BACKENDS = ("squashstore", "squashstore-inline", "squashfuse_ll", "squashfuse", "kernel")
"""squashstore-inline: the same server with ``--threads=0`` (no decompression threads)."""
OPS = ("find", "stat", "read", "bigread", "import")
BIG = 1 << 20
"""Files at least this large make the ``bigread`` (sequential throughput) set."""


# ----------------------------------------------------------------------------- mounting


def _sh(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, check=True, stdin=subprocess.DEVNULL,
                          capture_output=True, **kw)  # type: ignore[call-overload]


def _server_pid(mountpoint: Path) -> int | None:
    """The pid of the FUSE server whose command line names `mountpoint`."""
    want = str(mountpoint).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in argv and int(entry.name) != os.getpid():
            return int(entry.name)
    return None


def _mounted(mountpoint: Path) -> bool:
    target = str(mountpoint)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _wait(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.01)


def mount(backend: str, image: Path, mnt: Path) -> int | None:
    """Mount `image` on `mnt` with `backend`; the server's pid for FUSE backends."""
    if backend == "kernel":
        _sh(["mount", "-t", "squashfs", "-o", "loop,ro", str(image), str(mnt)])
        return None
    if backend.startswith("squashstore"):
        extra = ["--threads=0"] if backend == "squashstore-inline" else []
        _sh([sys.executable, "-m", "squashstore.fuse.daemon", *extra, str(image), str(mnt)])
    else:
        _sh([backend, str(image), str(mnt)])
    _wait(lambda: _mounted(mnt))
    os.stat(mnt)
    return _server_pid(mnt)


def umount(backend: str, mnt: Path, pid: int | None) -> None:
    if backend == "kernel":
        _sh(["umount", str(mnt)])
    else:
        _sh(["fusermount3", "-u", str(mnt)])
    if pid is not None:
        _wait(lambda: not Path(f"/proc/{pid}").exists()
              or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3])


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def peak_rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------- operations


@dataclass
class Workload:
    """Relative paths of the tree and what to import."""

    paths: list[str]
    files: list[str]
    total_bytes: int
    modules: list[str]
    big_files: list[str] = field(default_factory=list)
    big_bytes: int = 0


def op_find(mnt: Path, w: Workload) -> float:
    t = time.perf_counter()
    subprocess.run(["find", str(mnt)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def op_stat(mnt: Path, w: Workload) -> float:
    base = str(mnt) + "/"
    t = time.perf_counter()
    for p in w.paths:
        os.lstat(base + p)
    return time.perf_counter() - t


def op_read(mnt: Path, w: Workload, files: list[str] | None = None) -> float:
    """Seconds to read every byte (reported as MB/s)."""
    base = str(mnt) + "/"
    buf = bytearray(1 << 20)
    t = time.perf_counter()
    for p in w.files if files is None else files:
        fd = os.open(base + p, os.O_RDONLY)
        try:
            while os.readv(fd, [buf]) == len(buf):
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - t


def op_bigread(mnt: Path, w: Workload) -> float:
    """Seconds to read the files of at least `BIG` bytes: sequential throughput."""
    return op_read(mnt, w, w.big_files)


def op_import(mnt: Path, w: Workload) -> float:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(mnt),
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp"}
    code = "import " + ", ".join(w.modules)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-s", "-c", code], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


OPERATIONS: dict[str, Callable[[Path, Workload], float]] = {
    "find": op_find, "stat": op_stat, "read": op_read, "bigread": op_bigread,
    "import": op_import,
}


# ----------------------------------------------------------------------------- the run


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds the process `pid` has used so far."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    times: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    cpu: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    """The FUSE server's CPU seconds per operation."""
    rss: list[float] = field(default_factory=list)

    def add(self, op: str, phase: str, seconds: float) -> None:
        self.times.setdefault((op, phase), []).append(seconds)

    def timed(self, op: str, phase: str, mnt: Path, w: Workload, pid: int | None) -> None:
        before = cpu_seconds(pid)
        self.add(op, phase, OPERATIONS[op](mnt, w))
        after = cpu_seconds(pid)
        if before is not None and after is not None:
            self.cpu.setdefault((op, phase), []).append(after - before)

    def median(self, op: str, phase: str) -> float:
        return statistics.median(self.times[(op, phase)])


def bench_backend(backend: str, image: Path, mnt: Path, w: Workload, runs: int) -> Result:
    result = Result()
    for _ in range(runs):
        for op in OPS:
            drop_caches()
            pid = mount(backend, image, mnt)
            try:
                result.timed(op, "fresh", mnt, w, pid)
                result.timed(op, "warm", mnt, w, pid)
                rss = peak_rss_mib(pid)
                if rss is not None:
                    result.rss.append(rss)
            finally:
                umount(backend, mnt, pid)
    return result


def make_tree(work: Path, packages: tuple[str, ...]) -> Path:
    tree = work / "tree"
    if tree.is_dir() and any(tree.iterdir()):
        return tree
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                           "--target", str(tree), *packages], capture_output=True, text=True)
    if proc.returncode == 0:
        return tree
    sys.stderr.write(f"pip install failed ({proc.stderr.strip()[-200:]}); "
                     "using /usr/lib/python3\n")
    return Path("/usr/lib/python3")


def workload(tree: Path, modules: list[str] | None) -> Workload:
    paths, files, total, big, big_total = [], [], 0, [], 0
    for dirpath, dirnames, filenames in os.walk(tree):
        rel = os.path.relpath(dirpath, tree)
        for name in dirnames + filenames:
            p = name if rel == "." else f"{rel}/{name}"
            paths.append(p)
            st = os.lstat(tree / p)
            if name in filenames and os.path.isfile(tree / p) and not os.path.islink(tree / p):
                files.append(p)
                total += st.st_size
                if st.st_size >= BIG:
                    big.append(p)
                    big_total += st.st_size
    if modules is None:
        modules = [m for m in PACKAGES if (tree / m / "__init__.py").exists()]
        if not modules:
            modules = ["json", "email.parser", "http.client"]
    return Workload(paths, files, total, modules, big, big_total)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(results: dict[str, Result], w: Workload) -> None:
    mb = w.total_bytes / 1e6
    cols = [(op, phase) for op in OPS for phase in ("fresh", "warm")]
    volume = {"read": mb, "bigread": w.big_bytes / 1e6}

    def value(name: str, op: str, phase: str) -> float:
        s = results[name].median(op, phase)
        return volume[op] / s if op in volume else s

    head = ["backend"] + [f"{op} {ph}" + (" MB/s" if op in volume else " s")
                          for op, ph in cols] + ["peak RSS MiB"]
    rows = []
    for name, r in results.items():
        rows.append([name] + [_fmt(value(name, op, ph)) for op, ph in cols]
                    + [_fmt(max(r.rss) if r.rss else None, 1)])
    for mine in ("squashstore", "squashstore-inline"):
        for peer in ("squashfuse_ll", "kernel"):
            if peer not in results or mine not in results:
                continue
            ratio = []
            for op, ph in cols:
                ours, theirs = value(mine, op, ph), value(peer, op, ph)
                # Ratios > 1 mean squashstore is slower (times) or faster (read MB/s).
                ratio.append(f"{ours / theirs:.2f}x")
            rows.append([f"{mine} / {peer}", *ratio, ""])
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(str(c).rjust(wd) for c, wd in zip(row, widths, strict=True)))
    print("(times are medians in seconds; read in MB/s; ratio >1: slower time, faster read)")
    cpu_rows = [[name] + [_fmt(statistics.median(r.cpu[c]), 3) if c in r.cpu else "-"
                          for c in cols] for name, r in results.items() if r.cpu]
    if cpu_rows:
        head = ["server CPU s"] + [f"{op} {ph}" for op, ph in cols]
        widths = [max(len(str(row[i])) for row in [head, *cpu_rows]) for i in range(len(head))]
        for row in [head, *cpu_rows]:
            print("  ".join(str(c).rjust(wd) for c, wd in zip(row, widths, strict=True)))
        print("(the FUSE server's user + system CPU seconds per operation, medians)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, help="the tree to pack (default: pip install)")
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES))
    parser.add_argument("--modules", nargs="+", default=None, help="what to import")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--work", type=Path, default=None,
                        help="work directory (kept; default: a temporary one)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_fuse: needs root (loop mounts, drop_caches)")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-fuse-"))
    work.mkdir(parents=True, exist_ok=True)
    tree = args.tree or make_tree(work, tuple(args.packages))
    image = work / "tree.sqfs"
    if not image.exists():
        _sh(["mksquashfs", str(tree), str(image), "-comp", "zstd", "-b", "131072",
             "-quiet", "-no-progress"])
    w = workload(tree, args.modules)
    print(f"tree {tree}: {len(w.paths)} paths, {len(w.files)} files, "
          f"{w.total_bytes / 1e6:.0f} MB ({len(w.big_files)} files of >= 1 MiB: "
          f"{w.big_bytes / 1e6:.0f} MB); image {image.stat().st_size / 1e6:.0f} MB; "
          f"import {', '.join(w.modules)}; {args.runs} runs; {os.cpu_count()} CPUs",
          flush=True)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    results = {}
    for backend in args.backends:
        if backend != "kernel" and not backend.startswith("squashstore") \
                and not shutil.which(backend):
            print(f"{backend}: not installed, skipped")
            continue
        t = time.perf_counter()
        results[backend] = bench_backend(backend, image, mnt, w, args.runs)
        print(f"{backend}: done in {time.perf_counter() - t:.0f}s", flush=True)
    report(results, w)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
