"""Lazy pull: time to the first `import numpy` on a fresh store, and bytes moved, in one run.

A real `docker-registry` over TLS on 127.0.0.1 (tests/support/registry.py) holds the
realistic image (numpy, scipy, pandas: bench/common.py) pushed by podman, and its squashed
artifact pushed by squashstore. Every client reaches it through a TCP proxy throttled to
`RATE` bytes/s (a cluster-like link, so transfer time shows) that counts the bytes it
forwards. For each way onto a fresh store, the time from the command's start until the
host's Python has imported numpy from the image's mounted layer (the FUSE mount the command
leaves behind; podman would run the same files):
- `pull --lazy` of the artifact (blocks fetched as the import reads them),
- `pull --lazy` of the artifact with a start-up prefetch list (`squashstore record` of the
  same import on the origin; its ranges fetched in bulk before pull returns),
- `pull` of the artifact (the whole squash file first),
- `migrate docker://` of the ordinary image (layers downloaded and squashed on the node).
Run: .venv/bin/python bench/bench_lazy.py
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, arguments, build_image, print_table, realistic_tree, tree_stats

SQUASHSTORE = str(ROOT / ".venv/bin/squashstore")
RATE = 100e6
"""Bytes per second through the proxy (both directions together)."""


class Throttle:
    """A TCP proxy on 127.0.0.1 to `target_port`, `rate` bytes/s shared by all connections,
    counting the bytes sent to clients."""

    def __init__(self, target_port: int, rate: float) -> None:
        self.target_port, self.rate = target_port, rate
        self.sent = 0
        self._lock = threading.Lock()
        self._next = time.monotonic()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _pace(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + n / self.rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(upstream, client, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(client, upstream, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(65536):
                self._pace(len(data))
                dst.sendall(data)
                if count:
                    with self._lock:
                        self.sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


def _cli(store: Path, *args: str) -> list[str]:
    return [SQUASHSTORE, "--store", str(store), *args]


IMPORT = [sys.executable, "-c", "import numpy; numpy.zeros(3).sum()"]


def import_env(env: dict[str, str], diff: Path) -> dict[str, str]:
    """`IMPORT` run by the host's Python from the image's mounted layer."""
    return {**env, "PYTHONPATH": str(diff / "usr/lib/python3/site-packages"),
            "PYTHONDONTWRITEBYTECODE": "1"}


def first_import(store: Path, argv: list[str], proxy: Throttle, env: dict[str, str]
                 ) -> tuple[float, float, int]:
    """(seconds until the command is done, until numpy imported, bytes through the proxy)."""
    before = proxy.sent
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, text=True, env=env)
    installed = time.perf_counter() - start
    diff = next(p for p in store.glob("overlay/*/diff") if os.path.ismount(p))
    subprocess.run(IMPORT, check=True, env=import_env(env, diff), cwd="/")
    done = time.perf_counter() - start
    return installed, done, proxy.sent - before


def main() -> int:
    arguments(__doc__).parse_args()
    from support.registry import RegistryServer, make_pki

    tree = realistic_tree()
    files, size = tree_stats(tree)
    work = Path(tempfile.mkdtemp(prefix="bench-lazy-"))
    server = podman = proxy = None
    stores: list[Path] = []
    try:
        pki = make_pki(work / "pki")
        server = RegistryServer(work / "registry", pki)
        certs = ("--cert-dir", str(pki.certs))
        podman, image = build_image(work / "podman", tree)
        origin = f"{server.host}/bench/image:1"
        podman.run("push", *certs, image, f"docker://{origin}")
        subprocess.run(_cli(work / "origin", "migrate", "--no-mount", *certs,
                            f"docker://{origin}"), check=True, capture_output=True)
        subprocess.run(_cli(work / "origin", "push", *certs, origin,
                            f"{server.host}/bench/image:squashed"), check=True,
                       capture_output=True)
        squash = next((work / "origin").glob("squashstore/squash/*.sqfs")).stat().st_size
        # The same import, recorded on the origin (a fresh mount of its complete image).
        diff = next(p for p in (work / "origin").glob("overlay/*/diff"))
        pythonpath = import_env({}, diff)
        recorded = subprocess.run(
            _cli(work / "origin", "record", "--format", "json", origin, "--", "env",
                 *(f"{k}={v}" for k, v in pythonpath.items()), *IMPORT),
            check=True, capture_output=True, text=True, cwd="/")
        listed = json.loads(recorded.stdout)
        subprocess.run(_cli(work / "origin", "push", *certs, origin,
                            f"{server.host}/bench/image:prefetch"), check=True,
                       capture_output=True)
        proxy = Throttle(server.port, RATE)
        via = f"127.0.0.1:{proxy.port}"
        env = dict(os.environ)
        rows = []
        for label, args in (
                ("pull --lazy", ("pull", "--lazy", *certs, f"{via}/bench/image:squashed")),
                ("pull --lazy, prefetch list",
                 ("pull", "--lazy", *certs, f"{via}/bench/image:prefetch")),
                ("pull", ("pull", *certs, f"{via}/bench/image:squashed")),
                ("migrate docker://", ("migrate", *certs, f"docker://{via}/bench/image:1"))):
            store = work / "".join(c if c.isalnum() else "-" for c in label)
            stores.append(store)
            installed, done, moved = first_import(store, _cli(store, *args), proxy, env)
            rows.append([label, f"{installed:.1f}", f"{done:.1f}", f"{moved / 1e6:.1f}",
                         f"{100 * moved / squash:.0f} %"])
        print(f"image: {files} files, {size / 1e6:.0f} MB; squash file {squash / 1e6:.0f} MB;"
              f" link {RATE / 1e6:.0f} MB/s; prefetch list {listed['bytes'] / 1e6:.1f} MB in "
              f"{listed['ranges']} ranges")
        print_table("fresh store -> first `import numpy` from the mounted image",
                    ["how", "command s", "to import s", "MB moved", "of squash"], rows)
        lazy, listed_lazy, full, migrate = (float(row[2]) for row in rows)
        print(f"time to import, ratio to pull: pull --lazy {lazy / full:.2f}, with the "
              f"prefetch list {listed_lazy / full:.2f}; to migrate docker://: "
              f"{lazy / migrate:.2f} and {listed_lazy / migrate:.2f}")
    finally:
        for store in stores:
            subprocess.run(_cli(store, "umount", "--all"), capture_output=True, check=False)
        if proxy is not None:
            proxy.close()
        if podman is not None:
            podman.close()
        if server is not None:
            server.close()
        subprocess.run(["umount", "-R", "-l", str(work)], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
