"""How long `squashstore cleanup` takes against the number of containers and mounted images.

A private consumer podman (configured with `squashstore config`'s lines) over a store of 20
images, all mounted; containers are added with ``podman create`` (cheap: never started) up to
200, plus a few running ``sleep`` containers, and at each step we time ``squashstore cleanup``
(the whole command, default grace: every mount is checked, none is old enough to go), the
tracker's observation alone (in process), and ``podman ps -a --format json``, the alternative
way to learn which containers run (what the tracker reads instead: podman's files and
/proc/self/mountinfo). Finally the running containers stop and ``cleanup --grace 0`` unmounts
all 20. Run: ``.venv/bin/python bench/bench_cleanup.py [--images 20] [--containers 200]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_store import SqLayer, make_squash, store_image_source  # noqa: E402

from squashstore import cleanup, host  # noqa: E402
from squashstore.config import DEFAULT_MIN_AGE, Config  # noqa: E402
from squashstore.image import Image  # noqa: E402
from squashstore.migrate import migrate_image  # noqa: E402
from squashstore.mounts import Registry  # noqa: E402
from squashstore.store import Store  # noqa: E402
from support.fixture_trees import write_base_tar  # noqa: E402
from support.podman import Podman, make_podman  # noqa: E402

SQUASHSTORE = str(ROOT / ".venv" / "bin" / "squashstore")
MOUNT_PROGRAM = str(ROOT / ".venv" / "bin" / "squashstore-mount-program")
RUNNING = 4


def median_time(argv: list[str], env: dict[str, str], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_call(func: Any, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_store(work: Path, producer: Podman, count: int, env: dict[str, str]) -> list[str]:
    """A store of ``count`` images sharing one squash file under distinct layer digests."""
    producer.import_tar(write_base_tar(work / "base.tar"), "localhost/bench-base:1",
                        'CMD ["/bin/sh"]', "ENV PATH=/bin")
    layer = make_squash(producer, "localhost/bench-base:1", work / "base.sqfs")
    source = store_image_source(producer, "localhost/bench-base:1")
    store = Store(work / "store")
    names = []
    for i in range(count):
        name = f"localhost/bench{i}:1"
        digest = "sha256:" + f"{i:064x}"

        def squasher(image: Image, dest: Path, options: Any, tar_split: Path,
                     digest: str = digest) -> SqLayer:
            shutil.copyfile(layer.path, dest)
            return SqLayer(dest, digest, layer.diff_size)

        migrate_image(store, dataclasses.replace(source, names=(name,)), {"bench": i},
                      mount=False, registry=Registry(Path(env["SQUASHSTORE_RUNTIME_DIR"])),
                      squasher=squasher)
        names.append(name)
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--containers", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sqbench-", dir="/tmp"))
    run_dir = work / "rt"
    config = work / "config.toml"
    config.write_text('[mount]\nbackend = "kernel"\n')
    env = {**os.environ, "SQUASHSTORE_RUNTIME_DIR": str(run_dir),
           "SQUASHSTORE_CONFIG": str(config)}
    os.environ.update({k: env[k] for k in ("SQUASHSTORE_RUNTIME_DIR", "SQUASHSTORE_CONFIG")})
    producer = consumer = None
    try:
        producer = make_podman(work)
        names = make_store(work, producer, args.images, env)
        consumer = make_podman(work, [work / "store"], MOUNT_PROGRAM)
        consumer.env.update(env)
        cenv = {**env, **consumer.env}
        for i in range(RUNNING):
            consumer.run("run", "-d", "--pull=never", names[i % len(names)], "sleep", "3600")
        for name in names:
            subprocess.run([SQUASHSTORE, "--store", str(work / "store"), "mount", name],
                           env=cenv, check=True, capture_output=True)
        cleanup_argv = [SQUASHSTORE, "--store", str(work / "store"), "cleanup"]
        registry = Registry(run_dir)
        print(f"{'containers':>10} {'mounts':>6} {'cleanup s':>9} {'observe s':>9} "
              f"{'podman ps s':>11}")
        created = 0
        for target in [c for c in (0, 50, 100) if c < args.containers] + [args.containers]:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda i: consumer.run("create", "--pull=never",
                                                     names[i % len(names)], "true")
                              if consumer else None, range(created, target)))
            created = target
            whole = median_time(cleanup_argv, cenv)
            observe = median_call(lambda: cleanup.observe(registry, [work / "store"], Config()))
            ps = median_time(["podman", "ps", "-a", "--format", "json"], cenv)
            mounts = sum(host.is_mountpoint(Path(r.mountpoint)) for r in registry.records())
            print(f"{target + RUNNING:>10} {mounts:>6} {whole:>9.3f} {observe:>9.3f} {ps:>11.3f}",
                  flush=True)
        consumer.run("stop", "-a", "-t", "0", timeout=600)
        # A mount whose last container started less than min_age ago counts as being set up.
        time.sleep(DEFAULT_MIN_AGE + 0.5)
        start = time.perf_counter()
        out = subprocess.run([*cleanup_argv, "--grace", "0", "--format", "json"], env=cenv,
                             check=True, capture_output=True, text=True).stdout
        elapsed = time.perf_counter() - start
        unmounted = sum(1 for r in json.loads(out) if r["action"] == cleanup.UNMOUNT)
        print(f"cleanup --grace 0 after stopping everything: {unmounted} unmounted in "
              f"{elapsed:.3f} s")
    finally:
        for podman in (consumer, producer):
            if podman is not None:
                podman.close()
        Registry(run_dir).umount_all(lazy=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
