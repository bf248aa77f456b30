"""Clusters: the file-system load of a container start on the store, and readers during a publish.

Part 1, per container start: the same three-layer image (busybox, a real Python site-packages
tree, two of its packages again) is run with ``podman run --rm IMAGE CMD`` from
  * the squash store (an additional image store with squashstore's mount program; the start is
    cold: the image is unmounted first, so the mount and the FUSE server's reads count),
  * an ordinary additional image store of overlay layers (a second podman's graphroot), and
  * podman's own store (the image in the consumer's graphroot),
under ``strace -ff`` (podman, the mount program, the FUSE server, conmon, runc and the
container). Counted are the system calls on paths below the store in question (opens, stats
of every kind, readlinks) and on descriptors opened there (reads, directory reads), for two
commands: ``true`` (the start alone) and a tree walk that reads every ``.py`` file (an import
storm). What strace cannot see is the kernel's own work: the overlay's lookups in each lower
layer for every path the container touches happen in the kernel, on the shared file system,
without a system call; so the container's own file system calls are shown too (each is at
least one lookup per layer on an overlay store, and nothing on the shared file system for a
mounted squash image, whose FUSE server reads only the one squash file).

Known gap (seen in every run here): the counts come out the same for ``true`` and for the
walk, and the container's own calls as 1: strace does not report the container's processes
(runc's init and what it forks) nor, through the second strace, the server's reads while the
container walks; so the columns measure podman's and the mount's own work on the store (its
metadata reads per start), not the reads of the workload. Those need a kernel-side count
(fanotify on the store's file system, or NFS's /proc/self/mountstats with the store on NFS).

Part 2, on the 3-node Slurm cluster of tests/support/slurm.py: node n1 migrates a large image
(``--size-mb``, default 1024: random and compressible halves) into the shared store while node
n2 starts containers of another store image in a loop; printed: n2's start times before and
during the migrate (median, longest) and so the longest wait a reader had.

Run: ``.venv/bin/python bench/bench_cluster.py [--size-mb 1024] [--runs 3] [--skip-publish]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from common import print_table, realistic_tree  # noqa: E402

from support.fixture_trees import write_base_tar  # noqa: E402
from support.podman import Podman, make_podman  # noqa: E402
from support.slurm import Cluster  # noqa: E402

BIN = ROOT / ".venv" / "bin"
SQUASHSTORE = str(BIN / "squashstore")
MOUNT_PROGRAM = str(BIN / "squashstore-mount-program")
IMAGE = "localhost/bench-cluster:1"
BASE = "localhost/bench-cluster-base:1"
SYSCALLS = ("openat,open,stat,lstat,newfstatat,statx,access,faccessat,faccessat2,readlink,"
            "readlinkat,getdents64,read,pread64,readv,execve,mount,clone,clone3,fork,vfork")
WORKLOADS = {
    "start (true)": ["true"],
    "walk + read *.py": ["sh", "-c", "find /usr/lib/python3 -name '*.py' | xargs cat | wc -c"],
}

_LINE = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+|\?)")
_PATH = re.compile(r'"((?:[^"\\]|\\.)*)"')
_FD = re.compile(r"^\d+<([^>]*)>")
KINDS = {"openat": "open", "open": "open", "stat": "stat", "lstat": "stat",
         "newfstatat": "stat", "statx": "stat", "access": "stat", "faccessat": "stat",
         "faccessat2": "stat", "readlink": "stat", "readlinkat": "stat",
         "getdents64": "readdir", "read": "read", "pread64": "read", "readv": "read"}


@dataclass
class Count:
    store: Counter[str]
    container: int
    seconds: float


def count_trace(folder: Path, store: Path) -> tuple[Counter[str], int]:
    """(ops on ``store`` by kind, file system calls of the container's processes).

    strace runs with ``-y``, so a descriptor shows its path (``read(4</s/x.sqfs>, ...)``).
    The container's processes are those that exec'd a program of the image (in ``/bin``: the
    host's podman, conmon, runc, mount and the mount program run from /usr or the venv) and
    everything they forked (busybox's shell runs applets without an exec).
    """
    prefix = str(store.resolve()) + "/"
    calls: dict[int, list[tuple[str, str, str]]] = {}
    for trace in folder.iterdir():
        pid = trace.name.rpartition(".")[2]
        if not pid.isdigit():
            continue
        out = calls.setdefault(int(pid), [])
        for line in trace.read_text(errors="replace").splitlines():
            match = _LINE.match(line)
            if match:
                name, args, result = match.groups()
                out.append((name, args, result))
    children: dict[int, list[int]] = {}
    roots = set()
    for pid, items in calls.items():
        for name, args, result in items:
            if name in ("clone", "clone3", "fork", "vfork") and result.isdigit():
                children.setdefault(pid, []).append(int(result))
            if name == "execve" and result == "0" and args.startswith('"/bin/'):
                roots.add(pid)
    container: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid not in container:
            container.add(pid)
            stack += children.get(pid, [])
    ops: Counter[str] = Counter()
    in_container = 0
    for pid, items in calls.items():
        counting = pid in container and pid not in roots
        for name, args, result in items:
            if name == "execve" and result == "0" and args.startswith('"/bin/'):
                counting = pid in container
                continue
            kind = KINDS.get(name)
            if kind is None:
                continue
            if counting and kind != "read":
                in_container += 1
            fd = _FD.match(args)
            paths = _PATH.findall(args)
            path = fd.group(1) if fd and kind in ("read", "readdir") else (
                paths[0] if paths else "")
            if path.startswith(prefix):
                ops[kind] += 1
    return ops, in_container


def traced(argv: list[str], env: dict[str, str], folder: Path,
           attach: int | None = None) -> float:
    """Run ``argv`` under ``strace -ff`` (and strace ``attach``, a running FUSE server, with
    a second strace: one strace tracing both a FUSE server and a reader of its files can
    deadlock on a page fault); the seconds ``argv`` took. strace is told to detach (SIGINT)
    once ``argv`` has exited, since it would wait for any server the command spawned."""
    rc = folder / "rc"
    base = ["strace", "-I", "2", "-f", "-y", "-qq", "-e", f"trace={SYSCALLS}", "-e",
            "signal=none"]
    tracers = []
    if attach is not None:
        tracers.append(subprocess.Popen([*base, "-ff", "-o", str(folder / "s"), "-p",
                                         str(attach)], stderr=subprocess.DEVNULL))
        time.sleep(0.5)
    command = " ".join(shlex.quote(a) for a in argv)
    start = time.perf_counter()
    main = subprocess.Popen([*base, "-ff", "-o", str(folder / "t"), "sh", "-c",
                             f"{command} >/dev/null 2>&1; echo $? > {rc}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tracers.append(main)
    while (not rc.exists() or not rc.read_text().strip()) and main.poll() is None:
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    for tracer in tracers:
        tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(timeout=5)
        except subprocess.TimeoutExpired:
            # A tracee it cannot detach from (conmon with a zombie child): what it wrote so
            # far is the whole start; the tracees are left to run on.
            tracer.kill()
            tracer.wait()
    if rc.read_text().strip() != "0":
        raise RuntimeError(f"{argv} under strace failed")
    rc.unlink()
    return seconds


def traced_run(podman: Podman, store: Path, command: list[str],
               squash_env: dict[str, str] | None = None) -> Count:
    """One container start under strace: for the squash store a cold one (unmounted first;
    the mount, by ``squashstore mount``, is traced with its server, then the run with the
    server traced apart)."""
    folder = Path(tempfile.mkdtemp(prefix="strace-", dir=podman.root / "tmp"))
    run = ["podman", "run", "--rm", "--pull=never", IMAGE, *command]
    seconds, server = 0.0, None
    if squash_env is not None:
        subprocess.run([SQUASHSTORE, "umount", "--all"], env=squash_env, check=False,
                       capture_output=True)
        seconds += traced([SQUASHSTORE, "mount", IMAGE], squash_env, folder)
        records = json.loads(subprocess.run([SQUASHSTORE, "mounts", "--format", "json"],
                                            env=squash_env, capture_output=True, text=True,
                                            check=True).stdout)
        server = int(records[0]["pid"])
    seconds += traced(run, {**podman.env, **(squash_env or {})}, folder, attach=server)
    ops, container = count_trace(folder, store)
    shutil.rmtree(folder)
    return Count(ops, container, seconds)


def timed_run(podman: Podman, command: list[str]) -> float:
    start = time.perf_counter()
    podman.run("run", "--rm", "--pull=never", IMAGE, *command)
    return time.perf_counter() - start


def build_image(source: Podman, work: Path) -> None:
    """IMAGE in ``source``: busybox, then a Python tree, then two of its packages again."""
    source.import_tar(write_base_tar(work / "base.tar"), BASE, 'CMD ["/bin/sh"]',
                      "ENV PATH=/bin")
    tree = realistic_tree()
    ctx = work / "ctx"
    shutil.copytree(tree, ctx / "site", symlinks=True)
    extra = sorted(p.name for p in tree.iterdir() if p.is_dir())[:2]
    (ctx / "Containerfile").write_text(
        f"FROM {BASE}\nCOPY site/ /usr/lib/python3/site-packages/\n"
        + "".join(f"COPY site/{p} /usr/lib/python3/site-packages/{p}\n" for p in extra))
    source.build(ctx, IMAGE)


def part1(work: Path, runs: int, trace: bool = True) -> None:
    source = make_podman(work / "src")
    consumers: list[Podman] = []
    try:
        build_image(source, work)
        archive = source.save(IMAGE, work / "image.tar")
        # The squash store.
        squash_store = work / "squash" / "store"
        env = {**source.env, "SQUASHSTORE_STORE": str(squash_store),
               "SQUASHSTORE_RUNTIME_DIR": str(work / "squash" / "run")}
        subprocess.run([SQUASHSTORE, "migrate", IMAGE, "--no-mount"], env=env, check=True,
                       capture_output=True)
        on_squash = make_podman(work / "c1", [squash_store], MOUNT_PROGRAM)
        on_squash.env.update({k: env[k] for k in ("SQUASHSTORE_RUNTIME_DIR",)})
        # An ordinary additional image store of overlay layers: another podman's graphroot.
        layers = make_podman(work / "layers")
        layers.load(archive)
        on_layers = make_podman(work / "c2", [layers.graphroot])
        # podman's own store.
        own = make_podman(work / "c3")
        own.load(archive)
        consumers += [on_squash, layers, on_layers, own]
        cases = [("squash store (cold: mounts)", on_squash, squash_store),
                 ("overlay layers, additional store", on_layers, layers.graphroot),
                 ("podman's own store", own, own.graphroot)]
        rows = []
        for workload, command in WORKLOADS.items():
            for label, podman, store in cases:
                counts = []
                for _ in range(runs if trace else 0):
                    counts.append(traced_run(podman, store, command,
                                             env if podman is on_squash else None))
                times = []
                for _ in range(runs):
                    if podman is on_squash:
                        subprocess.run([SQUASHSTORE, "umount", "--all"], env={**env},
                                       check=False, capture_output=True)
                    times.append(timed_run(podman, command))
                warm = statistics.median(timed_run(podman, command) for _ in range(runs))
                ops = counts[-1].store if counts else Counter()
                shown = [str(ops["open"]), str(ops["stat"]), str(ops["read"]),
                         str(ops["readdir"]), str(sum(ops.values())),
                         str(counts[-1].container)] if counts else ["-"] * 6
                rows.append([workload, label, *shown, f"{statistics.median(times):.2f}",
                             f"{warm:.2f}"])
        print_table("Per container start: system calls on the store's file system "
                    "(strace -ff; last of the runs)",
                    ["workload", "store", "opens", "stats", "reads", "readdirs", "total",
                     "container's own fs calls", "start s (cold)", "start s (warm)"], rows)
    finally:
        for podman in reversed(consumers):
            podman.close()
        subprocess.run([SQUASHSTORE, "umount", "--all"],
                       env={**os.environ, "SQUASHSTORE_RUNTIME_DIR": str(work / "squash" / "run")},
                       check=False, capture_output=True)
        source.close()


def big_tar(dest: Path, size_mb: int) -> Path:
    """busybox plus ``size_mb`` MiB in 64 MiB files: half random, half repetitive text."""
    write_base_tar(dest)
    chunk = 64 << 20
    with tarfile.open(dest, "a") as tf:
        for i in range(max(1, size_mb // 64)):
            path = dest.parent / "chunk"
            with open(path, "wb") as out:
                if i % 2:
                    out.write((f"line {i} of compressible text\n".encode() * (chunk // 30 + 1))
                              [:chunk])
                else:
                    out.write(os.urandom(chunk))
            tf.add(path, f"opt/big/{i:03d}")
            path.unlink()
    return dest


def part2(work: Path, size_mb: int) -> None:
    source = make_podman(work / "src2")
    store = work / "shared" / "store"
    try:
        source.import_tar(write_base_tar(work / "small.tar"), BASE, 'CMD ["/bin/sh"]',
                          "ENV PATH=/bin")
        env = {**source.env, "SQUASHSTORE_STORE": str(store),
               "SQUASHSTORE_RUNTIME_DIR": str(work / "run2"), "PATH":
               f"{BIN}:{os.environ['PATH']}"}
        subprocess.run([SQUASHSTORE, "migrate", BASE, "--no-mount"], env=env, check=True,
                       capture_output=True)
        big = "localhost/bench-big:1"
        source.import_tar(big_tar(work / "big.tar", size_mb), big)
        (work / "big.tar").unlink()
        archive = source.save(big, work / "big-archive.tar")
        source.run("rmi", big)
        node_env = {k: v for k, v in env.items() if k != "SQUASHSTORE_RUNTIME_DIR"}
        with Cluster(store, "proctrack/cgroup", mount_program=MOUNT_PROGRAM,
                     env=node_env) as cluster:

            def start() -> float:
                t = time.perf_counter()
                cluster.on_node("n2", "podman", "run", "--rm", "--pull=never", BASE, "true")
                return time.perf_counter() - t

            start()  # mounts
            before = [start() for _ in range(8)]
            during: list[float] = []
            done = threading.Event()
            result: list[float] = []

            def migrate() -> None:
                t = time.perf_counter()
                cluster.on_node("n1", SQUASHSTORE, "migrate", f"oci-archive:{archive}",
                                "--no-mount", timeout=3600)
                result.append(time.perf_counter() - t)
                done.set()

            thread = threading.Thread(target=migrate)
            thread.start()
            while not done.is_set():
                during.append(start())
            thread.join()
            epilog = [time_epilog(cluster, store, "n2")]  # n2's one unused mount goes
            epilog += [time_epilog(cluster, store, "n2") for _ in range(3)]  # nothing to do
        rows = [["before the migrate", str(len(before)), f"{statistics.median(before):.2f}",
                 f"{max(before):.2f}"],
                ["during the migrate", str(len(during)), f"{statistics.median(during):.2f}",
                 f"{max(during):.2f}"]]
        print_table(f"n2's `podman run --rm {BASE} true` while n1 migrates {size_mb} MiB "
                    f"into the shared store ({result[0]:.1f} s)",
                    ["when", "starts", "median s", "longest s"], rows)
        print(f"longest reader wait beyond the usual start: "
              f"{max(during) - statistics.median(before):.2f} s")
        print(f"contrib/slurm/epilog on a node: {epilog[0]:.2f} s unmounting one unused "
              f"mount, {statistics.median(epilog[1:]):.2f} s with nothing to do")
    finally:
        source.close()


def time_epilog(cluster: Cluster, store: Path, node: str) -> float:
    """Wall time of the shipped epilog on ``node`` (as slurmd runs it: root, SLURM_JOB_ID)."""
    t = time.perf_counter()
    cluster.on_node(node, "env", "-i", "SLURM_JOB_ID=999999", f"SQUASHSTORE={SQUASHSTORE}",
                    f"SQUASHSTORE_STORE={store}", str(ROOT / "contrib" / "slurm" / "epilog"))
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-publish", action="store_true")
    parser.add_argument("--skip-ops", action="store_true")
    parser.add_argument("--no-strace", action="store_true",
                        help="only the start times (no strace anywhere near the servers)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-", dir="/var/tmp"))
    try:
        if not args.skip_ops:
            part1(work, args.runs, trace=not args.no_strace)
        if not args.skip_publish:
            part2(work, args.size_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
