"""Benchmark: squashstore's FUSE server against squashfuse_ll, squashfuse and the kernel.

One run packs one realistic Python tree (``pip install --target`` of a few large packages;
/usr/lib/python3 when pip cannot) into one squashfs image with mksquashfs (zstd, 128 KiB
blocks), then for every backend measures, fresh (unmount, drop the page cache, mount again)
and warm (the same mount once more): ``find``, ``lstat`` of every path, reading every byte
(MB/s), reading the files of 1 MiB and more (sequential MB/s), and
``python -c 'import ...'`` through the mount (PYTHONPATH into it), plus the FUSE servers'
peak RSS. It prints medians and the ratios against squashfuse_ll and the kernel.
Backends are interleaved (each operation runs on every backend in turn, the order rotating
from run to run), so a load that comes and goes on a shared machine hits all of them alike;
the load average is printed before and after. Needs root (loop mounts,
``/proc/sys/vm/drop_caches``). Speed is reported, never asserted.

    sudo .venv/bin/python bench/bench_fuse.py [--tree DIR] [--runs 3] [--work DIR]
        [--backends squashstore squashfuse_ll kernel ...]
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
BACKENDS = ("squashstore", "squashstore-inline", "squashstore-open", "squashstore-stock",
            "squashstore-base", "squashfuse_ll", "squashfuse", "kernel")
"""squashstore-inline: the same server with ``--threads=0`` (no decompression threads);
squashstore-open: with ``--open-requests`` (OPEN/RELEASE and OPENDIR/RELEASEDIR answered,
as a stock pyfuse3 build must: what the kernel's no-open mode saves); squashstore-stock:
the server run by ``--stock-python``, an interpreter with the stock pyfuse3 3.5.0 wheel
(what scripts/pyfuse3-cache-dirs.py saves in all); squashstore-base: the server of another
checkout, run by that checkout's interpreter (``--base-python``, e.g. main's
``.venv/bin/python``) with its own code and pyfuse3: an A/B of two branches in one run."""
SERVER_ARGS = {"squashstore": [], "squashstore-inline": ["--threads=0"],
               "squashstore-open": ["--open-requests"], "squashstore-stock": [],
               "squashstore-base": []}
STOCK_PYTHON: list[str] = []
"""The interpreter of squashstore-stock (``--stock-python``)."""
BASE_PYTHON: list[str] = []
"""The interpreter of squashstore-base (``--base-python``)."""
UNMOUNT_WAIT = 60.0
"""Seconds a FUSE server may take to exit after its unmount (then it is killed)."""
OPS = ("find", "stat", "read", "bigread", "import")
BIG = 1 << 20
"""Files at least this large make the ``bigread`` (sequential throughput) set."""


# ----------------------------------------------------------------------------- mounting


def _sh(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, check=True, stdin=subprocess.DEVNULL,
                          capture_output=True, **kw)  # type: ignore[call-overload]


def _holds_dev_fuse(pid: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                return True
        except OSError:
            continue
    return False


def _server_pid(mountpoint: Path) -> int | None:
    """The pid of the FUSE server whose command line names `mountpoint` (the process that
    holds /dev/fuse: not a parent still exiting, nor any other process naming the path)."""
    want = str(mountpoint).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in argv and _holds_dev_fuse(int(entry.name)):
            return int(entry.name)
    return None


def _state(pid: int) -> str:
    """The process state letter of `pid` ("" when it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


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
    if backend == "squashstore-stock":
        root = str(Path(__file__).resolve().parent.parent)
        _sh([*STOCK_PYTHON, "-m", "squashstore.fuse.daemon", str(image), str(mnt)],
            env={**os.environ, "PYTHONPATH": root})
    elif backend == "squashstore-base":  # its own checkout's code: not this one's via cwd
        _sh([*BASE_PYTHON, "-m", "squashstore.fuse.daemon", str(image), str(mnt)], cwd="/")
    elif backend.startswith("squashstore"):
        _sh([sys.executable, "-m", "squashstore.fuse.daemon", *SERVER_ARGS[backend],
             str(image), str(mnt)])
    else:
        _sh([backend, str(image), str(mnt)])
    _wait(lambda: _mounted(mnt))
    os.stat(mnt)
    deadline = time.monotonic() + 30
    while (pid := _server_pid(mnt)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{backend}: no process holding /dev/fuse serves {mnt}")
        time.sleep(0.01)
    return pid


def umount(backend: str, mnt: Path, pid: int | None) -> None:
    if backend == "kernel":
        _sh(["umount", str(mnt)])
    else:
        _sh(["fusermount3", "-u", str(mnt)])
    if pid is None:
        return
    # A server exits once the kernel drops the mount's last copy. A mount namespace made
    # while the mount existed (rootless podman's, `unshare -m`: other users' tests on a
    # shared machine) holds a copy the unmount here does not touch, so the server rightly
    # goes on serving it; the old 30 s wait then ended the whole run. Wait, then say why
    # and kill the server (the copy elsewhere then fails with ENOTCONN: bench mounts only).
    try:
        _wait(lambda: _state(pid) in ("", "Z", "X"), UNMOUNT_WAIT)
    except RuntimeError:
        holders = _namespaces_holding(mnt)
        sys.stderr.write(f"{backend}: server {pid} still running {UNMOUNT_WAIT:.0f}s after "
                         f"its unmount (state {_state(pid)}; the mount is still in the "
                         f"mount namespace of {holders or 'no other process'}): killed\n")
        os.kill(pid, 9)


def _namespaces_holding(mountpoint: Path) -> list[str]:
    """"pid (comm)" of one process per other mount namespace that still has `mountpoint`."""
    target, ours, seen, out = str(mountpoint), os.readlink("/proc/self/ns/mnt"), set(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ns = os.readlink(entry / "ns" / "mnt")
            if ns == ours or ns in seen:
                continue
            seen.add(ns)
            with open(entry / "mountinfo") as f:
                if any(line.split()[4] == target for line in f):
                    out.append(f"{entry.name} ({(entry / 'comm').read_text().strip()})")
        except OSError:
            continue
    return out


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


def bench_once(backend: str, op: str, image: Path, mnt: Path, w: Workload,
               result: Result) -> None:
    """One fresh and one warm `op` on a new mount of `image` with `backend`."""
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


def bench_interleaved(backends: list[str], ops: list[str], image: Path, mnt: Path,
                      w: Workload, runs: int) -> dict[str, Result]:
    """Every operation on every backend in turn, the backends' order rotating each run."""
    results = {backend: Result() for backend in backends}
    for run in range(runs):
        order = backends[run % len(backends):] + backends[:run % len(backends)]
        for op in ops:
            for backend in order:
                bench_once(backend, op, image, mnt, w, results[backend])
        print(f"run {run + 1}/{runs} done, load {_load()}", flush=True)
    return results


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


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


def report(results: dict[str, Result], w: Workload, ops: list[str]) -> None:
    mb = w.total_bytes / 1e6
    cols = [(op, phase) for op in ops for phase in ("fresh", "warm")]
    volume = {"read": mb, "bigread": w.big_bytes / 1e6}

    def value(name: str, op: str, phase: str) -> float:
        s = results[name].median(op, phase)
        return (volume[op] / s if s else 0.0) if op in volume else s

    head = ["backend"] + [f"{op} {ph}" + (" MB/s" if op in volume else " s")
                          for op, ph in cols] + ["peak RSS MiB"]
    rows = []
    for name, r in results.items():
        rows.append([name] + [_fmt(value(name, op, ph)) for op, ph in cols]
                    + [_fmt(max(r.rss) if r.rss else None, 1)])
    for mine in ("squashstore", "squashstore-inline", "squashstore-open", "squashstore-stock",
                 "squashstore-base"):
        for peer in ("squashfuse_ll", "kernel"):
            if peer not in results or mine not in results:
                continue
            ratio = []
            for op, ph in cols:
                ours, theirs = value(mine, op, ph), value(peer, op, ph)
                # Ratios > 1 mean squashstore is slower (times) or faster (read MB/s).
                ratio.append(f"{ours / theirs:.2f}x" if theirs else "-")
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
    parser.add_argument("--backends", nargs="+", default=None, choices=BACKENDS,
                        help="default: all but squashstore-stock and squashstore-base")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--stock-python", type=Path, default=None,
                        help="an interpreter whose pyfuse3 is the stock 3.5.0 wheel (with "
                        "squashstore's other dependencies), for the squashstore-stock backend")
    parser.add_argument("--base-python", type=Path, default=None,
                        help="another checkout's interpreter (its .venv/bin/python), for the "
                        "squashstore-base backend")
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
    backends = []
    for backend in args.backends or [b for b in BACKENDS
                                     if b not in ("squashstore-stock", "squashstore-base")]:
        if backend != "kernel" and not backend.startswith("squashstore") \
                and not shutil.which(backend):
            print(f"{backend}: not installed, skipped")
            continue
        if backend == "squashstore-stock" and args.stock_python is None:
            print(f"{backend}: needs --stock-python, skipped")
            continue
        if backend == "squashstore-base" and args.base_python is None:
            print(f"{backend}: needs --base-python, skipped")
            continue
        backends.append(backend)
    if args.stock_python is not None:
        STOCK_PYTHON.append(str(args.stock_python))
    if args.base_python is not None:
        BASE_PYTHON.append(str(args.base_python))
    t = time.perf_counter()
    print(f"load before: {_load()}", flush=True)
    results = bench_interleaved(backends, args.ops, image, mnt, w, args.runs)
    print(f"done in {time.perf_counter() - t:.0f}s; load after: {_load()}", flush=True)
    report(results, w, args.ops)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
