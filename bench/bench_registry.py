"""Registries: `migrate docker://` and `pull`, against podman's pull, in one run.

A real `docker-registry` over TLS on 127.0.0.1 (tests/support/registry.py) holds the
realistic three-layer image pushed by podman (gzip). Timed in the same run:
- `squashstore migrate docker://...` vs `podman pull` + `squashstore migrate` of the pulled
  image (what a site does without registry support);
- `squashstore pull` of the squashstore artifact (push'd once) vs `migrate docker://` (the
  conversion every node would otherwise repeat);
- peak memory of `push` and `pull` of a big squash file (an image of one random file of
  ``--big-mb`` MB, migrated from podman; `pull --no-mount` includes checking the squash file
  against the layer's diff id, as every pull does).
Run: .venv/bin/python bench/bench_registry.py [--big-mb N]
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


def _cli(store: Path, *args: str) -> list[str]:
    return [SQUASHSTORE, "--store", str(store), *args]


def _big_image(store: Path, work: Path, megabytes: int) -> tuple[str, int]:
    """A store image of one random file of `megabytes` MB (built by podman, migrated: a
    genuine layer, as a pull checks); its id and its squash file's size. (A sparse squash
    file with a made-up diff id, as this bench once used, is refused by every pull now.)"""
    tree = work / "big-tree"
    tree.mkdir()
    with (tree / "random.bin").open("wb") as f:
        for _ in range(megabytes):
            f.write(os.urandom(1 << 20))
    podman, image = build_image(work / "big-podman", tree)
    try:
        subprocess.run(_cli(store, "migrate", "--no-mount", image), env=podman.env,
                       check=True, capture_output=True)
    finally:  # the file's other copies (build context, podman's layer) go at once
        podman.close()
        for path in (tree, work / "big-podman"):
            shutil.rmtree(path, ignore_errors=True)
    found = json.loads(subprocess.run(_cli(store, "images", "--format", "json"), check=True,
                                      capture_output=True, text=True).stdout)
    size = sum(p.stat().st_size for p in (store / "squashstore" / "squash").iterdir())
    return found[0]["id"], size


def main() -> int:
    parser = arguments(__doc__)
    parser.add_argument("--big-mb", type=int, default=1024, metavar="N",
                        help="the big image's file, in MB (default 1024)")
    big_mb = parser.parse_args().big_mb
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

        big_id, big = _big_image(work / "big", work, big_mb)
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
        print_table(f"push / pull of a {big / 1e6:.0f} MB squash file",
                    ["what", "wall s", "MB/s", "peak MB"],
                    [["push", f"{push_big.wall:.1f}", f"{big / 1e6 / push_big.wall:.0f}",
                      f"{push_big.peak_rss_mb:.0f}"],
                     ["pull", f"{pull_big.wall:.1f}", f"{big / 1e6 / pull_big.wall:.0f}",
                      f"{pull_big.peak_rss_mb:.0f}"]])
        print(f"peak memory / file size: push {push_big.peak_rss_mb * 2**20 / big:.3f}, "
              f"pull {pull_big.peak_rss_mb * 2**20 / big:.3f}")
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
