"""Container start from a squash store against a start from podman's own store.

`podman run --rm IMG true` is timed, in one run and interleaved round by round (the machine
is shared: medians of many rounds), for: the image in podman's own store (the peer); the
same image in a squash store with the layer already mounted (the mount program's fast path);
and with the layer unmounted before each start (the mount program mounts it). The mount
itself is timed on its own (`Mounter.mount`, in this process) so the first start can be
compared with "mounted start + mount". Each backend of `--backend` (default: fuse, the
project's own server, and kernel) gets its own store and consumer podman.
Run: .venv/bin/python bench/bench_start.py [--rounds N] [--backend fuse,kernel]
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
from pathlib import Path

from common import ROOT, print_table

SQUASHSTORE = str(ROOT / ".venv/bin/squashstore")
MOUNT_PROGRAM = str(ROOT / ".venv/bin/squashstore-mount-program")
IMAGE = "localhost/bench-start:1"
COMMAND = ("run", "--rm", "--pull=never", "--network", "none", IMAGE, "true")


def run_seconds(env: dict[str, str], argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backend", default="fuse,kernel")
    parser.add_argument("--program", action="append", default=[], metavar="LABEL=PATH",
                        help="another mount program to time in the same run (e.g. an older "
                        "checkout's, through a wrapper)")
    args = parser.parse_args()
    programs = {"": MOUNT_PROGRAM} | dict(p.split("=", 1) for p in args.program)
    backends = [(b, label) for b in args.backend.split(",") if b for label in programs]

    from squashstore import host
    from squashstore.mounts import Registry, mounter
    from support.fixture_trees import write_base_tar
    from support.podman import make_podman

    work = Path(tempfile.mkdtemp(prefix="sqs-bench-start-"))
    podmen = []
    setups: dict[str, tuple[dict[str, str], Registry]] = {}
    try:
        producer = make_podman(work / "producer")
        podmen.append(producer)
        producer.import_tar(write_base_tar(work / "base.tar"), IMAGE, "ENV PATH=/bin")
        for backend, label in backends:
            name = f"{backend}{' ' + label if label else ''}"
            run_dir = work / f"run-{backend}{label}"
            config = work / f"config-{backend}.toml"
            config.write_text(f'[mount]\nbackend = "{backend}"\n')
            extra = {"SQUASHSTORE_RUNTIME_DIR": str(run_dir), "SQUASHSTORE_CONFIG": str(config)}
            store = work / f"store-{backend}{label}"
            subprocess.run([SQUASHSTORE, "--store", str(store), "migrate", IMAGE, "--no-mount"],
                           env={**producer.env, **extra}, check=True, capture_output=True)
            consumer = make_podman(work / f"consumer-{backend}{label}", [store],
                                   programs[label])
            podmen.append(consumer)
            env = {**consumer.env, **extra}  # podman passes its environment to the program
            os.environ.update(extra)
            registry = Registry(run_dir)
            setups[name] = (env, registry)

        times: dict[str, list[float]] = {"podman": []}
        for _ in range(2):  # warm-up: page cache, podman's own first-run work
            run_seconds(producer.env, ["podman", *COMMAND])
            for env, _registry in setups.values():
                run_seconds(env, ["podman", *COMMAND])
        for _ in range(args.rounds):
            times["podman"].append(run_seconds(producer.env, ["podman", *COMMAND]))
            for backend, (env, registry) in setups.items():
                times.setdefault(f"{backend} mounted", []).append(
                    run_seconds(env, ["podman", *COMMAND]))
                registry.umount_all(lazy=True)
                times.setdefault(f"{backend} unmounted", []).append(
                    run_seconds(env, ["podman", *COMMAND]))
                record = registry.records()
                if not record:
                    raise SystemExit(f"{backend}: the start left no mount record")
                squash, point = Path(record[0].squash), Path(record[0].mountpoint)
                registry.umount_all(lazy=True)
                chosen = mounter(backend.split()[0])
                start = time.perf_counter()
                chosen.mount(squash, point)
                times.setdefault(f"{backend} mount itself", []).append(
                    time.perf_counter() - start)
                chosen.umount(point, lazy=True)
                while host.is_mountpoint(point):
                    time.sleep(0.01)
                run_seconds(env, ["podman", *COMMAND])  # mounted again for the next round

        base = statistics.median(times["podman"])
        rows = [["podman's own store", f"{base:.3f}", "1.00", ""]]
        for backend in setups:
            mounted = statistics.median(times[f"{backend} mounted"])
            cold = statistics.median(times[f"{backend} unmounted"])
            mount = statistics.median(times[f"{backend} mount itself"])
            rows.append([f"store ({backend}), image mounted", f"{mounted:.3f}",
                         f"{mounted / base:.2f}", ""])
            rows.append([f"store ({backend}), image unmounted", f"{cold:.3f}",
                         f"{cold / base:.2f}",
                         f"{cold - mounted - mount:+.3f} s vs mounted + mount "
                         f"({mount:.3f} s)"])
        print_table(f"podman run --rm IMG true: medians of {args.rounds} interleaved rounds "
                    f"(load average {os.getloadavg()[0]:.1f})",
                    ["start", "median s", "ratio", "first start overhead"], rows)
    finally:
        for _env, registry in setups.values():
            registry.umount_all(lazy=True)
        for podman in podmen:
            podman.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
