"""The writer's data path in a worker process (`squashfs/dataworker.py`).

The worker must change nothing in the image: for any sequence of files (duplicates, zero
blocks, holes, fragments, files across the send buffer's and the block's sizes) and every
codec and block size, the image written with the worker is byte-identical to the one written
in one process. A worker that dies fails the write with one error and leaves nothing; a
parent that dies takes its worker with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_migrate import Migration
from test_store import store_snapshot, unmount_below
from test_tar_conformance import _cases, _image

from squashstore.errors import SquashstoreError
from squashstore.flatten import squash_image, stream_entries
from squashstore.image import Image, LayerError
from squashstore.layers import MergedEntry
from squashstore.mounts import Registry
from squashstore.rootfs import tree_from_directory
from squashstore.sources import open_image
from squashstore.squashfs.dataworker import ProcessDataWriter
from squashstore.squashfs.writer import SquashOptions, SquashWriter, WriterError
from squashstore.tree import Inode, Kind, new_dir
from support.fixture_trees import make_tree
from support.podman import Podman

_BS = 4096


def _content(kind: str, size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "zero":
        return bytes(size)
    if kind == "text":
        return (b"line %d\n" % seed * (size // 7 + 1))[:size]
    if kind == "holes":  # zero blocks between random ones
        return b"".join(rng.randbytes(_BS) if i % 2 else bytes(_BS)
                        for i in range(size // _BS + 1))[:size]
    return rng.randbytes(size)


def _write(dest: Path, files: list[tuple[bytes, bool]], options: SquashOptions,
           worker: bool) -> bytes:
    """An image of `files` (content, sparse) named f0, f1, ...; returns its bytes."""
    root = new_dir(mtime=1)
    assert root.children is not None
    with SquashWriter(dest, options, worker=worker) as writer:
        assert isinstance(writer._data, ProcessDataWriter) == (worker and options.jobs != 1)
        for index, (data, sparse) in enumerate(files):
            handle = writer.add_file(io.BytesIO(data), len(data), sparse)
            root.children[f"f{index}"] = Inode(Kind.FILE, mode=0o644, size=len(data),
                                                data=handle)
        writer.finish(root)
    return dest.read_bytes()


_SIZES = st.sampled_from([0, 1, 100, 4095, 4096, 4097, 12289, 70_000,
                          (256 << 10) - 8, 256 << 10, (256 << 10) + 1, (1 << 20) + 3, 3 << 20])


@st.composite
def _files(draw: st.DrawFn) -> list[tuple[bytes, bool]]:
    files: list[tuple[bytes, bool]] = []
    for _ in range(draw(st.integers(1, 12))):
        if files and draw(st.integers(0, 4)) == 0:
            files.append(draw(st.sampled_from(files)))  # a duplicate
            continue
        kind = draw(st.sampled_from(["random", "zero", "text", "holes"]))
        data = _content(kind, draw(_SIZES), draw(st.integers(0, 1000)))
        files.append((data, draw(st.booleans())))
    return files


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=_files(), compression=st.sampled_from(["gzip", "lz4", "zstd", "xz", "none"]),
       block_size=st.sampled_from([4096, 131072, 1 << 20]), jobs=st.sampled_from([2, 3]))
def test_worker_writes_the_same_bytes(
    tmp_path_factory: pytest.TempPathFactory, files: list[tuple[bytes, bool]],
    compression: str, block_size: int, jobs: int,
) -> None:
    tmp = tmp_path_factory.mktemp("dw")
    level = 1 if compression in ("gzip", "zstd", "xz") else None
    options = SquashOptions(compression=compression, level=level, block_size=block_size,
                            jobs=jobs)
    one = _write(tmp / "one.sqfs", files, options, worker=False)
    two = _write(tmp / "two.sqfs", files, options, worker=True)
    assert hashlib.sha256(one).hexdigest() == hashlib.sha256(two).hexdigest()
    assert sorted(p.name for p in tmp.iterdir()) == ["one.sqfs", "two.sqfs"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=_files(), block_size=st.sampled_from([4096, 131072]),
       same_size=st.integers(0, 3))
def test_files_hashed_only_when_their_size_repeats_dedup_the_same(
    tmp_path_factory: pytest.TempPathFactory, files: list[tuple[bytes, bool]],
    block_size: int, same_size: int,
) -> None:
    """`add_file(..., again=)`: a file of a size not seen before is not hashed while it
    streams; a later file of that size hashes it from `again`. The image is the one
    hashing every file gives (same-size files that differ, duplicates, zero files)."""
    tmp = tmp_path_factory.mktemp("lazy")
    base = files[0][0]
    for flip in range(same_size):  # same size, other content
        files.append((base[:-1] + bytes([flip]) if base else b"", False))
    options = SquashOptions(compression="lz4", block_size=block_size, jobs=1)
    images = []
    for lazy in (False, True):
        root = new_dir(mtime=1)
        assert root.children is not None
        asked: list[int] = []
        dest = tmp / f"{lazy}.sqfs"
        with SquashWriter(dest, options) as writer:
            for index, (data, sparse) in enumerate(files):
                def again(data: bytes = data, index: int = index,
                          asked: list[int] = asked) -> bytes:
                    asked.append(index)
                    return hashlib.sha256(data).digest()

                handle = writer.add_file(io.BytesIO(data), len(data), sparse,
                                         again if lazy else None)
                root.children[f"f{index}"] = Inode(Kind.FILE, mode=0o644, size=len(data),
                                                    data=handle)
            writer.finish(root)
        images.append(dest.read_bytes())
        assert len(asked) == len(set(asked))  # each file hashed again at most once
        sizes = [len(data) for data, _ in files]
        assert all(sizes.count(sizes[i]) > 1 for i in asked)
    assert images[0] == images[1]


@pytest.mark.parametrize("options", [
    SquashOptions(compression="lz4", jobs=2),
    SquashOptions(compression="zstd", level=3, jobs=2, export_table=False),
    SquashOptions(compression="gzip", block_size=8192, jobs=2, xattrs=False),
])
def test_fixture_tree_same_bytes_either_way(tmp_path: Path, options: SquashOptions) -> None:
    src = make_tree(tmp_path / "src", "full")
    images = []
    for worker in (False, True):
        dest = tmp_path / f"{worker}.sqfs"
        with SquashWriter(dest, options, worker=worker) as writer:
            writer.finish(tree_from_directory(src, writer.add_file, keep_holes=True))
        images.append(dest.read_bytes())
    assert images[0] == images[1]


def _squash_both_ways(image: Callable[[], Image], tmp: Path) -> list[object]:
    """squash_image with one job (all in this process) and with two (the worker makes the
    data and the canonical tar): squash file, tar-split, digest, size, or the error."""
    results: list[object] = []
    for jobs in (1, 2):
        (tmp / str(jobs)).mkdir()
        dest, split = tmp / str(jobs) / "layer.sqfs", tmp / str(jobs) / "tar-split.gz"
        try:
            got = squash_image(image(), dest, SquashOptions(compression="lz4", jobs=jobs),
                               tar_split=split)
        except (SquashstoreError, ValueError) as exc:
            results.append((type(exc).__name__, str(exc).replace(str(tmp / str(jobs)), "T")))
            assert not dest.exists() and not split.exists()
            continue
        results.append((got.diff_digest, got.diff_size, got.files, got.bytes_in,
                        dest.read_bytes(), split.read_bytes()))
    return results


def test_every_tar_case_squashes_the_same_with_the_worker(tmp_path: Path) -> None:
    """The tar conformance cases (PAX, GNU, long names, sparse files, xattrs, hard links,
    devices, bad archives): with the worker, the same squash file, tar-split and digest."""
    for name, data in _cases(tmp_path / "cases").items():
        out = tmp_path / name.replace("/", "_").replace(" ", "_")
        out.mkdir()
        one, two = _squash_both_ways(lambda data=data: _image(data), out)  # type: ignore[misc]
        assert one == two, name


def test_every_fixture_image_squashes_the_same_with_the_worker(
    tmp_path: Path, fixture_images: dict[str, str], podman: Podman,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"):
        monkeypatch.setenv(key, podman.env[key])
    for name, ref in fixture_images.items():
        out = tmp_path / name
        out.mkdir()
        one, two = _squash_both_ways(lambda ref=ref: open_image(ref), out)  # type: ignore[misc]
        assert isinstance(one, tuple) and len(one) == 6, (name, one)
        assert one == two, name


def test_no_worker_process_writes_in_process(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that cannot start (here: no interpreter) leaves the write in one process."""
    files = [(_content("random", 300_000, 1), False), (_content("text", 999, 2), False)]
    options = SquashOptions(compression="gzip", level=1, jobs=2)
    want = _write(tmp_path / "a.sqfs", files, options, worker=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with SquashWriter(tmp_path / "b.sqfs", options, worker=True, tar=True) as writer:
        assert not writer.writes_tar and not isinstance(writer._data, ProcessDataWriter)
        writer.abort()
    root = new_dir(mtime=1)
    assert root.children is not None
    with SquashWriter(tmp_path / "b.sqfs", options, worker=True) as writer:
        for index, (data, sparse) in enumerate(files):
            handle = writer.add_file(io.BytesIO(data), len(data), sparse)
            root.children[f"f{index}"] = Inode(Kind.FILE, mode=0o644, size=len(data),
                                                data=handle)
        writer.finish(root)
    assert (tmp_path / "b.sqfs").read_bytes() == want


def test_one_job_writes_in_process(tmp_path: Path) -> None:
    with SquashWriter(tmp_path / "x", SquashOptions(jobs=1), worker=True) as writer:
        assert not isinstance(writer._data, ProcessDataWriter)
        writer.abort()


def _pids() -> set[int]:
    """Live processes (a zombie waiting for init to reap it counts as gone)."""
    live = set()
    for name in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{name}/stat").read_text() if name.isdigit() else ""
        except OSError:
            continue
        if stat and stat.rsplit(")", 1)[1].split()[0] != "Z":
            live.add(int(name))
    return live


def test_killed_worker_fails_the_write_and_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "img.sqfs"
    rng = random.Random(5)
    root = new_dir(mtime=1)
    assert root.children is not None
    with pytest.raises(WriterError, match=r"data writer process died \(killed by signal 9\)"), \
            SquashWriter(dest, SquashOptions(compression="lz4", jobs=2), worker=True) as writer:
        data = writer._data
        assert isinstance(data, ProcessDataWriter)
        writer.add_file(io.BytesIO(rng.randbytes(3 << 20)), 3 << 20)
        os.kill(data.pid, signal.SIGKILL)
        for index in range(40):  # the dead pipe is noticed by a write or by finish
            blob = rng.randbytes(1 << 20)
            root.children[f"f{index}"] = Inode(Kind.FILE, mode=0o644, size=len(blob),
                                                data=writer.add_file(io.BytesIO(blob), len(blob)))
        writer.finish(root)
    assert list(tmp_path.iterdir()) == []
    assert data.pid not in _pids()


def test_short_read_with_worker_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "img.sqfs"
    for size in (5000, 2 << 20):
        with pytest.raises(LayerError, match="ended early"), \
                SquashWriter(dest, SquashOptions(jobs=2), worker=True) as writer:
            worker = writer._data
            assert isinstance(worker, ProcessDataWriter)
            writer.add_file(io.BytesIO(b"x" * 1000), size)
        assert list(tmp_path.iterdir()) == []
        assert worker.pid not in _pids()


def test_worker_dies_with_its_parent(tmp_path: Path) -> None:
    """A parent killed with SIGKILL (no cleanup runs) leaves no worker behind."""
    script = textwrap.dedent(f"""
        import io, sys, time
        from pathlib import Path
        from squashstore.squashfs.writer import SquashOptions, SquashWriter
        w = SquashWriter(Path({str(tmp_path / "img.sqfs")!r}), SquashOptions(jobs=2),
                         worker=True)
        w.add_file(io.BytesIO(bytes(100)), 100)
        print(w._data.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    assert pid in _pids()
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while pid in _pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid not in _pids()


def _descendants(pid: int) -> set[int]:
    """Live descendants of `pid`."""
    parents: dict[int, int] = {}
    for child in _pids():
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except OSError:
            continue
        parents[child] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def _worker_of(pid: int) -> int | None:
    for child in _descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"squashstore.squashfs.dataworker" in cmdline:
            return child
    return None


def test_migrate_with_its_worker_killed_fails_cleanly(
    tmp_path: Path, podman: Podman, make_podman: object, fixture_images: dict[str, str],
) -> None:
    """kill -9 of the worker mid-migrate: one ``squashstore:`` line, exit 1, store as before."""
    mig = Migration(tmp_path, podman, make_podman)
    try:
        mig.migrate(fixture_images["base"])
        before = store_snapshot(mig.store)
        proc = subprocess.Popen(
            [sys.executable, "-m", "squashstore.cli.main", "--store", str(mig.store.root),
             "migrate", fixture_images["big"], "--no-mount"],
            env=mig.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        worker = None
        deadline = time.monotonic() + 120
        while worker is None and proc.poll() is None and time.monotonic() < deadline:
            worker = _worker_of(proc.pid)
        assert worker is not None, "no worker seen"
        os.kill(proc.pid, signal.SIGSTOP)  # the worker cannot finish while its parent waits
        try:
            assert worker in _pids()
            os.kill(worker, signal.SIGKILL)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err
        assert err.count("\n") == 1 and err.startswith("squashstore: "), err
        assert "data writer process died (killed by signal 9)" in err
        assert store_snapshot(mig.store) == before
        assert os.listdir(mig.store.tmp_dir) == []
    finally:
        mig.consumer.close()
        Registry(mig.runtime_dir).umount_all(lazy=True)
        unmount_below(tmp_path)


@pytest.mark.parametrize("numbers", [
    {"mtime": 2**70}, {"mtime": -(2**65)}, {"mtime": -7}, {"uid": 2**40, "gid": 2**33},
    {"kind": Kind.CHARDEV, "rdev": (2**70, 1)}, {"kind": Kind.CHARDEV, "rdev": (4, 2**21)},
    {"mode": 0o7777, "mtime": 2**32 + 5},
])
def test_entries_with_numbers_beyond_the_records_fields(tmp_path: Path,
                                                        numbers: dict[str, object]) -> None:
    """Numbers a tar header holds but the worker's fixed record does not: the same result
    (image, tar-split, digest, or error) either way."""
    results = []
    for jobs in (1, 2):
        root = new_dir(mtime=3)
        assert root.children is not None
        kind = numbers.get("kind", Kind.FILE)
        attrs = {key: value for key, value in numbers.items() if key != "kind"}
        inode = Inode(kind, size=5 if kind is Kind.FILE else 0, **attrs)  # type: ignore[arg-type]
        root.children["odd"] = inode
        (tmp_path / str(jobs)).mkdir()
        dest, split = tmp_path / str(jobs) / "x.sqfs", tmp_path / str(jobs) / "x.split"
        try:
            with split.open("wb") as split_file, SquashWriter(
                    dest, SquashOptions(jobs=jobs), worker=True, tar=True,
                    tar_split=split_file) as writer:
                assert writer.writes_tar == (jobs == 2)
                entries = [MergedEntry("odd", inode, io.BytesIO(b"hello")
                                       if kind is Kind.FILE else None)]
                got = stream_entries(writer, entries, split_file)
                writer.finish(root)
                digest = got() if callable(got) else got
            results.append((digest, dest.read_bytes(), split.read_bytes()))
        except (SquashstoreError, ValueError) as exc:
            results.append((type(exc).__name__, str(exc).replace(str(tmp_path / str(jobs)), "T")))
    assert results[0] == results[1]


# --- podman's store: file content read by the writer from the layer's diff -------------


def _direct_image(tmp: Path, producer: Podman) -> tuple[str, dict[str, Path]]:
    """A two-layer image in `producer`: an imported base (busybox, /data/shadowed) and a
    COPY layer (/data/shadowed again, a small file, a 3 MiB one). Its name, and each
    file's path in podman's diff directories."""
    import tarfile

    base = tmp / "base.tar"
    with tarfile.open(base, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add("/bin/busybox", "bin/busybox")
        info = tarfile.TarInfo("data/shadowed")
        payload = b"lower layer's copy\n" * 100
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    producer.run("import", str(base), "localhost/sqs-direct-base:1")
    ctx = tmp / "ctx"
    ctx.mkdir()
    (ctx / "shadowed").write_bytes(b"upper\n")
    (ctx / "small").write_bytes(_content("text", 5000, 7))
    (ctx / "big").write_bytes(_content("random", 3 << 20, 8))
    (ctx / "Containerfile").write_text(
        "FROM localhost/sqs-direct-base:1\nCOPY shadowed small big /data/\n")
    producer.run("build", "--network", "none", "--pull=never", "-t", "localhost/sqs-direct:1",
                 str(ctx), timeout=600)
    diff_ids = producer.layers("localhost/sqs-direct:1")
    records = json.loads((producer.graphroot / "overlay-layers" / "layers.json").read_text())
    diffs = [producer.graphroot / "overlay" / next(
        r["id"] for r in records if r.get("diff-digest") == d) / "diff" for d in diff_ids]
    files = {"busybox": diffs[0] / "bin/busybox", "lower": diffs[0] / "data/shadowed",
             "small": diffs[1] / "data/small", "big": diffs[1] / "data/big"}
    return "localhost/sqs-direct:1", files


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _to_shadow(path: Path) -> None:
    path.unlink()
    path.symlink_to("/etc/shadow")


def _to_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def test_podmans_store_files_reach_the_writer_as_references(
        tmp_path: Path, make_podman: Callable[..., Podman],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent never reads a file of podman's store it keeps: the merge's entry says
    where the file is (diff directory, name, size, podman's CRC-64), the writer reads it.
    A shadowed file is still read (and checked) by the parent; an archive gives bytes."""
    from fastcrc import crc64

    from squashstore.layers import LayerMerge, content_source
    from squashstore.tar.split import DiffFile

    private = make_podman()
    for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"):
        monkeypatch.setenv(key, private.env[key])
    ref, files = _direct_image(tmp_path, private)
    sources: dict[str, DiffFile] = {}
    for entry in LayerMerge(open_image(ref).layers).entries():
        source = content_source(entry.content)
        if entry.inode.kind is Kind.FILE and entry.inode.size:
            assert isinstance(source, DiffFile), entry.path
            assert entry.content is not None and entry.content.read() == b""  # taken
            sources[entry.path] = source
        else:
            assert source is None
    assert set(sources) == {"bin/busybox", "data/shadowed", "data/small", "data/big"}
    for name, path in (("busybox", "bin/busybox"), ("small", "data/small"),
                       ("big", "data/big")):
        data = files[name].read_bytes()
        source = sources[path]
        assert source.path == os.fsencode(files[name]) and source.size == len(data)
        assert source.crc == crc64.go_iso(data).to_bytes(8, "big")
    assert sources["data/shadowed"].size == len(b"upper\n")
    archive = private.save(ref, tmp_path / "image.tar")
    for entry in LayerMerge(open_image(f"oci-archive:{archive}").layers).entries():
        assert content_source(entry.content) is None


@pytest.mark.parametrize(("victim", "tamper", "message"), [
    ("small", _flip, r"file integrity checksum failed for {path}"),
    ("big", _flip, r"file integrity checksum failed for {path}"),
    ("small", _truncate, r"{path} is shorter than the 5000 bytes the layer recorded"),
    ("big", _truncate, rf"{{path}} is shorter than the {3 << 20} bytes the layer recorded"),
    ("big", _to_shadow, r"cannot read {path}: Too many levels of symbolic links"),
    ("small", _to_fifo, r"{path} is shorter than the 5000 bytes the layer recorded"),
    ("lower", _flip, r"file integrity checksum failed for {path}"),
])
def test_a_changed_diff_file_is_refused_the_same_with_one_and_two_jobs(
        tmp_path: Path, make_podman: Callable[..., Podman], monkeypatch: pytest.MonkeyPatch,
        victim: str, tamper: Callable[[Path], None], message: str) -> None:
    """A file of podman's diff changed after tar-split recorded it (content, size, a
    symlink planted in its place, never followed; a FIFO, never waited for): with one job
    (read in this process) and with two (read by the worker) the same SourceError naming
    the file, nothing written. The shadowed lower file is read by the parent, refused too."""
    private = make_podman()
    for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"):
        monkeypatch.setenv(key, private.env[key])
    ref, files = _direct_image(tmp_path, private)
    (tmp_path / "good").mkdir()
    good = _squash_both_ways(lambda: open_image(ref), tmp_path / "good")
    assert isinstance(good[0], tuple) and len(good[0]) == 6 and good[0] == good[1]
    tamper(files[victim])
    (tmp_path / "bad").mkdir()
    one, two = _squash_both_ways(lambda: open_image(ref), tmp_path / "bad")
    assert one == two
    assert isinstance(one, tuple) and one[0] == "SourceError", one
    pattern = message.format(path=re.escape(str(files[victim])))
    assert re.search(rf"^layer \d \(sha256:[0-9a-f]{{12}}\): {pattern}$", str(one[1])), one


def test_a_directory_of_a_diff_replaced_by_a_symlink_is_never_followed(
        tmp_path: Path, make_podman: Callable[..., Podman],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory of podman's diff moved away and replaced by a symlink to it: the files
    below it still match their CRC-64s, yet nothing is read through the link (openat2
    RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS; O_NOFOLLOW guards only the last component),
    with one job and with two: the same one SourceError, nothing written."""
    private = make_podman()
    for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"):
        monkeypatch.setenv(key, private.env[key])
    ref, files = _direct_image(tmp_path, private)
    data = files["small"].parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data.rename(elsewhere / "data")
    data.symlink_to(elsewhere / "data")
    (tmp_path / "out").mkdir()
    one, two = _squash_both_ways(lambda: open_image(ref), tmp_path / "out")
    assert one == two
    assert isinstance(one, tuple) and one[0] == "SourceError", one
    assert re.search(rf"^layer 1 \(sha256:[0-9a-f]{{12}}\): cannot read {re.escape(str(data))}"
                     r"/[a-z]+: Too many levels of symbolic links$", str(one[1])), one


def test_migrate_refuses_a_changed_diff_file_with_one_line(
    tmp_path: Path, make_podman: Callable[..., Podman],
) -> None:
    """`squashstore migrate` of an image whose diff file changed, with the worker and with
    --jobs 1: one ``squashstore:`` line, exit 1, the store as it was, nothing staged."""
    private = make_podman()
    ref, files = _direct_image(tmp_path, private)
    (tmp_path / "m").mkdir()
    mig = Migration(tmp_path / "m", private, make_podman)
    try:
        _flip(files["big"])
        before = store_snapshot(mig.store)
        for jobs in ([], ["--jobs", "1"]):
            done = mig.migrate(ref, "--no-mount", *jobs, check=False)
            assert done.returncode == 1, done.stderr
            assert done.stderr.count("\n") == 1, done.stderr
            assert done.stderr.startswith("squashstore: ") and \
                "file integrity checksum failed for" in done.stderr, done.stderr
            assert store_snapshot(mig.store) == before
            assert os.listdir(mig.store.tmp_dir) == []
    finally:
        mig.consumer.close()
        Registry(mig.runtime_dir).umount_all(lazy=True)
        unmount_below(tmp_path)
