"""Registries: `migrate docker://` and `pull`, against podman's pull, in one run.

A real `docker-registry` over TLS on 127.0.0.1 (tests/support/registry.py) holds the
realistic three-layer image pushed by podman (gzip). Timed in the same run:
- `squashstore migrate docker://...` vs `podman pull` + `squashstore migrate` of the pulled
  image (what a site does without registry support);
- `squashstore pull` of the squashstore artifact (push'd once) vs `migrate docker://` (the
  conversion every node would otherwise repeat);
- peak memory of `push` and `pull` of a 2 GB squash file (a sparse file published into a
  store with a made-up diff id: only the transfer is measured, `--no-mount`).
Run: .venv/bin/python bench/bench_registry.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, arguments, build_image, print_table, realistic_tree, timed, tree_stats

SQUASHSTORE = str(ROOT / ".venv/bin/squashstore")
BIG = 2 << 30


def _cli(store: Path, *args: str) -> list[str]:
    return [SQUASHSTORE, "--store", str(store), *args]


def _fake_big_image(store: Path, work: Path) -> str:
    """A store image whose squash file is a sparse 2 GB file; its id."""
    from squashstore.migrate import squashed_config, squashed_manifest
    from squashstore.store import Publication, Store

    s = Store(store)
    s.init()
    with s.staging() as stage:
        squash = stage / "layer.sqfs"
        with squash.open("wb") as f:
            f.truncate(BIG)
        diff = "sha256:" + "5a" * 32
        config = squashed_config({"architecture": "amd64", "os": "linux", "config": {},
                                  "rootfs": {"type": "layers", "diff_ids": []}}, diff)
        image = s.publish(Publication(squash, diff, BIG, config,
                                      squashed_manifest(config, diff, BIG),
                                      ("localhost/bench-big:1",), "2026-01-01T00:00:00Z"))
    return image.id


def main() -> int:
    arguments(__doc__).parse_args()
    from support.podman import make_podman
    from support.registry import RegistryServer, make_pki

    tree = realistic_tree()
    files, size = tree_stats(tree)
    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    server = None
    podman = None
    consumer = None
    try:
        pki = make_pki(work / "pki")
        server = RegistryServer(work / "registry", pki)
        certs = ("--cert-dir", str(pki.certs))
        podman, image = build_image(work / "podman", tree)
        remote = f"{server.host}/bench/image:1"
        podman.run("push", *certs, image, f"docker://{remote}")
        env = dict(os.environ)

        direct = timed(_cli(work / "s1", "migrate", "--no-mount", *certs,
                            f"docker://{remote}"), env=env)
        consumer = make_podman(work / "consumer")
        pulled = timed(["podman", "pull", *certs, f"docker://{remote}"], env=consumer.env)
        local = timed(_cli(work / "s2", "migrate", "--no-mount", remote),
                      env={**env, **consumer.env})
        artifact = f"{server.host}/bench/image:squashed"
        subprocess.run(_cli(work / "s1", "push", *certs, remote, artifact),
                       check=True, capture_output=True)
        fetch = timed(_cli(work / "s3", "pull", "--no-mount", *certs, artifact), env=env)

        big_id = _fake_big_image(work / "big", work)
        push_big = timed(_cli(work / "big", "push", *certs, big_id,
                              f"{server.host}/bench/big:1"), env=env)
        pull_big = timed(_cli(work / "big-pulled", "pull", "--no-mount", *certs,
                              f"{server.host}/bench/big:1"), env=env)
        pulled_id = json.loads(subprocess.run(
            _cli(work / "big-pulled", "images", "--format", "json"), check=True,
            capture_output=True, text=True).stdout)[0]["id"]
        assert pulled_id == big_id

        print(f"image: {files} files, {size / 1e6:.0f} MB in 3 layers (gzip in the registry)")
        two_step = pulled.wall + local.wall
        print_table("migrate docker:// vs podman pull + migrate",
                    ["what", "wall s", "cpu s", "peak MB"],
                    [["migrate docker://", f"{direct.wall:.1f}", f"{direct.cpu:.1f}",
                      f"{direct.peak_rss_mb:.0f}"],
                     ["podman pull", f"{pulled.wall:.1f}", f"{pulled.cpu:.1f}",
                      f"{pulled.peak_rss_mb:.0f}"],
                     ["migrate (local)", f"{local.wall:.1f}", f"{local.cpu:.1f}",
                      f"{local.peak_rss_mb:.0f}"]])
        print(f"ratio migrate docker:// / (podman pull + migrate): "
              f"{direct.wall / two_step:.2f} (wall)")
        print_table("pull of the squashstore artifact vs migrate docker://",
                    ["what", "wall s", "cpu s", "peak MB"],
                    [["pull artifact", f"{fetch.wall:.1f}", f"{fetch.cpu:.1f}",
                      f"{fetch.peak_rss_mb:.0f}"],
                     ["migrate docker://", f"{direct.wall:.1f}", f"{direct.cpu:.1f}",
                      f"{direct.peak_rss_mb:.0f}"]])
        print(f"ratio pull artifact / migrate docker://: {fetch.wall / direct.wall:.2f} (wall)")
        print_table(f"push / pull of a {BIG >> 30} GB squash file",
                    ["what", "wall s", "MB/s", "peak MB"],
                    [["push", f"{push_big.wall:.1f}", f"{BIG / 1e6 / push_big.wall:.0f}",
                      f"{push_big.peak_rss_mb:.0f}"],
                     ["pull", f"{pull_big.wall:.1f}", f"{BIG / 1e6 / pull_big.wall:.0f}",
                      f"{pull_big.peak_rss_mb:.0f}"]])
        print(f"peak memory / file size: push {push_big.peak_rss_mb * 2**20 / BIG:.3f}, "
              f"pull {pull_big.peak_rss_mb * 2**20 / BIG:.3f}")
    finally:
        for p in (consumer, podman):
            if p is not None:
                p.close()
        if server is not None:
            server.close()
        subprocess.run(["umount", "-R", "-l", str(work)], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
