"""`squashstore export` and `squash` of real podman images equal `podman export`.

For every fixture image and each of the four transports, the canonical listing of the
exported tar equals that of ``podman export`` of a container; the squash file written in
the same pass mounts (kernel squashfs) to the same listing, and its tar-split rebuilds, from
that mount, exactly the tar whose digest became the layer's diff_id.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from squashstore.flatten import squash_image
from squashstore.sources import open_image
from squashstore.squashfs.writer import SquashOptions
from squashstore.tar.split import tar_from_tar_split
from support.listing import (
    canonical_from_dir,
    canonical_from_tar,
    diff_listings,
    normalise_podman_export,
)
from support.podman import Podman

FIXTURES = ("base", "whiteouts", "hardlinks", "special", "big")
TRANSPORTS = ("containers-storage", "oci", "oci-archive", "docker-archive")


def squashstore(*args: str, env: dict[str, str] | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "squashstore.cli.main", *args],
                            capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"squashstore {' '.join(args)} failed: {result.stderr}")
    return result


@pytest.fixture(scope="module")
def saved(podman: Podman, fixture_images: dict[str, str],
          tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], str]:
    """(fixture, transport) -> a source reference squashstore can read."""
    base = tmp_path_factory.mktemp("saved")
    refs: dict[tuple[str, str], str] = {}
    for name in FIXTURES:
        image = fixture_images[name]
        refs[name, "containers-storage"] = f"containers-storage:{image}"
        oci_dir = base / f"{name}-oci"
        podman.run("save", "--format", "oci-dir", "-o", str(oci_dir), image)
        refs[name, "oci"] = f"oci:{oci_dir}"
        archive = base / f"{name}.oci.tar"
        podman.run("save", "--format", "oci-archive", "-o", str(archive), image)
        refs[name, "oci-archive"] = f"oci-archive:{archive}"
        docker = base / f"{name}.docker.tar"
        podman.run("save", "--format", "docker-archive", "-o", str(docker), image)
        refs[name, "docker-archive"] = f"docker-archive:{docker}"
    return refs


@pytest.fixture(scope="module")
def podman_exports(podman: Podman, fixture_images: dict[str, str],
                   tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    base = tmp_path_factory.mktemp("podman-export")
    return {name: normalise_podman_export(canonical_from_tar(
        podman.export(fixture_images[name], base / f"{name}.tar"))) for name in FIXTURES}


@pytest.fixture
def storage_env(podman: Podman, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"):
        monkeypatch.setenv(key, podman.env[key])
    return dict(podman.env)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name", FIXTURES)
def test_export_equals_podman_export(name: str, transport: str, tmp_path: Path,
                                     saved: dict[tuple[str, str], str],
                                     podman_exports: dict[str, dict[str, object]],
                                     storage_env: dict[str, str]) -> None:
    out = tmp_path / "rootfs.tar"
    squashstore("export", saved[name, transport], "-o", str(out), env=storage_env)
    ours = canonical_from_tar(out)
    differences = diff_listings(ours, podman_exports[name], ignore_root_mtime=True)  # type: ignore[arg-type]
    assert not differences, "\n".join(differences[:40])


@pytest.mark.parametrize("name", FIXTURES)
def test_squash_equals_podman_export_and_tar_split_rebuilds_the_diff(
        name: str, tmp_path: Path, fixture_images: dict[str, str],
        podman_exports: dict[str, dict[str, object]], storage_env: dict[str, str],
        mounted: Callable[[Path], Path]) -> None:
    image = open_image(fixture_images[name])
    dest = tmp_path / "image.sqfs"
    split = tmp_path / "image.tar-split.gz"
    result = squash_image(image, dest, SquashOptions(compression="zstd", level=3),
                          tar_split=split)
    point = mounted(dest)
    # podman export has no entry for the root; a mount always has one.
    differences = diff_listings(canonical_from_dir(point), podman_exports[name],  # type: ignore[arg-type]
                                ignore_paths={"/"})
    assert not differences, "\n".join(differences[:40])
    digest = hashlib.sha256()
    size = 0
    for chunk in tar_from_tar_split(split, point, "test"):
        digest.update(chunk)
        size += len(chunk)
    assert "sha256:" + digest.hexdigest() == result.diff_digest
    assert size == result.diff_size


@pytest.mark.parametrize("name", FIXTURES)
def test_squash_is_the_same_from_podmans_store_and_from_an_archive(
        name: str, tmp_path: Path, saved: dict[tuple[str, str], str],
        storage_env: dict[str, str]) -> None:
    """containers-storage layers are rebuilt from tar-split and diff directories and read
    without open_verified's buffers; an oci-archive's are read through them: the squash
    files, their tar-splits and the canonical tar digests must not differ by one byte."""
    results = {}
    for transport in ("containers-storage", "oci-archive"):
        dest = tmp_path / f"{transport}.sqfs"
        split = tmp_path / f"{transport}.tar-split.gz"
        result = squash_image(open_image(saved[name, transport]), dest,
                              SquashOptions(compression="lz4"), tar_split=split)
        results[transport] = (result.diff_digest, result.diff_size, dest.read_bytes(),
                              gzip.decompress(split.read_bytes()))
    assert results["containers-storage"] == results["oci-archive"]


def test_squash_is_reproducible(tmp_path: Path, fixture_images: dict[str, str],
                                storage_env: dict[str, str]) -> None:
    image = open_image(fixture_images["special"])
    first = squash_image(image, tmp_path / "a.sqfs", SquashOptions(jobs=2))
    second = squash_image(image, tmp_path / "b.sqfs", SquashOptions(jobs=1))
    assert (tmp_path / "a.sqfs").read_bytes() == (tmp_path / "b.sqfs").read_bytes()
    assert first.diff_digest == second.diff_digest


# -- bad input: one line, non-zero exit, nothing written -----------------------------------


def _corrupt_copy(src: Path, dest: Path) -> None:
    """An OCI layout whose largest layer blob has one flipped byte in the middle."""
    subprocess.run(["cp", "-a", str(src), str(dest)], check=True)
    blobs = sorted((dest / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    blob = blobs[-1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["missing-image", "unknown-transport", "missing-file",
                                  "corrupt-blob", "truncated-archive"])
def test_bad_input_one_line_error_nothing_written(case: str, tmp_path: Path,
                                                  saved: dict[tuple[str, str], str],
                                                  storage_env: dict[str, str]) -> None:
    if case == "missing-image":
        source = "containers-storage:localhost/no-such-image:latest"
    elif case == "unknown-transport":
        source = "ftp://example/x"
    elif case == "missing-file":
        source = f"oci-archive:{tmp_path / 'nope.tar'}"
    elif case == "corrupt-blob":
        _corrupt_copy(Path(saved["big", "oci"][4:]), tmp_path / "bad-oci")
        source = f"oci:{tmp_path / 'bad-oci'}"
    else:
        data = Path(saved["base", "docker-archive"][len("docker-archive:"):]).read_bytes()
        (tmp_path / "short.tar").write_bytes(data[: len(data) // 2])
        source = f"docker-archive:{tmp_path / 'short.tar'}"
    for command in (["export", source, "-o", str(tmp_path / "out.tar")],
                    ["squash", source, str(tmp_path / "out.sqfs")]):
        result = squashstore(*command, env=storage_env, check=False)
        assert result.returncode == 1, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("squashstore: "), result.stderr
        assert "Traceback" not in result.stderr
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
        assert leftovers == [], leftovers


def test_non_utf8_names_survive_squash_tar_split_and_export(
        tmp_path: Path, mounted: Callable[[Path], Path]) -> None:
    import io
    import tarfile

    from test_layers import make_layer

    from squashstore.flatten import export_image
    from squashstore.image import Image

    raw = b"caf\xe9-\xff\xfe"  # Latin-1 bytes: not UTF-8
    name = raw.decode("utf-8", "surrogateescape")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        info = tarfile.TarInfo("d")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        info = tarfile.TarInfo(f"d/{name}")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    image = Image("test", (), b"", "", b"", "", (make_layer(0, buf.getvalue()),))
    split = tmp_path / "split.gz"
    result = squash_image(image, tmp_path / "x.sqfs", SquashOptions(), tar_split=split)
    point = mounted(tmp_path / "x.sqfs")
    assert os.listdir(os.fsencode(point / "d")) == [raw]
    with open(os.fsencode(point / "d") + b"/" + raw, "rb") as handle:
        assert handle.read() == b"hello"
    rebuilt = b"".join(tar_from_tar_split(split, point, "test"))
    assert "sha256:" + hashlib.sha256(rebuilt).hexdigest() == result.diff_digest
    out = io.BytesIO()
    export_image(image, out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), encoding="utf-8",
                      errors="surrogateescape") as tar:
        names = [m.name.encode("utf-8", "surrogateescape") for m in tar.getmembers()]
    assert b"d/" + raw in names


def test_shadowed_link_that_changed_its_file_reaches_the_tar_stream(
        tmp_path: Path, mounted: Callable[[Path], Path]) -> None:
    """Review finding (confirmed with podman export): a link whose own header changes the
    shared file, and which a higher layer then replaces, still decides the file's metadata.
    The export, the squash file and the canonical tar behind the diff_id all agree."""
    import io

    from test_layers import Member, make_layer, tar_bytes

    from squashstore.flatten import export_image
    from squashstore.image import Image

    lower = tar_bytes([Member("a", "file", b"shared", mode=0o644),
                       Member("b", "link", target="a", mode=0o755, uid=1000, gid=1000)])
    upper = tar_bytes([Member("b", "file", b"other")])
    image = Image("test", (), b"", "", b"", "", (make_layer(0, lower), make_layer(1, upper)))
    out = io.BytesIO()
    export_image(image, out)
    exported = canonical_from_tar(io.BytesIO(out.getvalue()))
    assert (exported["/a"].mode, exported["/a"].uid, exported["/a"].gid) == (0o755, 1000, 1000)
    split = tmp_path / "split.gz"
    result = squash_image(image, tmp_path / "x.sqfs", SquashOptions(), tar_split=split)
    point = mounted(tmp_path / "x.sqfs")
    squashed = canonical_from_dir(point)
    assert not diff_listings(squashed, exported, ignore_paths={"/"})
    rebuilt = b"".join(tar_from_tar_split(split, point, "test"))
    assert "sha256:" + hashlib.sha256(rebuilt).hexdigest() == result.diff_digest
    assert not diff_listings(canonical_from_tar(io.BytesIO(rebuilt)), exported)


def test_export_to_a_device_or_fifo_writes_through_and_squash_refuses_it(
        tmp_path: Path, saved: dict[tuple[str, str], str],
        storage_env: dict[str, str]) -> None:
    """``export -o /dev/null`` renamed a regular file over the device node (as root: over
    /dev/null itself). A device or FIFO is now written as it is; `squash`, whose writer
    renames over its output, refuses one; the node is never replaced."""
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    source = saved["base", "oci"]
    squashstore("export", source, "-o", str(null), env=storage_env)
    assert stat.S_ISCHR(null.stat().st_mode)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    squashstore("export", source, "-o", str(fifo), env=storage_env)
    reader.join(60)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and got and len(got[0]) > 10240
    refused = squashstore("squash", source, str(null), env=storage_env, check=False)
    assert refused.returncode == 1 and "not a regular file" in refused.stderr, refused.stderr
    assert refused.stderr.count("\n") == 1 and stat.S_ISCHR(null.stat().st_mode)
