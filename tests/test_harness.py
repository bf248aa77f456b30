"""Proofs that the test harness is sound: the private podman stays private and cleans up,
the fixture images have the layers (whiteouts, opaque dirs, hard links) the docs promise,
``podman export`` adds nothing that `normalise_podman_export` does not remove, the listing
of a directory equals the listing of a tar of it, and `diff_listings` sees small changes."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import fixture_trees as ft
from support.listing import (
    Entry,
    Listing,
    canonical_from_dir,
    canonical_from_tar,
    diff_listings,
    normalise_podman_export,
    tar_of_dir_gnu,
    tar_of_dir_python,
)
from support.podman import Podman, mounts_below

pytestmark = pytest.mark.podman

DEFAULT_STORE = Path("/var/lib/containers")
# podman 4.3.1 as root keeps its blob-info cache (digest -> compression hints, no image data)
# in /var/lib/containers/cache/blob-info-cache-v1.boltdb whatever graphroot says, and has no
# setting to move it: `podman import` and `podman save` update it. Everything else is private.
BLOB_INFO_CACHE = DEFAULT_STORE / "cache"


def _snapshot(top: Path) -> list[tuple[str, int, int, int]]:
    """(path, mtime_ns, size, inode) of everything below `top` but the blob-info cache
    (empty if missing; `top`'s own mtime changes when podman first creates the cache)."""
    if not top.exists():
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        if Path(dirpath) == top and BLOB_INFO_CACHE.name in dirnames:
            dirnames.remove(BLOB_INFO_CACHE.name)
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out.append((p, st.st_mtime_ns, st.st_size, st.st_ino))
    return sorted(out)


# ----------------------------------------------------------------------------- private podman


def test_private_podman_never_touches_default_store(
    make_podman: Callable[..., Podman], tmp_path: Path
) -> None:
    before = _snapshot(DEFAULT_STORE)
    p = make_podman()
    info = json.loads(p.text("info", "--format", "json"))
    store = info["store"]
    assert Path(store["graphRoot"]) == p.graphroot
    assert Path(store["runRoot"]) == p.runroot
    assert Path(store["configFile"]) == p.storage_conf
    assert len(str(p.runroot)) <= 40  # longer runroots make `podman run` wait 20 s
    with tarfile.open(tmp_path / "one.tar", "w"):
        pass
    p.import_tar(tmp_path / "one.tar", "localhost/private:1", 'CMD ["x"]')
    p.export("localhost/private:1", tmp_path / "out.tar")
    assert "localhost/private:1" in p.text("images", "--format", "{{.Repository}}:{{.Tag}}")
    assert _snapshot(DEFAULT_STORE) == before
    assert any(p.graphroot.iterdir())


def test_close_removes_containers_mounts_and_root(
    make_podman: Callable[..., Podman], fixture_images: dict[str, str], podman: Podman,
    tmp_path: Path,
) -> None:
    p = make_podman()
    podman.run("save", "--format", "oci-archive", "-o", str(tmp_path / "b.tar"),
               fixture_images["base"])
    p.run("load", "-i", str(tmp_path / "b.tar"))
    cid = p.create(fixture_images["base"])
    container_mount = p.text("mount", cid)
    image_mount = p.text("image", "mount", fixture_images["base"])
    assert {container_mount, image_mount} <= set(p.mounts_below_root())
    p.close()
    assert not p.root.exists()
    assert mounts_below(p.root) == []


def test_consumer_podman_with_additional_store_and_mount_program(
    make_podman: Callable[..., Podman], podman: Podman, fixture_images: dict[str, str],
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    consumer = make_podman(additional_stores=[store], mount_program="/usr/bin/fuse-overlayfs")
    text = consumer.storage_conf.read_text()
    assert f'additionalimagestores = ["{store}"]' in text
    assert '[storage.options.overlay]\nmount_program = "/usr/bin/fuse-overlayfs"' in text
    options = consumer.text("info", "--format", "{{json .Store.GraphOptions}}")
    assert str(store) in options and "fuse-overlayfs" in options
    consumer.load(podman.save(fixture_images["base"], tmp_path / "base.tar"))
    out = consumer.text("run", "--rm", "--pull=never", fixture_images["base"],
                        "/bin/sh", "-c", "grep ' / / ' /proc/self/mountinfo")
    assert "fuse-overlayfs" in out
    assert consumer.mounts_below_root() == []


def test_fixture_image_runs_with_its_config(
    podman: Podman, fixture_images: dict[str, str]
) -> None:
    out = podman.text("run", "--rm", "--pull=never", fixture_images["special"],
                      "id -u; id -g; pwd; echo $SQS_FIXTURE; cat /names/empty-file")
    assert out.split() == ["1234", "5678", "/work", "1"]
    assert podman.text("run", "--rm", "--pull=never", fixture_images["big"]) == "fixture"


def test_started_container_export_differs_as_documented(
    podman: Podman, fixture_images: dict[str, str], tmp_path: Path
) -> None:
    image = fixture_images["base"]
    name = "sqs-harness-started"
    podman.run("run", "--name", name, "--pull=never", image, "/bin/sh", "-c", "true")
    try:
        podman.run("export", "-o", str(tmp_path / "started.tar"), name)
    finally:
        podman.run("rm", "-f", name)
    started = canonical_from_tar(tmp_path / "started.tar")
    with podman.mount_image(image) as mount:
        mounted = canonical_from_dir(mount)
    added = sorted(set(started) - set(mounted))
    assert added == ["/dev", "/etc/group", "/etc/hostname", "/etc/hosts", "/etc/mtab",
                     "/proc", "/run", "/run/.containerenv", "/sys"]
    assert set(normalise_podman_export(started)) == set(started)  # not undone: documented


def test_run_raises_with_stderr(podman: Podman) -> None:
    with pytest.raises(AssertionError, match="no-such-image"):
        podman.run("image", "inspect", "localhost/no-such-image:1")
    assert podman.run("image", "inspect", "localhost/no-such-image:1", check=False).returncode


# ----------------------------------------------------------------------------- fixture images


def test_fixture_images_exist_with_expected_layer_counts(
    podman: Podman, fixture_images: dict[str, str]
) -> None:
    assert set(fixture_images) == set(ft.FIXTURE_NAMES)
    for name, ref in fixture_images.items():
        assert len(podman.layers(ref)) == ft.LAYER_COUNTS[name], name


def _layer_members(podman: Podman, ref: str, dest: Path) -> list[dict[str, tarfile.TarInfo]]:
    """Each layer of `ref` (bottom first) as name -> member, from ``podman save`` oci-dir."""
    podman.run("save", "--format", "oci-dir", "--uncompressed", "-o", str(dest), ref)
    blobs = dest / "blobs" / "sha256"
    index = json.loads((dest / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    layers = []
    for layer in manifest["layers"]:
        with tarfile.open(blobs / layer["digest"][7:]) as tf:
            layers.append({m.name.removeprefix("./"): m for m in tf.getmembers()})
    return layers


def test_whiteouts_image_layers_hold_whiteouts_and_opaque_dirs(
    podman: Podman, fixture_images: dict[str, str], tmp_path: Path
) -> None:
    layers = _layer_members(podman, fixture_images["whiteouts"], tmp_path / "oci")
    assert len(layers) == 7
    assert "etc/config" in layers[1]
    assert "copied/new-file" in layers[2]
    assert {"opt/app/.wh.a", ".wh.empty-dir", "data/file-then-dir/.wh..wh..opq"} <= set(layers[3])
    assert layers[3]["data/dir-then-file"].isreg()
    assert layers[3]["data/file-then-dir"].isdir()
    assert "opt/app/.wh..wh..opq" in layers[4]
    assert layers[4]["data/file-then-dir"].isreg()
    assert ".wh.hl" in layers[5]
    assert "hl/new" in layers[6]


def test_hardlinks_image_layers_hold_links_within_and_across(
    podman: Podman, fixture_images: dict[str, str], tmp_path: Path
) -> None:
    layers = _layer_members(podman, fixture_images["hardlinks"], tmp_path / "oci")
    assert layers[0]["hl/two"].islnk()
    l2 = layers[1]
    assert l2["hl/one"].isreg() and l2["hl/three"].islnk()
    assert {l2[f"links2/f{i}"].linkname for i in (2, 3, 4)} == {"links2/f1"}
    assert layers[2]["links2/f2"].isreg()
    assert "links2/.wh.f3" in layers[3] and layers[3]["links2/setuid-link"].islnk()
    assert layers[4]["links2/f4"].islnk() and layers[4]["links2/f4"].linkname == "empty-file"


@pytest.fixture(scope="module")
def exported(
    podman: Podman, fixture_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Listing]:
    out = tmp_path_factory.mktemp("exports")
    return {
        name: normalise_podman_export(canonical_from_tar(podman.export(ref, out / f"{name}.tar")))
        for name, ref in fixture_images.items()
    }


@pytest.mark.parametrize("name", ft.FIXTURE_NAMES)
def test_podman_export_equals_image_mount(
    podman: Podman, fixture_images: dict[str, str], exported: dict[str, Listing], name: str
) -> None:
    mount = Path(podman.text("image", "mount", fixture_images[name]))
    try:
        mounted = canonical_from_dir(mount)
    finally:
        podman.run("image", "unmount", fixture_images[name])
    # podman export writes no entry for the root directory itself.
    assert "/" not in exported[name]
    assert diff_listings(mounted, exported[name], ignore_paths={"/"}) == []


def test_whiteouts_image_content(exported: dict[str, Listing]) -> None:
    w = exported["whiteouts"]
    assert sorted(p for p in w if p.startswith("/opt/app/")) == ["/opt/app/z"]
    assert w["/etc/config"].size == len("overwritten config\n")
    assert w["/data/dir-then-file"].type == "file"
    assert w["/data/file-then-dir"].type == "file"
    assert "/data/file-then-dir/inner" not in w
    assert "/empty-dir" not in w
    assert sorted(p for p in w if p.startswith("/hl")) == ["/hl", "/hl/new"]
    assert not any(".wh." in p for p in w)


def test_hardlinks_image_content(exported: dict[str, Listing]) -> None:
    h = exported["hardlinks"]
    assert h["/hl/one"].hardlinks == ("/hl/one", "/hl/three")
    assert h["/hl/two"].hardlinks == ()
    assert h["/links2/f1"].hardlinks == ()  # f2 copied up, f3 deleted, f4 relinked
    assert h["/links2/f2"].sha256 != h["/links2/f1"].sha256
    assert "/links2/f3" not in h
    assert h["/links2/f4"].hardlinks == ("/empty-file", "/links2/f4")
    assert h["/links2/setuid"].hardlinks == ("/links2/setuid", "/links2/setuid-link")
    assert h["/links2/setuid"].mode == 0o4755 and h["/links2/setuid"].uid == 1234


def test_special_image_content(exported: dict[str, Listing]) -> None:
    s = exported["special"]
    assert s["/owners/odd"].uid == 1234 and s["/owners/odd"].gid == 5678
    assert (s["/owners/link"].uid, s["/owners/link"].gid) == (42, 43)
    assert s["/modes/setuid"].mode == 0o4755
    assert s["/modes/setgid"].mode == 0o2755
    assert s["/modes/sticky"].mode == 0o1777
    assert s["/modes/none"].mode == 0
    assert s["/sym/relative"].target == "../etc/config"
    assert s["/sym/absolute"].target == "/etc/config"
    assert s["/sym/dangling"].target == "does/not/exist"
    assert s["/dev2/fifo"].type == "fifo"
    assert s["/dev2/null"].type == "chardev" and s["/dev2/null"].rdev == (1, 3)
    assert s["/dev2/bigminor"].type == "blockdev" and s["/dev2/bigminor"].rdev == (259, 1000)
    assert s["/xattr2/user"].xattrs == {"user.color": b"blue", "user.binary": ft.XATTR_BINARY}
    assert s["/xattr2/cap"].xattrs == {"security.capability": ft.CAP_NET_RAW_EP}
    assert s["/xattr/user"].xattrs == {"user.color": b"red", "user.binary": ft.XATTR_BINARY}
    assert s["/xattr/cap"].xattrs == {"security.capability": ft.CAP_NET_RAW_EP}
    assert s["/names/empty-file"].size == 0 and s["/names/empty-dir"].type == "dir"
    assert f"/names/{ft.SPACE_NAME}" in s and f"/names/{ft.UNICODE_NAME}" in s
    assert f"/names/{ft.LONG_NAME}" in s and len(ft.LONG_NAME.encode()) == 255
    deep = [p for p in s if p.endswith("/leaf")]
    assert len(deep) == 1 and len(deep[0].encode()) > 1024


def test_big_image_content(exported: dict[str, Listing]) -> None:
    b = exported["big"]
    assert b["/big/large"].size == 3072 * 1024 + 5
    assert b["/big/sparse"].size == 16777216
    assert b["/big/zeros"].size == 1 << 20
    assert len([p for p in b if p.startswith("/many/")]) == ft.MANY


def test_fixture_image_configs(podman: Podman, fixture_images: dict[str, str]) -> None:
    for name, ref in fixture_images.items():
        config = podman.inspect(ref)["Config"]
        assert isinstance(config, dict)
        if name == "base":
            assert "SQS_BASE=1" in config["Env"] and config["Cmd"] == ["/bin/sh"]
            continue
        assert set(ft.CONFIG_ENV) <= set(config["Env"]), name
        assert config["Entrypoint"] == list(ft.CONFIG_ENTRYPOINT)
        assert config["Cmd"] == list(ft.CONFIG_CMD)
        assert config["WorkingDir"] == ft.CONFIG_WORKDIR
        assert config["User"] == ft.CONFIG_USER
        assert ft.CONFIG_LABELS.items() <= config["Labels"].items()
        assert set(ft.CONFIG_EXPOSE) | {"80/tcp"} == set(config["ExposedPorts"])  # 80: base


# ----------------------------------------------------------------------------- listings


@pytest.fixture(scope="module")
def full_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ft.make_tree(tmp_path_factory.mktemp("tree") / "full", "full")


def test_make_tree_full_has_every_entry_type(full_tree: Path) -> None:
    listing = canonical_from_dir(full_tree)
    types = {e.type for e in listing.values()}
    assert types == {"dir", "file", "symlink", "chardev", "blockdev", "fifo"}
    assert listing["/hardlinks/a"].hardlinks == ("/hardlinks/a", "/hardlinks/b",
                                                 "/hardlinks/sub/c")
    assert listing["/hardlinks/fifo"].hardlinks == ("/hardlinks/fifo", "/hardlinks/fifo-link")
    assert listing["/special/setuid"].mode == 0o4755
    assert listing["/special/capability"].xattrs == {"security.capability": ft.CAP_NET_RAW_EP}
    assert {e.mtime for e in listing.values()} == {ft.FIXED_MTIME}
    assert os.stat(full_tree / "big" / "sparse").st_blocks * 512 < 1 << 20


@pytest.mark.parametrize("maker", [tar_of_dir_gnu, tar_of_dir_python])
def test_dir_listing_equals_tar_listing(
    full_tree: Path, tmp_path: Path, maker: Callable[[Path, Path], Path]
) -> None:
    tar = maker(full_tree, tmp_path / "tree.tar")
    from_dir = canonical_from_dir(full_tree)
    # GNU tar 1.34 and Python's tarfile both archive a hard-linked fifo as two separate
    # fifos (they only write link members for regular files).
    expected = [
        f"{p}: hard-link group ('/hardlinks/fifo', '/hardlinks/fifo-link') != ()"
        for p in ("/hardlinks/fifo", "/hardlinks/fifo-link")
    ]
    assert diff_listings(from_dir, canonical_from_tar(tar)) == expected
    with tar.open("rb") as f:
        assert diff_listings(from_dir, canonical_from_tar(f)) == expected


def test_listing_of_mounted_squashfs_equals_dir(full_tree: Path, tmp_path: Path) -> None:
    image = tmp_path / "tree.sqfs"
    subprocess.run(["mksquashfs", str(full_tree), str(image), "-quiet", "-no-progress",
                    "-processors", "1"], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro", str(image), str(mnt)],
                   check=True, capture_output=True)
    try:
        assert diff_listings(canonical_from_dir(full_tree), canonical_from_dir(mnt)) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    root = ft.make_tree(tmp_path / "t", "special")
    ft._tree_hardlinks(root)
    return root


def _one_diff(before: Listing, after: Listing, *words: str) -> None:
    diffs = diff_listings(before, after)
    assert diffs, "change not detected"
    assert all(any(w in d for d in diffs) for w in words), diffs


def test_diff_detects_changed_byte(small_tree: Path) -> None:
    before = canonical_from_dir(small_tree)
    path = small_tree / "etc" / "config"
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, (ft.FIXED_MTIME, ft.FIXED_MTIME))
    _one_diff(before, canonical_from_dir(small_tree), "/etc/config", "sha256")


def test_diff_detects_changed_mode(small_tree: Path) -> None:
    before = canonical_from_dir(small_tree)
    os.chmod(small_tree / "special" / "setuid", 0o755)
    _one_diff(before, canonical_from_dir(small_tree), "/special/setuid", "mode 4755 != 0755")


def test_diff_detects_changed_xattr(small_tree: Path) -> None:
    before = canonical_from_dir(small_tree)
    os.setxattr(small_tree / "special" / "user-xattrs", "user.color", b"reD")
    _one_diff(before, canonical_from_dir(small_tree), "/special/user-xattrs", "user.color")
    before = canonical_from_dir(small_tree)
    os.removexattr(small_tree / "special" / "xattr-dir", "user.on-dir")
    _one_diff(before, canonical_from_dir(small_tree), "/special/xattr-dir", "user.on-dir")


def test_diff_detects_broken_hardlink_group(small_tree: Path) -> None:
    before = canonical_from_dir(small_tree)
    b = small_tree / "hardlinks" / "b"
    b.unlink()
    shutil.copy2(small_tree / "hardlinks" / "a", b)
    os.chown(b, 7, 8)
    os.utime(small_tree / "hardlinks", (ft.FIXED_MTIME, ft.FIXED_MTIME))
    after = canonical_from_dir(small_tree)
    assert after["/hardlinks/b"].sha256 == before["/hardlinks/b"].sha256
    _one_diff(before, after, "/hardlinks/b", "hard-link group")


def test_diff_options_and_missing_paths(small_tree: Path) -> None:
    before = canonical_from_dir(small_tree)
    assert diff_listings(before, before) == []
    os.utime(small_tree, (1, 1))
    os.utime(small_tree / "etc", (1, 1))
    after = canonical_from_dir(small_tree)
    assert len(diff_listings(before, after)) == 2
    assert diff_listings(before, after, ignore_root_mtime=True, ignore_mtime={"/etc"}) == []
    assert diff_listings(before, after, compare_mtime=False) == []
    del after["/etc/config"]
    assert diff_listings(before, after, compare_mtime=False) == [
        "only in first: /etc/config (file 0644)"
    ]


def _tar_bytes(*members: tuple[tarfile.TarInfo, bytes | None]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def test_tar_semantics_later_member_wins_and_links_follow_the_path() -> None:
    listing = canonical_from_tar(_tar_bytes(
        (_member("./a/x"), b"first"),
        (_member("a/y", tarfile.LNKTYPE, "a/x"), None),
        (_member("a/x"), b"second"),
        (_member("a/z", tarfile.LNKTYPE, "./a/x"), None),
    ))
    assert "/a" not in listing and "/" not in listing  # parents are not invented
    assert listing["/a/y"].size == 5 and listing["/a/x"].size == 6
    assert listing["/a/y"].hardlinks == ()
    assert listing["/a/x"].hardlinks == ("/a/x", "/a/z")


@pytest.mark.parametrize("compression", ["gz", "xz", "zst"])
def test_compressed_tars_list_like_plain(full_tree: Path, tmp_path: Path,
                                         compression: str) -> None:
    plain = tar_of_dir_python(full_tree / "special", tmp_path / "plain.tar")
    packed = tmp_path / f"plain.tar.{compression}"
    data = plain.read_bytes()
    if compression == "gz":
        packed.write_bytes(gzip.compress(data, 1))
    elif compression == "xz":
        packed.write_bytes(lzma.compress(data, preset=0))
    else:
        packed.write_bytes(zstandard.ZstdCompressor(level=1).compress(data))
    assert packed.read_bytes()[:2] != data[:2]
    expected = canonical_from_tar(plain)
    assert len(expected) > 10
    assert diff_listings(expected, canonical_from_tar(packed)) == []
    with packed.open("rb") as f:
        assert diff_listings(expected, canonical_from_tar(f)) == []


def test_tar_link_to_missing_path_is_an_error() -> None:
    with pytest.raises(ValueError, match="hard link"):
        canonical_from_tar(_tar_bytes((_member("b", tarfile.LNKTYPE, "nope"), None)))


def test_entry_is_frozen() -> None:
    e = Entry(type="file", mode=0o644)
    with pytest.raises(AttributeError):
        e.mode = 0  # type: ignore[misc]


# ----------------------------------------------------------------------------- properties

NAME = st.text(
    alphabet=st.sampled_from("abcXYZ019 -_.é日ß"), min_size=1, max_size=12
).filter(lambda n: n not in (".", ".."))
ITEM = st.tuples(
    st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo"]),
    NAME,
    st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2750, 0o1777, 0o000]),
    st.sampled_from([(0, 0), (1234, 5678), (65534, 65534)]),
    st.binary(max_size=3000),
    st.integers(min_value=0, max_value=1000),
)


def _build_random_tree(root: Path, items: list[tuple[str, str, int, tuple[int, int], bytes,
                                                     int]]) -> None:
    root.mkdir()
    dirs: list[Path] = [root]
    files: list[Path] = []
    for kind, name, mode, owner, data, pick in items:
        path = dirs[pick % len(dirs)] / name
        if path.exists() or path.is_symlink():
            continue
        if kind == "dir":
            path.mkdir()
            dirs.append(path)
        elif kind == "file" or (kind == "hardlink" and not files):
            path.write_bytes(data)
            files.append(path)
        elif kind == "hardlink":
            os.link(files[pick % len(files)], path)
            continue  # shares the target's metadata
        elif kind == "symlink":
            os.symlink(data[:50].decode("latin-1").replace("\0", "") or "x", path)
            os.chown(path, *owner, follow_symlinks=False)
            continue
        else:
            os.mkfifo(path)
        os.chown(path, *owner)
        os.chmod(path, mode if kind != "dir" else mode | 0o700)
        if pick % 3 == 0 and kind != "fifo":
            os.setxattr(path, "user.h", data[:20])
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (1_500_000_000, 1_500_000_000),
                     follow_symlinks=False)
    os.utime(root, (1_500_000_000, 1_500_000_000))


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(ITEM, max_size=14))
def test_random_trees_list_the_same_from_dir_and_both_tars(
    tmp_path: Path, items: list[tuple[str, str, int, tuple[int, int], bytes, int]]
) -> None:
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        _build_random_tree(work / "t", items)
        from_dir = canonical_from_dir(work / "t")
        assert len(from_dir) >= 1
        for maker in (tar_of_dir_gnu, tar_of_dir_python):
            tar = maker(work / "t", work / f"{maker.__name__}.tar")
            assert diff_listings(from_dir, canonical_from_tar(tar)) == [], maker.__name__
    finally:
        shutil.rmtree(work)


@settings(max_examples=50, deadline=None)
@given(field=st.sampled_from(["mode", "uid", "gid", "size", "mtime", "sha256", "target",
                              "rdev", "xattrs", "hardlinks", "type"]),
       index=st.integers(min_value=0))
def test_any_single_field_change_is_reported(field: str, index: int) -> None:
    listing = {
        "/": Entry(type="dir", mode=0o755),
        "/f": Entry(type="file", mode=0o644, size=3, sha256="ab", hardlinks=("/f", "/g")),
        "/g": Entry(type="file", mode=0o644, size=3, sha256="ab", hardlinks=("/f", "/g")),
        "/l": Entry(type="symlink", mode=0o777, target="f"),
        "/d": Entry(type="chardev", mode=0o600, rdev=(1, 3), xattrs={"user.a": b"1"}),
    }
    path = sorted(listing)[index % len(listing)]
    old = listing[path]
    changed: Any = {
        "mode": old.mode ^ 1, "uid": old.uid + 1, "gid": old.gid + 1, "size": old.size + 1,
        "mtime": old.mtime + 1, "sha256": old.sha256 + "0", "target": old.target + "x",
        "rdev": (old.rdev[0], old.rdev[1] + 1), "xattrs": {**old.xattrs, "user.z": b""},
        "hardlinks": old.hardlinks[:1] or (path, "/zz"), "type": "fifo",
    }[field]
    other = {**listing, path: dataclasses.replace(old, **{field: changed})}
    diffs = diff_listings(listing, other)
    assert diffs and all(d.startswith(f"{path}: ") for d in diffs), diffs
    assert diff_listings(listing, other, ignore_paths={path}) == []
