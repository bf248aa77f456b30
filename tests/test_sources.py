"""Image sources: every transport against the real podman, hand-made layouts, bad input."""

from __future__ import annotations

import base64
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from squashstore import oci
from squashstore.image import Image, SourceError
from squashstore.podmanconf import load_storage_config
from squashstore.sources import normalize_name, open_image, parse_reference
from squashstore.tar.split import TarSplitRecorder
from squashstore.tarsplit import tar_from_diff_dir, tar_from_tar_split

BASE = "localhost/sqs-sources-base:1"
MULTI = "localhost/sqs-sources-multi:latest"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_bytes(image: Image) -> list[bytes]:
    out = []
    for layer in image.layers:
        with layer.open() as f:
            out.append(f.read())
    return out


# -- a private podman with two small images ------------------------------------------------


def _base_tar(dest: Path) -> Path:
    """A rootfs tar: busybox and the applets the RUN steps below use."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("bin", "tmp"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add("/bin/busybox", "bin/busybox")
        for applet in ("sh", "mkdir", "rm", "ln", "echo", "mkfifo", "chmod", "cat", "touch"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    return dest


MULTI_CONTAINERFILE = f"""\
FROM {BASE}
COPY payload.bin /data/payload.bin
RUN mkdir -p /d/sub /keep && echo one > /d/sub/f && echo x > "/keep/é name" && \
    ln /keep/"é name" /keep/hard && ln -s ../keep/hard /d/link && mkfifo /keep/fifo && \
    echo gone > /keep/gone && chmod 4755 /keep/hard
RUN rm /keep/gone && rm -rf /d && mkdir /d && echo two > /d/g
"""


class _Podman:
    """What these tests need of a podman: the shared harness's, or a private one."""

    def __init__(self, impl: Any) -> None:
        self.impl = impl
        self.env: dict[str, str] = impl.env
        self.graphroot = Path(impl.graphroot)

    def run(self, *args: str) -> bytes:
        return bytes(self.impl.run(*args).stdout)

    def image_id(self, name: str) -> str | None:
        """The id podman resolves `name` to, None when podman finds no image."""
        proc = self.impl.run("image", "inspect", "--format", "{{.Id}}", name, check=False)
        return proc.stdout.decode().strip() if proc.returncode == 0 else None


@pytest.fixture(scope="module")
def src_podman(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[_Podman]:
    """The harness's session podman (tests/conftest.py) when there is one, else a private
    one for this module."""
    try:
        shared = request.getfixturevalue("podman")
    except pytest.FixtureLookupError:
        shared = None
    if shared is not None:
        yield _Podman(shared)
        return
    from support.podman import make_podman

    private = make_podman(tmp_path_factory.mktemp("sources-podman"))
    try:
        yield _Podman(private)
    finally:
        private.close()


@pytest.fixture(scope="module")
def images(src_podman: _Podman, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Builds BASE and MULTI and saves MULTI in the three file formats."""
    work = tmp_path_factory.mktemp("sources-images")
    src_podman.run("import", str(_base_tar(work / "base.tar")), BASE)
    ctx = work / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(MULTI_CONTAINERFILE)
    (ctx / "payload.bin").write_bytes(os.urandom(200_000))
    src_podman.run("build", "--network", "none", "--pull=never", "-t", MULTI, str(ctx))
    saved = {"oci-archive": work / "multi-oci.tar", "docker-archive": work / "multi-docker.tar",
             "oci-dir": work / "multi-oci-dir"}
    for fmt, dest in saved.items():
        src_podman.run("save", "--format", fmt, "-o", str(dest), MULTI)
    saved["multi-image"] = work / "two-images.tar"
    src_podman.run("save", "--multi-image-archive", "-o", str(saved["multi-image"]), BASE, MULTI)
    return saved


@pytest.fixture
def storage_env(src_podman: _Podman, monkeypatch: pytest.MonkeyPatch) -> _Podman:
    for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"):
        monkeypatch.setenv(key, src_podman.env[key])
    return src_podman


def podman_diff_ids(podman: _Podman, name: str) -> list[str]:
    inspect = json.loads(podman.run("image", "inspect", name))[0]
    return list(inspect["RootFS"]["Layers"])


# -- the four transports agree -------------------------------------------------------------


@pytest.mark.podman
def test_all_transports_give_the_same_image(storage_env: _Podman, images: dict[str, Path]
                                            ) -> None:
    refs = [MULTI, f"containers-storage:{MULTI}", f"oci:{images['oci-dir']}",
            f"oci-archive:{images['oci-archive']}",
            f"docker-archive:{images['docker-archive']}"]
    expected_ids = podman_diff_ids(storage_env, MULTI)
    assert len(expected_ids) == 4
    results = [open_image(ref) for ref in refs]
    first = results[0]
    config_id = json.loads(storage_env.run("image", "inspect", MULTI))[0]["Id"]
    assert first.config_digest == f"sha256:{config_id}"
    assert first.source_id == config_id
    contents = None
    for ref, image in zip(refs, results, strict=True):
        assert image.reference == ref
        assert image.names == ("localhost/sqs-sources-multi:latest",), ref
        assert sha256(image.config) == image.config_digest == first.config_digest, ref
        assert image.config == first.config, ref
        assert sha256(image.manifest) == image.manifest_digest, ref
        manifest = oci.parse_manifest(image.manifest, ref)
        assert manifest.config.digest == image.config_digest
        assert [lay.digest for lay in manifest.layers] == [lay.digest for lay in image.layers]
        assert [lay.diff_id for lay in image.layers] == expected_ids, ref
        data = layer_bytes(image)
        assert [sha256(d) for d in data] == expected_ids, ref
        if contents is None:
            contents = data
        assert data == contents, ref
    # podman's own oci layouts compress the layers with gzip.
    assert all(lay.media_type.endswith("+gzip") for lay in results[2].layers)


@pytest.mark.podman
def test_multi_image_docker_archive(storage_env: _Podman, images: dict[str, Path]) -> None:
    archive = images["multi-image"]
    with pytest.raises(SourceError, match="holds 2 images"):
        open_image(f"docker-archive:{archive}")
    # as in skopeo, NAME is a normalised docker reference: a short name means docker.io
    with pytest.raises(SourceError, match="no image named sqs-sources-base:1"):
        open_image(f"docker-archive:{archive}:sqs-sources-base:1")
    for ref, name in ((f"docker-archive:{archive}:{BASE}", BASE),
                      (f"docker-archive:{archive}:@1", MULTI)):
        image = open_image(ref)
        assert image.names == (name,)
        assert image.config_digest == "sha256:" + str(storage_env.image_id(name))
        assert [sha256(d) for d in layer_bytes(image)] == podman_diff_ids(storage_env, name)


@pytest.mark.podman
def test_layer_stream_works_in_tarfile_stream_mode_and_verifies_on_exit(
        storage_env: _Podman, images: dict[str, Path]) -> None:
    image = open_image(f"oci-archive:{images['oci-archive']}")
    names = []
    with image.layers[1].open() as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            names.append(member.name)
    assert "data/payload.bin" in names or "data/payload.bin" in [n.lstrip("./") for n in names]


@pytest.mark.podman
def test_containers_storage_resolves_names_like_podman(storage_env: _Podman,
                                                       images: dict[str, Path]) -> None:
    image_id = json.loads(storage_env.run("image", "inspect", MULTI))[0]["Id"]
    base_id = json.loads(storage_env.run("image", "inspect", BASE))[0]["Id"]
    for name in ("sqs-sources-multi", "sqs-sources-multi:latest", "localhost/sqs-sources-multi",
                 image_id, image_id[:12], f"sha256:{image_id}",
                 f"containers-storage:{image_id[:10]}",
                 f"containers-storage:[overlay@{storage_env.graphroot}]sqs-sources-multi"):
        assert open_image(name).source_id == image_id, name
    assert open_image("sqs-sources-base:1").source_id == base_id
    # short names: localhost/ before docker.io/library/
    storage_env.run("tag", BASE, "docker.io/library/sqs-sources-dual:latest")
    assert open_image("sqs-sources-dual").source_id == base_id
    assert "docker.io/library/sqs-sources-dual:latest" in open_image("sqs-sources-dual").names
    storage_env.run("tag", MULTI, "localhost/sqs-sources-dual:latest")
    assert open_image("sqs-sources-dual").source_id == image_id
    # any registry, by path suffix, as podman's last resort for short names
    storage_env.run("tag", BASE, "quay.io/sqs-org/sqs-sources-elsewhere:3")
    names = ["sqs-sources-elsewhere:3", "sqs-org/sqs-sources-elsewhere:3",
             "sqs-sources-multi:nosuchtag", "sqs-sources-elsewhere", "ources-elsewhere:3",
             "sqs-sources-dual", "sqs-sources-base:1", "localhost/sqs-sources-base",
             image_id[:12], base_id]
    for name in names:  # podman is the oracle
        expected = storage_env.image_id(name)
        if expected is None:
            with pytest.raises(SourceError, match="no such image"):
                open_image(name)
        else:
            assert open_image(name).source_id == expected, name
    assert storage_env.image_id("sqs-sources-elsewhere:3") == base_id
    with pytest.raises(SourceError, match="no such image"):
        open_image("containers-storage:localhost/sqs-sources-missing")


@pytest.mark.podman
def test_layer_without_tar_split_is_rebuilt_from_its_diff_directory(
        storage_env: _Podman, images: dict[str, Path]) -> None:
    reference = open_image(MULTI)
    expected = [_tar_listing(data) for data in layer_bytes(reference)]
    assert any(".wh..wh..opq" in name for name in expected[3]), expected[3].keys()
    assert any(name.endswith(".wh.gone") for name in expected[3])
    layers_dir = storage_env.graphroot / "overlay-layers"
    layer_ids = [_layer_id(storage_env, d) for d in podman_diff_ids(storage_env, MULTI)]
    moved = []
    try:
        for layer_id in layer_ids:
            split = layers_dir / f"{layer_id}.tar-split.gz"
            split.rename(split.with_suffix(".moved"))
            moved.append(split)
        rebuilt = [_tar_listing(data) for data in layer_bytes(open_image(MULTI))]
    finally:
        for split in moved:
            split.with_suffix(".moved").rename(split)
    for want, got in zip(expected, rebuilt, strict=True):
        keys = sorted(set(got) | set(want))
        assert got == want, [(k, str(got.get(k)), str(want.get(k))) for k in keys
                             if got.get(k) != want.get(k)]


def _layer_id(podman: _Podman, diff_id: str) -> str:
    records = json.loads((podman.graphroot / "overlay-layers" / "layers.json").read_text())
    return str(next(r["id"] for r in records if r.get("diff-digest") == diff_id))


def _tar_listing(data: bytes) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            content = tar.extractfile(m).read() if m.isreg() else b""  # type: ignore[union-attr]
            xattrs = {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            # times of directories and whiteout markers are not kept exactly by the store
            whiteout = m.name.rsplit("/", 1)[-1].startswith(".wh.")
            mtime = None if m.isdir() or whiteout else int(m.mtime)
            mode = None if m.issym() else m.mode & 0o7777  # symlink modes mean nothing
            out[m.name.rstrip("/")] = (m.type, mode, m.uid, m.gid, m.size, m.linkname,
                                       hashlib.sha256(content).hexdigest(), mtime, xattrs)
    return out


@pytest.mark.podman
@pytest.mark.parametrize("fixture", ["special", "hardlinks", "whiteouts", "big"])
def test_diff_directory_walk_equals_the_tar_split_of_every_fixture_layer(
        src_podman: _Podman, fixture_images: dict[str, str], fixture: str) -> None:
    """The fallback for layers without a tar-split, against containers/storage's own record
    of the layer (xattrs, devices, owners, hard links, sparse files, whiteouts, opaque dirs)."""
    from support.listing import canonical_from_tar, diff_listings

    for diff_id in podman_diff_ids(src_podman, fixture_images[fixture]):
        layer_id = _layer_id(src_podman, diff_id)
        diff = src_podman.graphroot / "overlay" / layer_id / "diff"
        split = src_podman.graphroot / "overlay-layers" / f"{layer_id}.tar-split.gz"
        recorded = b"".join(tar_from_tar_split(split, diff, "layer"))
        assert sha256(recorded) == diff_id
        walked = canonical_from_tar(io.BytesIO(b"".join(tar_from_diff_dir(diff, "layer"))))
        want = canonical_from_tar(io.BytesIO(recorded))
        untimed = [p for p, e in want.items()
                   if e.type == "dir" or p.rsplit("/", 1)[-1].startswith(".wh.")]
        assert diff_listings(walked, want, ignore_mtime=untimed) == [], (fixture, diff_id)


def _fake_store(root: Path, layer_files: dict[str, bytes]) -> str:
    """A containers/storage graph root by hand: one image, one layer without a tar-split
    (as in an additional image store whose layer is mounted over `diff`)."""
    import base64

    tar = make_tar(layer_files)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [sha256(tar)]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                           "config": {"mediaType": oci.OCI_CONFIG, "digest": sha256(config),
                                      "size": len(config)},
                           "layers": [{"mediaType": oci.OCI_LAYER, "digest": sha256(tar),
                                       "size": len(tar)}]}).encode()
    image_id, layer_id = sha256(config)[7:], sha256(tar)[7:]
    (root / "overlay-layers").mkdir(parents=True)
    (root / "overlay-layers" / "layers.json").write_text(json.dumps(
        [{"id": layer_id, "diff-digest": sha256(tar), "diff-size": len(tar)}]))
    (root / "overlay-images" / image_id).mkdir(parents=True)
    (root / "overlay-images" / "images.json").write_text(json.dumps(
        [{"id": image_id, "names": ["localhost/fake:1"], "layer": layer_id,
          "digest": sha256(manifest)}]))
    big = root / "overlay-images" / image_id
    (big / "manifest").write_bytes(manifest)
    (big / ("=" + base64.b64encode(sha256(config).encode()).decode())).write_bytes(config)
    (root / "overlay" / layer_id / "diff").mkdir(parents=True)
    for name, data in layer_files.items():
        (root / "overlay" / layer_id / "diff" / name).write_bytes(data)
    return layer_id


def test_store_layer_without_tar_split_or_files_is_an_error(tmp_path: Path) -> None:
    layer_id = _fake_store(tmp_path / "store", {"a": b"x" * 5000})
    image = open_image(f"containers-storage:[overlay@{tmp_path / 'store'}]fake:1")
    assert image.names == ("localhost/fake:1",)
    with image.layers[0].open() as f, tarfile.open(fileobj=f, mode="r|") as tar:
        assert [m.name for m in tar] == ["a"]
    shutil.rmtree(tmp_path / "store" / "overlay" / layer_id / "diff")
    (tmp_path / "store" / "overlay" / layer_id / "diff").mkdir()
    with pytest.raises(SourceError, match=r"layer 0 \(sha256:.*unmounted"):
        layer_bytes(image)
    shutil.rmtree(tmp_path / "store" / "overlay" / layer_id)
    with pytest.raises(SourceError, match=r"layer 0 \(sha256:.*missing"):
        layer_bytes(image)


@pytest.mark.podman
def test_reading_waits_for_a_writer_holding_the_store_lock(storage_env: _Podman,
                                                           images: dict[str, Path]) -> None:
    lock = storage_env.graphroot / "overlay-images" / "images.lock"
    script = ("import fcntl, os, time\n"
              f"fd = os.open({str(lock)!r}, os.O_RDWR)\n"
              "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
              "print('locked', flush=True)\n"
              "time.sleep(5)\n")  # long beside the 0.8 s asserted: this test may be preempted
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"locked"
        start = time.monotonic()
        open_image(MULTI)
        assert time.monotonic() - start > 0.8
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # nothing left locked
    finally:
        os.close(fd)


@pytest.mark.podman
def test_storage_conf_is_found_through_the_environment(storage_env: _Podman,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    config = load_storage_config()
    assert config.graphroot == storage_env.graphroot
    assert config.driver == "overlay"
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(tmp_path / "absent.conf"))
    with pytest.raises(SourceError, match=r"absent.conf"):
        open_image(MULTI)
    bad = tmp_path / "bad.conf"
    bad.write_text("[storage\n")
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(bad))
    with pytest.raises(SourceError, match=r"bad.conf"):
        open_image(MULTI)
    empty_root = tmp_path / "graph"
    good = tmp_path / "good.conf"
    good.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{empty_root}"\n'
                    '[storage.options]\nadditionalimagestores = ["/nonexistent/store"]\n')
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(good))
    assert load_storage_config().additional_image_stores == (Path("/nonexistent/store"),)
    with pytest.raises(SourceError, match="no such image"):
        open_image(MULTI)


def test_storage_conf_lookup_for_root_and_rootless_users(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": "/run/user/1000", "USER": "u"}
    rootless = load_storage_config(env, euid=1000)
    assert rootless.graphroot == home / ".local/share/containers/storage"
    assert rootless.runroot == Path("/run/user/1000/containers")
    assert rootless.driver == "overlay"
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    assert load_storage_config(env, euid=1000).graphroot == \
        tmp_path / "data/containers/storage"
    user_conf = tmp_path / "config" / "containers" / "storage.conf"
    user_conf.parent.mkdir(parents=True)
    user_conf.write_text('[storage]\ndriver = "vfs"\ngraphroot = "$HOME/g"\n'
                         '[storage.options]\nadditionalimagestores = ["/s1", "/s2"]\n')
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    config = load_storage_config(env, euid=1000)
    assert (config.driver, config.graphroot, config.conf_file) == ("vfs", home / "g", user_conf)
    assert config.additional_image_stores == (Path("/s1"), Path("/s2"))
    env["STORAGE_DRIVER"] = "overlay"
    assert load_storage_config(env, euid=1000).driver == "overlay"
    # root never reads a user's file
    assert load_storage_config(env, euid=0).conf_file != user_conf
    env["CONTAINERS_STORAGE_CONF"] = str(user_conf)
    assert load_storage_config(env, euid=0).graphroot == home / "g"


def _disassemble(tar: bytes, diff: Path) -> bytes:
    """What containers/storage keeps of a layer tar: its files unpacked below `diff` and a
    gzip'd tar-split (segments of raw bytes; file entries naming their content)."""
    import base64

    lines, position = [], 0
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for m in archive:
            lines.append({"type": 2, "payload": base64.b64encode(
                tar[position:m.offset_data]).decode()})
            raw = m.name.encode("utf-8", "surrogateescape")
            entry: dict[str, Any] = {"type": 1, "size": m.size if m.isreg() else 0}
            try:
                entry["name"] = raw.decode("utf-8")
            except UnicodeDecodeError:
                entry["name_raw"] = base64.b64encode(raw).decode()
            lines.append(entry)
            position = m.offset_data
            if m.isreg():
                target = os.path.join(os.fsencode(diff), raw)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(tar[m.offset_data:m.offset_data + m.size])
                position += m.size
    lines.append({"type": 2, "payload": base64.b64encode(tar[position:]).decode()})
    return gzip.compress(b"".join(json.dumps(line).encode() + b"\n" for line in lines))


_names = st.lists(st.binary(min_size=1, max_size=12).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")),
    min_size=1, max_size=6, unique=True)


@settings(deadline=None)  # a tempdir, a gzip and six files per example: slow under load
@given(names=_names, sizes=st.lists(st.integers(0, 3000), min_size=6, max_size=6))
def test_tar_split_rebuilds_any_tar_byte_for_byte(names: list[bytes], sizes: list[int]
                                                  ) -> None:
    import tempfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as archive:
        for i, raw in enumerate(names):
            info = tarfile.TarInfo("d/" + raw.decode("utf-8", "surrogateescape"))
            info.size = sizes[i]
            archive.addfile(info, io.BytesIO(bytes([i]) * sizes[i]))
    tar = buf.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        diff = Path(tmp) / "diff"
        diff.mkdir()
        split = Path(tmp) / "layer.tar-split.gz"
        split.write_bytes(_disassemble(tar, diff))
        assert b"".join(tar_from_tar_split(split, diff, "layer")) == tar


def test_tar_split_with_a_shortened_file_is_an_error(tmp_path: Path) -> None:
    tar = make_tar({"a": b"12345" * 100})
    (tmp_path / "diff").mkdir()
    split = tmp_path / "l.tar-split.gz"
    split.write_bytes(_disassemble(tar, tmp_path / "diff"))
    (tmp_path / "diff" / "a").write_bytes(b"123")
    with pytest.raises(SourceError, match=r"layer 7: .*shorter"):
        b"".join(tar_from_tar_split(split, tmp_path / "diff", "layer 7"))
    split.write_bytes(gzip.compress(b'{"type": 1, "name": "../../etc/passwd", "size": 5}\n'))
    with pytest.raises(SourceError, match="escapes the layer"):
        b"".join(tar_from_tar_split(split, tmp_path / "diff", "layer 7"))


# -- hand-made OCI layouts -----------------------------------------------------------------


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return bytes(zstandard.ZstdCompressor().compress(data))
    return data


MEDIA = {"none": oci.OCI_LAYER, "gzip": oci.OCI_LAYER + "+gzip",
         "zstd": oci.OCI_LAYER + "+zstd"}


class Layout:
    """Writes an OCI image layout by hand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        digest = sha256(data)
        (self.root / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def image(self, tars: list[tuple[bytes, str]], arch: str = "amd64", variant: str = "",
              diff_ids: list[str] | None = None) -> dict[str, Any]:
        config: dict[str, Any] = {
            "architecture": arch, "os": "linux", "config": {"Env": [f"ARCH={arch}"]},
            "rootfs": {"type": "layers",
                       "diff_ids": diff_ids or [sha256(t) for t, _ in tars]}}
        if variant:
            config["variant"] = variant
        config_desc = self.blob(json.dumps(config).encode(), oci.OCI_CONFIG)
        layers = [self.blob(compress(t, kind), MEDIA[kind]) for t, kind in tars]
        manifest = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": config_desc,
                    "layers": layers}
        desc = self.blob(json.dumps(manifest).encode(), oci.OCI_MANIFEST)
        desc["platform"] = {"os": "linux", "architecture": arch}
        if variant:
            desc["platform"]["variant"] = variant
        return desc

    def index_blob(self, manifests: list[dict[str, Any]]) -> dict[str, Any]:
        doc = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": manifests}
        return self.blob(json.dumps(doc).encode(), oci.OCI_INDEX)

    def write_index(self, manifests: list[dict[str, Any]]) -> None:
        doc = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": manifests}
        (self.root / "index.json").write_text(json.dumps(doc))

    def blob_path(self, desc: dict[str, Any]) -> Path:
        return self.root / "blobs" / "sha256" / str(desc["digest"])[7:]


def archive_of(layout: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w") as tar:
        for name in sorted(os.listdir(layout)):
            tar.add(layout / name, name)
    return dest


TARS = [make_tar({"a": b"first" * 1000}), make_tar({"b": os.urandom(70_000), "c": b""}),
        make_tar({"a": b"third"})]


def test_gzip_zstd_and_plain_layers(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "lay")
    desc = layout.image([(TARS[0], "gzip"), (TARS[1], "zstd"), (TARS[2], "none")])
    desc["annotations"] = {oci.REF_NAME: "v1"}
    layout.write_index([desc])
    archive = archive_of(layout.root, tmp_path / "a.tar")
    squeezed = tmp_path / "a.tar.gz"
    squeezed.write_bytes(gzip.compress(archive.read_bytes()))
    for ref in (f"oci:{layout.root}", f"oci:{layout.root}:v1", f"oci-archive:{archive}:v1",
                f"oci-archive:{squeezed}"):
        image = open_image(ref)
        assert layer_bytes(image) == TARS
        assert [lay.media_type for lay in image.layers] == [MEDIA["gzip"], MEDIA["zstd"],
                                                             MEDIA["none"]]
        assert image.names == ()  # a bare tag is no name
        assert sha256(image.config) == image.config_digest
        assert image.manifest_digest == desc["digest"]
    with pytest.raises(SourceError, match=r"no image tagged 'v2'.*v1"):
        open_image(f"oci:{layout.root}:v2")


def test_ref_name_annotation_becomes_the_image_name(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "lay")
    desc = layout.image([(TARS[0], "gzip")])
    desc["annotations"] = {oci.REF_NAME: "example.com/team/tool:2.0"}
    layout.write_index([desc])
    assert open_image(f"oci:{layout.root}").names == ("example.com/team/tool:2.0",)


def _single_layer_layout(root: Path, kind: str) -> tuple[Layout, dict[str, Any]]:
    layout = Layout(root)
    desc = layout.image([(TARS[1], kind)])
    layout.write_index([desc])
    manifest = json.loads(layout.blob_path(desc).read_bytes())
    return layout, manifest["layers"][0]


def _read_all(reference: str) -> None:
    layer_bytes(open_image(reference))


@pytest.mark.parametrize("kind", ["gzip", "zstd", "none"])
def test_corrupt_blob_is_an_error_naming_the_layer(tmp_path: Path, kind: str) -> None:
    layout, layer = _single_layer_layout(tmp_path / "lay", kind)
    path = layout.blob_path(layer)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"layer 0 \(sha256:"):
        _read_all(f"oci:{layout.root}")


@pytest.mark.parametrize("kind", ["gzip", "zstd", "none"])
def test_truncated_blob_is_an_error_naming_the_layer(tmp_path: Path, kind: str) -> None:
    layout, layer = _single_layer_layout(tmp_path / "lay", kind)
    path = layout.blob_path(layer)
    path.write_bytes(path.read_bytes()[: layer["size"] // 2])
    with pytest.raises(SourceError, match=r"layer 0 \(sha256:.*(truncated|mismatch)"):
        _read_all(f"oci:{layout.root}")


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_truncated_stream_with_a_matching_digest_is_reported_as_truncated(
        tmp_path: Path, kind: str) -> None:
    layout = Layout(tmp_path / "lay")
    cut = compress(TARS[1], kind)[:-100]
    desc = layout.image([(TARS[1], "none")])
    manifest = json.loads(layout.blob_path(desc).read_bytes())
    manifest["layers"][0] = layout.blob(cut, MEDIA[kind])
    new_desc = layout.blob(json.dumps(manifest).encode(), oci.OCI_MANIFEST)
    layout.write_index([new_desc])
    with pytest.raises(SourceError, match=r"layer 0 \(sha256:.*truncated"):
        _read_all(f"oci:{layout.root}")


def _zstd_variants() -> list[tuple[bytes, set[int]]]:
    """zstd streams of several kinds, each with the inner offsets where a frame ends."""
    data = bytes(range(256)) * 12 + bytes(300_000) + b"tail" * 999
    out = [bytes(zstandard.ZstdCompressor(level=lv, write_checksum=ck,
                                          write_content_size=cs).compress(data))
           for lv, ck, cs in ((1, False, True), (3, True, True), (19, True, False))]
    streamed = zstandard.ZstdCompressor(write_checksum=True).compressobj()
    out.append(streamed.compress(data) + streamed.flush())
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
    several = out[0] + skippable + out[1]  # several frames, one of them skippable
    return [(blob, set()) for blob in out] + [
        (several, {len(out[0]), len(out[0]) + len(skippable)})]


def test_zstd_frame_tracking_knows_complete_from_truncated() -> None:
    from squashstore.blobs import ZstdFrames

    for blob, boundaries in _zstd_variants():
        whole = ZstdFrames()
        for i in range(0, len(blob), 7):
            whole.update(blob[i:i + 7])
        assert whole.complete()
        for cut in sorted(set(range(0, len(blob), 13)) | boundaries):
            prefix = ZstdFrames()
            prefix.update(blob[:cut])
            assert prefix.complete() == (cut in boundaries), cut
    not_zstd = ZstdFrames()
    not_zstd.update(gzip.compress(b"x"))
    assert not not_zstd.complete()


def test_wrong_diff_id_is_an_error_naming_the_layer(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "lay")
    wrong = sha256(b"not this")
    layout.write_index([layout.image([(TARS[0], "gzip")], diff_ids=[wrong])])
    with pytest.raises(SourceError, match=r"layer 0 \(sha256:.*diff_id"):
        _read_all(f"oci:{layout.root}")


def test_wrong_digests_of_manifest_and_config_are_errors(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "lay")
    desc = layout.image([(TARS[0], "gzip")])
    layout.write_index([desc])
    manifest = json.loads(layout.blob_path(desc).read_bytes())
    config_path = layout.blob_path(manifest["config"])
    config_path.write_bytes(config_path.read_bytes() + b" ")
    with pytest.raises(SourceError, match=r"config.*digest mismatch"):
        open_image(f"oci:{layout.root}")
    layout.blob_path(desc).write_bytes(b"{}")
    with pytest.raises(SourceError, match=f"{desc['digest']}.*digest mismatch"):
        open_image(f"oci:{layout.root}")


def test_missing_blob_is_an_error_naming_the_layer(tmp_path: Path) -> None:
    layout, layer = _single_layer_layout(tmp_path / "lay", "gzip")
    layout.blob_path(layer).unlink()
    image = open_image(f"oci:{layout.root}")
    with pytest.raises(SourceError, match=r"layer 0 \(sha256:.*missing"):
        layer_bytes(image)


def test_digest_is_not_checked_when_the_reader_fails(tmp_path: Path) -> None:
    layout, _ = _single_layer_layout(tmp_path / "lay", "gzip")
    image = open_image(f"oci:{layout.root}")
    with pytest.raises(KeyError), image.layers[0].open() as f:
        f.read(10)
        raise KeyError("consumer failed")
    with pytest.raises(SourceError) as info, image.layers[0].open():
        raise SourceError("from the consumer")
    assert str(info.value) == "from the consumer"


# -- multi-arch indexes --------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_multi_arch_index_chooses_the_platform(tmp_path: Path, nested: bool) -> None:
    layout = Layout(tmp_path / "lay")
    amd = layout.image([(TARS[0], "gzip")], arch="amd64")
    arm = layout.image([(TARS[1], "zstd")], arch="arm64")
    armv7 = layout.image([(TARS[2], "none")], arch="arm", variant="v7")
    if nested:
        top = layout.index_blob([amd, arm, armv7])
        top["annotations"] = {oci.REF_NAME: "latest"}
        layout.write_index([top])
    else:
        layout.write_index([amd, arm, armv7])
    ref = f"oci:{layout.root}"
    host = oci.host_platform()
    by_arch = {"amd64": TARS[0], "arm64": TARS[1], "arm": TARS[2]}
    if host.architecture in by_arch:
        assert layer_bytes(open_image(ref)) == [by_arch[host.architecture]]
    arm_image = open_image(ref, platform="linux/arm64")
    assert layer_bytes(arm_image) == [TARS[1]]
    assert arm_image.manifest_digest == arm["digest"]
    assert arm_image.config_json["architecture"] == "arm64"
    assert layer_bytes(open_image(ref, platform="linux/arm/v7")) == [TARS[2]]
    assert layer_bytes(open_image(ref, platform="linux/amd64")) == [TARS[0]]
    with pytest.raises(SourceError, match=r"linux/s390x.*linux/amd64, linux/arm/v7, linux/arm64"):
        open_image(ref, platform="linux/s390x")
    with pytest.raises(SourceError, match="invalid platform"):
        open_image(ref, platform="linux//")


# -- docker-archive ------------------------------------------------------------------------


def _docker_archive(dest: Path) -> tuple[Path, list[bytes]]:
    """Two images: a newer docker save (OCI blobs) and a legacy one (gzip'd layer.tar)."""
    layer_a, layer_b = compress(TARS[0], "gzip"), compress(TARS[1], "gzip")
    config_a = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [sha256(TARS[0]), sha256(TARS[2])]}}).encode()
    config_b = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [sha256(TARS[1])]}}).encode()
    members = {
        f"blobs/sha256/{sha256(layer_a)[7:]}": layer_a,
        f"blobs/sha256/{sha256(TARS[2])[7:]}": TARS[2],
        f"blobs/sha256/{sha256(config_a)[7:]}": config_a,
        "0123abcd/layer.tar": layer_b,
        f"{sha256(config_b)[7:]}.json": config_b,
    }
    manifest = [
        {"Config": f"blobs/sha256/{sha256(config_a)[7:]}", "RepoTags": ["sqs-tool:1"],
         "Layers": [f"blobs/sha256/{sha256(layer_a)[7:]}", f"blobs/sha256/{sha256(TARS[2])[7:]}"]},
        {"Config": f"{sha256(config_b)[7:]}.json", "RepoTags": ["example.com/x/y:2"],
         "Layers": ["0123abcd/layer.tar"]},
    ]
    members["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(dest, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest, [layer_a, layer_b]


def test_docker_archive_with_compressed_layers_and_two_images(tmp_path: Path) -> None:
    archive, (layer_a, layer_b) = _docker_archive(tmp_path / "d.tar")
    with pytest.raises(SourceError, match=r"holds 2 images.*sqs-tool:1"):
        open_image(f"docker-archive:{archive}")
    first = open_image(f"docker-archive:{archive}:sqs-tool:1")
    assert first.names == ("docker.io/library/sqs-tool:1",)
    assert layer_bytes(first) == [TARS[0], TARS[2]]
    manifest = oci.parse_manifest(first.manifest, "synthesised")
    assert sha256(first.manifest) == first.manifest_digest
    assert manifest.config.digest == first.config_digest == sha256(first.config)
    assert [(d.digest, d.media_type, d.size) for d in manifest.layers] == [
        (sha256(layer_a), MEDIA["gzip"], len(layer_a)), (sha256(TARS[2]), MEDIA["none"],
                                                          len(TARS[2]))]
    second = open_image(f"docker-archive:{archive}:@1")
    assert second.names == ("example.com/x/y:2",)
    assert layer_bytes(second) == [TARS[1]]
    assert second.layers[0].digest == sha256(layer_b)
    assert open_image(f"docker-archive:{archive}:example.com/x/y:2").config == second.config
    with pytest.raises(SourceError, match="no image named other"):
        open_image(f"docker-archive:{archive}:other")


def test_docker_archive_corrupt_layer(tmp_path: Path) -> None:
    archive, _ = _docker_archive(tmp_path / "d.tar")
    data = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        member = next(m for m in tar if m.name.endswith("layer.tar"))
    data[member.offset_data + 40] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"layer 0 \(sha256:"):
        _read_all(f"docker-archive:{archive}:@1")


# -- references and bad input --------------------------------------------------------------


@pytest.mark.parametrize(("text", "transport", "path", "name"), [
    ("alpine", "containers-storage", "", "alpine"),
    ("alpine:3.19", "containers-storage", "", "alpine:3.19"),
    ("localhost:5000/x/y:1", "containers-storage", "", "localhost:5000/x/y:1"),
    ("x@sha256:" + "a" * 64, "containers-storage", "", "x@sha256:" + "a" * 64),
    ("containers-storage:busybox", "containers-storage", "", "busybox"),
    ("containers-storage:[vfs@/g+/r]busybox", "containers-storage", "vfs@/g+/r", "busybox"),
    ("oci:/some/dir", "oci", "/some/dir", ""),
    ("oci:/some/dir:v1", "oci", "/some/dir", "v1"),
    ("oci-archive:img.tar:localhost/a:b", "oci-archive", "img.tar", "localhost/a:b"),
    ("docker-archive:/x.tar:@1", "docker-archive", "/x.tar", "@1"),
    ("docker://localhost:5000/a:b", "docker", "", "localhost:5000/a:b"),
])
def test_parse_reference(text: str, transport: str, path: str, name: str) -> None:
    ref = parse_reference(text)
    assert (ref.transport, ref.path, ref.name, ref.text) == (transport, path, name, text)


@pytest.mark.parametrize(("text", "message"), [
    ("docker:alpine", "write docker://HOST/REPO"),
    ("docker://", "no image name"),
    ("docker://localhost:5000/A:b", "invalid image name"),
    ("foo:/some/path", "unknown or unsupported transport 'foo'"),
    ("dir:/some/path", "unknown or unsupported transport 'dir'"),
    ("", "empty image reference"),
    ("oci:", "needs a path"),
    ("containers-storage:", "no image name"),
])
def test_bad_references(text: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        open_image(text)


def test_missing_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    for transport in ("oci", "oci-archive", "docker-archive"):
        with pytest.raises(SourceError, match=str(missing)):
            open_image(f"{transport}:{missing}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="not an OCI layout"):
        open_image(f"oci:{tmp_path / 'empty'}")
    (tmp_path / "junk.tar").write_bytes(b"junk" * 300)
    with pytest.raises(SourceError, match=r"junk.tar.*not a tar archive"):
        open_image(f"oci-archive:{tmp_path / 'junk.tar'}")


@pytest.mark.parametrize(("name", "full"), [
    ("alpine", "docker.io/library/alpine:latest"),
    ("alpine:3.19", "docker.io/library/alpine:3.19"),
    ("user/repo", "docker.io/user/repo:latest"),
    ("localhost/x", "localhost/x:latest"),
    ("quay.io/a/b:c", "quay.io/a/b:c"),
    ("localhost:5000/a", "localhost:5000/a:latest"),
    ("a@sha256:" + "0" * 64, "docker.io/library/a@sha256:" + "0" * 64),
])
def test_normalize_name(name: str, full: str) -> None:
    assert normalize_name(name) == full


_component = st.from_regex(r"[a-z0-9]{1,8}(-[a-z0-9]{1,4})?", fullmatch=True)


@given(domain=st.sampled_from(["", "localhost/", "quay.io/", "r.example:5000/"]),
       path=st.lists(_component, min_size=1, max_size=3),
       tag=st.one_of(st.just(""), st.from_regex(r":[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,10}",
                                                fullmatch=True)))
def test_normalize_name_is_idempotent_and_qualified(domain: str, path: list[str],
                                                    tag: str) -> None:
    full = normalize_name(domain + "/".join(path) + tag)
    assert normalize_name(full) == full
    assert full.split("/")[0] in ("docker.io", "localhost", "quay.io", "r.example:5000")
    assert full.endswith(tag or ":latest")


def test_local_store_layer_with_a_changed_file_fails_like_podman(
        make_podman: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local store is trusted as podman trusts it: each file rebuilt from the diff
    directory is checked against the CRC-64 that tar-split recorded."""
    private = make_podman()
    for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"):
        monkeypatch.setenv(key, private.env[key])
    private.run("import", str(_base_tar(tmp_path / "base.tar")), "localhost/sqs-crc:1")
    image = open_image("localhost/sqs-crc:1")
    assert len(layer_bytes(image)[0]) > 0
    layer_id = json.loads(private.run("image", "inspect", "localhost/sqs-crc:1").stdout)[0][
        "RootFS"]["Layers"][0]
    layers = json.loads((private.graphroot / "overlay-layers" / "layers.json").read_text())
    lid = next(rec["id"] for rec in layers if rec.get("diff-digest") == layer_id)
    busybox = private.graphroot / "overlay" / lid / "diff" / "bin" / "busybox"
    data = bytearray(busybox.read_bytes())
    data[len(data) // 2] ^= 0x01
    busybox.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"file integrity checksum failed for .*bin/busybox"):
        layer_bytes(open_image("localhost/sqs-crc:1"))
    saved = private.run("save", "-o", str(tmp_path / "x.tar"), "localhost/sqs-crc:1",
                        check=False)
    assert b"file integrity checksum failed" in saved.stderr


@pytest.mark.parametrize("transport", ["oci-archive", "docker-archive"])
def test_an_archive_that_is_a_device_or_a_pipe_is_refused(tmp_path: Path,
                                                          transport: str) -> None:
    """`oci-archive:/dev/zero` never returned (tarfile probing compressions on an endless
    stream); a FIFO would block forever. Both: one line, at once."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo)):
        started = time.monotonic()
        with pytest.raises(SourceError, match="is not a regular file"):
            open_image(f"{transport}:{path}")
        assert time.monotonic() - started < 5


def test_a_docker_archive_manifest_nested_too_deeply_is_one_line(tmp_path: Path) -> None:
    archive = tmp_path / "deep.tar"
    data = b"[" * 100_000 + b"]" * 100_000
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SourceError, match="nested too deeply"):
        open_image(f"docker-archive:{archive}")


_OPS = st.lists(st.one_of(
    st.tuples(st.just("segment"), st.binary(max_size=40)),
    st.tuples(st.just("file"),
              st.one_of(st.text(max_size=12), st.binary(max_size=12).map(
                  lambda raw: raw.decode("utf-8", "surrogateescape"))),
              st.sampled_from([0, 1, 4096]), st.one_of(st.none(), st.integers(0, 2**64 - 1)))),
    max_size=30)


@settings(deadline=None)
@given(ops=_OPS, filler=st.integers(0, 3))
def test_tar_split_recorder_writes_the_lines_json_dumps_wrote(
        ops: list[tuple[Any, ...]], filler: int) -> None:
    """The recorder writes its JSON lines by hand (json.dumps per entry was its main cost):
    they must be exactly what json.dumps made of the same entries, in tar-split's key order,
    including names that are not UTF-8 (name_raw) and ones JSON escapes."""
    buf = io.BytesIO()
    recorder = TarSplitRecorder(buf)
    expected: list[dict[str, object]] = []
    segment = b""
    # Enough lines between some entries to cross the recorder's write buffer.
    ops = [*ops, *[("segment", bytes(200_000))] * filler, *ops]
    for op in ops:
        if op[0] == "segment":
            recorder.segment(op[1])
            segment += op[1]
            continue
        _, name, size, crc = op
        recorder.file(name, size, crc)
        if segment:
            expected.append({"type": 2, "payload": base64.b64encode(segment).decode()})
            segment = b""
        entry: dict[str, object] = {"type": 1}
        raw = name.encode("utf-8", "surrogateescape")
        try:
            entry["name"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            entry["name_raw"] = base64.b64encode(raw).decode()
        if size:
            entry["size"] = size
        entry["payload"] = (base64.b64encode(crc.to_bytes(8, "big")).decode()
                            if crc is not None else None)
        expected.append(entry)
    recorder.close()
    if segment:
        expected.append({"type": 2, "payload": base64.b64encode(segment).decode()})
    lines = [json.dumps({**e, "position": i}, separators=(",", ":")) + "\n"
             for i, e in enumerate(expected)]
    assert gzip.decompress(buf.getvalue()).decode() == "".join(lines)


def test_tar_split_with_blank_lines_and_large_files_rebuilds_and_checks_crcs(
        tmp_path: Path) -> None:
    """tar-split lines are parsed a batch at a time (a blank line makes a batch go line
    by line), small files are read in one go and large ones in chunks; both are checked
    against their CRC-64."""
    big = bytes(range(256)) * (8 * 1024 + 3)  # over 2 MiB: read in chunks
    tar = make_tar({"small": b"12345" * 100, "big": big, "empty": b""})
    diff = tmp_path / "diff"
    diff.mkdir()
    split = tmp_path / "l.tar-split.gz"
    from fastcrc import crc64

    lines = []
    for line in gzip.decompress(_disassemble(tar, diff)).splitlines():
        entry = json.loads(line)
        if entry["type"] == 1 and entry["size"]:
            crc = crc64.go_iso((diff / entry["name"]).read_bytes()).to_bytes(8, "big")
            entry["payload"] = base64.b64encode(crc).decode()
        lines.append(json.dumps(entry).encode())
    split.write_bytes(gzip.compress(b"\n\n".join(lines[:2]) + b"\n  \n" + b"\n".join(lines[2:])))
    assert b"".join(tar_from_tar_split(split, diff, "layer 3")) == tar
    for name, data in (("small", b"12346" * 100), ("big", big[:-1] + b"x")):
        original = (diff / name).read_bytes()
        (diff / name).write_bytes(data)
        with pytest.raises(SourceError, match=rf"layer 3: file integrity checksum failed for "
                                              rf".*/{name}$"):
            b"".join(tar_from_tar_split(split, diff, "layer 3"))
        (diff / name).write_bytes(original)


def test_a_diff_file_read_again_is_checked_again(tmp_path: Path) -> None:
    """`DiffFile.sha256` (the writer's later hash of a file it did not hash while writing)
    reads the file again and checks it against podman's CRC-64: a file changed since it
    was written is refused, never hashed as if it were what the image holds."""
    from fastcrc import crc64

    from squashstore.tar.split import DiffFile, DiffFileReader

    diff = tmp_path / "diff"
    (diff / "d").mkdir(parents=True)
    data = b"content\n" * 1000
    (diff / "d" / "f").write_bytes(data)
    ref = DiffFile(os.fsencode(diff), b"d/f", len(data),
                   crc64.go_iso(data).to_bytes(8, "big"), "layer 2")
    assert ref.sha256() == hashlib.sha256(data).digest()
    with DiffFileReader(ref) as reader:
        assert reader.read(10) == data[:10] and reader.read() == data[10:]
        assert reader.read() == b""
    (diff / "d" / "f").write_bytes(data.replace(b"c", b"C", 1))
    with pytest.raises(SourceError, match=r"^layer 2: file integrity checksum failed for "
                                          rf"{re.escape(str(diff))}/d/f$"):
        ref.sha256()
    (diff / "d" / "f").write_bytes(data[:-1])
    with pytest.raises(SourceError, match=r"is shorter than the 8000 bytes the layer"):
        ref.sha256()
    (diff / "d" / "f").unlink()
    (diff / "d" / "f").symlink_to(diff / "elsewhere")
    with pytest.raises(SourceError, match=r"cannot read .*/d/f: Too many levels"):
        ref.sha256()
