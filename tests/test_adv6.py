"""Adversarial checks of registries, Slurm and the store's own operations (session 6, adv6).

Each test here failed against main f2ef3da and names what it holds. Real parts: a real
other user (``sqsuser``) for what another user can write, the real registry
(``docker-registry``) for what a registry can send, the real CLI as users run it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_registry import CREDS, Site, _migrated_id, make_site, pki, registries
from test_store import PYTHON, cli

from squashstore.lazy import paths as lazy_paths
from squashstore.publish import PUBLISH_HOOK, PUBLISH_STEPS
from squashstore.registry.client import Client, RegistryOptions
from support.registry import Pki, RegistryServer

__all__ = ["make_site", "pki", "registries"]  # test_registry's fixtures, shared

OTHER_USER = "sqsuser"
"""A real unprivileged user of this machine (scripts/install creates it)."""


def _one_line(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("squashstore: ") and proc.stderr.count("\n") == 1, \
        proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def _tree(path: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry below `path` (and `path`): mode and content, lstat-ed."""
    out = {}
    for entry in [path, *sorted(path.rglob("*"))]:
        st = os.lstat(entry)
        data = entry.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        out[str(entry.relative_to(path))] = (st.st_mode, data)
    return out


def test_root_never_creates_a_store_through_another_users_directory(tmp_path: Path) -> None:
    """A careless root picks a store path in a world-writable directory (``/tmp/x``) that
    another user created first, with ``overlay-images`` a symlink to a private directory
    of root's. `init` (and every writer, which inits first) made that directory 0755 and
    wrote images.json and images.lock into it, before any trust check ran. It must
    refuse, touching nothing outside the store."""
    user = pwd.getpwnam(OTHER_USER)
    public = tmp_path / "tmp"
    public.mkdir()
    os.chmod(public, 0o1777)  # like /tmp
    victim = tmp_path / "private"
    victim.mkdir(mode=0o700)
    (victim / "secret").write_text("root's")
    before = _tree(victim)
    for planted in ("overlay-images", "squashstore"):
        store = public / f"store-{planted}"
        store.mkdir()
        (store / planted).symlink_to(victim)
        for path in (store, store / planted):
            os.lchown(path, user.pw_uid, user.pw_gid)
        proc = cli(store, "init", check=False)
        _one_line(proc, "refusing to act as root")
        assert _tree(victim) == before
    # below a directory the other user owns, even a store not yet there
    theirs = public / "theirs"
    theirs.mkdir()
    os.chown(theirs, user.pw_uid, user.pw_gid)
    _one_line(cli(theirs / "store", "init", check=False), "refusing to act as root")
    assert not (theirs / "store").exists()


def _crafted_artifact(origin: Site, host: str, pki: Pki, fixture_images: dict[str, str],
                      repository: str) -> tuple[str, str]:
    """Push base and whiteouts as artifacts, then a hostile one claiming whiteouts' layer
    (config, diff id, tar-split claims) with base's squash file: (hostile, genuine) refs."""
    for name in ("base", "whiteouts"):
        _migrated_id(origin, fixture_images[name])
        origin.cli("push", "--creds", CREDS, fixture_images[name], f"{host}/{repository}:{name}")
    client = Client(host, RegistryOptions(cert_dir=pki.certs, creds=CREDS))
    claimed = json.loads(client.get_manifest(repository, "whiteouts")[0])
    other = json.loads(client.get_manifest(repository, "base")[0])
    for index in (0, 1, 2):
        claimed["layers"][index]["digest"] = other["layers"][index]["digest"]
        claimed["layers"][index]["size"] = other["layers"][index]["size"]
    put = client.request("PUT", f"/v2/{repository}/manifests/crafted", repository, push=True,
                         headers={"Content-Type": claimed["mediaType"]},
                         data=json.dumps(claimed).encode())
    assert put.status_code == 201, put.text
    return f"{host}/{repository}:crafted", f"{host}/{repository}:whiteouts"


@pytest.mark.podman
def test_a_lazy_pull_never_shares_another_artifacts_unchecked_layer(
        make_site: Callable[[str], Site], fixture_images: dict[str, str],
        registries: dict[str, RegistryServer], pki: Pki) -> None:
    """A hostile artifact claiming a popular layer's diff id, pulled --lazy (its claim
    cannot be checked before its bytes are all here), stood in for that layer in every
    later ``pull --lazy`` of the genuine artifact: the genuine image ran from the hostile
    partial cache and its registry. The later lazy pull must refuse; an eager one replaces
    the partial file with the genuine, checked one."""
    host = registries["token"].host
    origin = make_site("origin")
    hostile, genuine = _crafted_artifact(origin, host, pki, fixture_images, "adv6/lazy")
    node = make_site("node")
    node.cli("pull", "--lazy", "--no-mount", "--creds", CREDS, hostile)
    proc = node.cli("pull", "--lazy", "--no-mount", "--creds", CREDS, genuine, check=False)
    _one_line(proc, "pulled lazily from", "without --lazy")
    assert len(node.store.images()) == 1
    iid = node.image_id(node.cli("pull", "--no-mount", "--format", "json", "--creds", CREDS,
                                 genuine))
    want = origin.store.resolve(iid).squash.read_bytes()
    assert node.store.resolve(iid).squash.read_bytes() == want
    assert not lazy_paths.is_lazy(node.store.resolve(iid).squash)


@pytest.mark.podman
def test_a_pushers_squash_options_annotation_is_shown_safely(
        make_site: Callable[[str], Site], fixture_images: dict[str, str],
        registries: dict[str, RegistryServer], pki: Pki) -> None:
    """An artifact's squash-options annotation is the pusher's text, kept as the layer's
    options. A later `migrate` of the same image keeps that layer and names its options:
    a non-numeric block size was a traceback (after the migrate had published), and an
    escape sequence in the compression reached the user's terminal raw."""
    host = registries["token"].host
    origin = make_site("origin")
    _migrated_id(origin, fixture_images["base"])
    origin.cli("push", "--creds", CREDS, fixture_images["base"], f"{host}/adv6/opts:1")
    client = Client(host, RegistryOptions(cert_dir=pki.certs, creds=CREDS))
    manifest = json.loads(client.get_manifest("adv6/opts", "1")[0])
    manifest["annotations"]["io.squashstore.squash-options"] = json.dumps(
        {"compression": "\x1b]0;owned\x07\x1b[2J", "block_size": "lots", "level": [1]})
    put = client.request("PUT", "/v2/adv6/opts/manifests/2", "adv6/opts", push=True,
                         headers={"Content-Type": manifest["mediaType"]},
                         data=json.dumps(manifest).encode())
    assert put.status_code == 201, put.text
    node = make_site("node")
    node.cli("pull", "--no-mount", "--creds", CREDS, f"{host}/adv6/opts:2")
    proc = node.cli("migrate", "--no-mount", fixture_images["base"], tls=False, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "\x1b" not in proc.stderr + proc.stdout
    assert "kept as it was written" in proc.stderr


@pytest.mark.podman
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_a_pull_after_a_writer_killed_mid_publish_installs(
        make_site: Callable[[str], Site], fixture_images: dict[str, str],
        registries: dict[str, RegistryServer], pki: Pki, tmp_path: Path, lazy: bool) -> None:
    """A migrate killed inside publish right after its squash file was renamed in (Ctrl-C,
    OOM killer, a node's reboot) leaves that file with no record: a leftover the next
    writer removes. A pull of an artifact of the same layer took the leftover for the
    store's own layer (no download), then its publish removed the leftover and failed
    with `layer.sqfs: No such file or directory`. It must install."""
    host = registries["token"].host
    origin = make_site("origin")
    _migrated_id(origin, fixture_images["base"])
    ref = f"{host}/adv6/killed:1"
    origin.cli("push", "--creds", CREDS, fixture_images["base"], ref)
    node = make_site("node")
    hook = tmp_path / "hook"
    hook.mkdir()
    writer = subprocess.Popen(
        [str(PYTHON), "-m", "squashstore.cli.main", "--store", str(node.store.root),
         "migrate", "--no-mount", fixture_images["base"]],
        env={**node.env, PUBLISH_HOOK: str(hook)}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for step in PUBLISH_STEPS[:1]:
            (hook / f"{step}.go").touch()
        deadline = time.monotonic() + 240
        while not (hook / "squash-file.reached").exists():
            assert writer.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        writer.kill()
        writer.wait()
    assert node.store.images() == [] and list(node.store.squash_dir.glob("*.sqfs"))
    if lazy:  # (completing it would need `squashstore login`: the FUSE server's way)
        node.cli("pull", "--lazy", "--no-mount", "--creds", CREDS, ref)
        assert node.cli("verify", tls=False).returncode == 0
        (image,) = node.store.images()
        assert lazy_paths.is_lazy(image.squash)
        return
    iid = node.image_id(node.cli("pull", "--no-mount", "--format", "json", "--creds", CREDS,
                                 ref))
    image = node.store.resolve(iid)
    assert image.squash.read_bytes() == origin.store.resolve(iid).squash.read_bytes()
    assert node.cli("verify", tls=False).returncode == 0


@pytest.mark.podman
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_a_pull_onto_a_full_disk_is_one_line_and_leaves_the_store_as_it_was(
        make_site: Callable[[str], Site], fixture_images: dict[str, str],
        registries: dict[str, RegistryServer], pki: Pki, tmp_path: Path, lazy: bool) -> None:
    """A store on a file system too small for the squash file (a real tmpfs)."""
    host = registries["token"].host
    origin = make_site("origin")
    iid = _migrated_id(origin, fixture_images["base"])
    squash = origin.store.resolve(iid).squash.stat().st_size
    ref = f"{host}/adv6/full:1"
    origin.cli("push", "--creds", CREDS, fixture_images["base"], ref)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={squash // 2}", "tmpfs", str(small)],
                   check=True)
    try:
        store = small / "store"
        cli(store, "init")
        before = _tree(store)
        proc = cli(store, "pull", *(("--lazy",) if lazy else ()), "--no-mount", "--creds",
                   CREDS, "--cert-dir", str(pki.certs), ref, check=False,
                   env={**os.environ, "SQUASHSTORE_RUNTIME_DIR": str(tmp_path / "run")})
        if proc.returncode == 0:  # a lazy pull fits: only its metadata is here
            assert lazy, proc.stderr
            assert cli(store, "verify").returncode == 0
            return
        _one_line(proc)
        assert "No space left on device" in proc.stderr or "space" in proc.stderr
        after = {k: v for k, v in _tree(store).items() if not k.endswith(".pull.lock")}
        assert after == before  # a pull lock stays: a waiter may hold it open
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def _altered_squash(squash: Path, work: Path, change: str) -> Path:
    """`squash` with one change made by the real squashfs tools: an extra file, a setuid
    bit, a symlink retargeted, a file's owner changed."""
    tree = work / f"tree-{change}"
    subprocess.run(["unsquashfs", "-q", "-n", "-d", str(tree), str(squash)], check=True,
                   capture_output=True)
    if change == "extra":
        (tree / "etc" / "ld.so.preload").write_text("/tmp/evil.so\n")
    elif change == "setuid":
        os.chmod(tree / "bin" / "busybox", 0o4755)
    elif change == "symlink":
        (tree / "links" / "rel").unlink()
        (tree / "links" / "rel").symlink_to("/tmp/evil")
    elif change == "owner":
        os.chown(tree / "etc" / "passwd", 1001, 1001)
    out = work / f"{change}.sqfs"
    subprocess.run(["mksquashfs", str(tree), str(out), "-noappend", "-quiet", "-no-progress"],
                   check=True, capture_output=True)
    return out


@pytest.mark.podman
def test_an_artifact_whose_squash_file_adds_or_alters_entries_is_refused(
        make_site: Callable[[str], Site], fixture_images: dict[str, str],
        registries: dict[str, RegistryServer], pki: Pki, tmp_path: Path) -> None:
    """The layer check (session 2's critical finding: an artifact claiming another image's
    layer) rebuilt the tar from the tar-split and read from the squash file only the files
    the tar-split names, by path, checking their bytes: a squash file with an extra file
    (``/etc/ld.so.preload``), a setuid bit, a symlink pointing elsewhere or another owner
    passed, was filed as the genuine layer id, and a later migrate or pull of the genuine
    image (its layer kept, as the store's own) ran from it."""
    host = registries["token"].host
    origin = make_site("origin")
    iid = _migrated_id(origin, fixture_images["base"])
    genuine_squash = origin.store.resolve(iid).squash
    origin.cli("push", "--creds", CREDS, fixture_images["base"], f"{host}/adv6/alter:genuine")
    client = Client(host, RegistryOptions(cert_dir=pki.certs, creds=CREDS))
    genuine = json.loads(client.get_manifest("adv6/alter", "genuine")[0])
    node = make_site("node")
    for change in ("extra", "setuid", "symlink", "owner"):
        altered = _altered_squash(genuine_squash, tmp_path, change)
        digest = "sha256:" + hashlib.sha256(altered.read_bytes()).hexdigest()
        client.upload_blob("adv6/alter", altered, digest)
        manifest = json.loads(json.dumps(genuine))
        manifest["layers"] = [layer for layer in manifest["layers"]
                              if "chunk-digests" not in layer["mediaType"]]
        manifest["layers"][0]["digest"] = digest
        manifest["layers"][0]["size"] = altered.stat().st_size
        put = client.request("PUT", f"/v2/adv6/alter/manifests/{change}", "adv6/alter",
                             push=True, headers={"Content-Type": manifest["mediaType"]},
                             data=json.dumps(manifest).encode())
        assert put.status_code == 201, put.text
        proc = node.cli("pull", "--no-mount", "--creds", CREDS, f"{host}/adv6/alter:{change}",
                        check=False)
        _one_line(proc, "does not hold the layer it claims")
        assert node.store.images() == [], change
    # the genuine artifact still passes the check
    node.cli("pull", "--no-mount", "--creds", CREDS, f"{host}/adv6/alter:genuine")
    assert node.store.resolve(iid).squash.read_bytes() == genuine_squash.read_bytes()
