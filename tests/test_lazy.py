"""Lazy pull: range arithmetic (Hypothesis), the shared cache file (real files, real
concurrent processes), and reading a squash file through a real registry by HTTP Range."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import multiprocessing
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from squashstore import tree
from squashstore.lazy import ranges
from squashstore.lazy.cache import CacheError, RangeCache
from squashstore.lazy.ranges import Span

# ---------------------------------------------------------------------------------------
# Range arithmetic.

spans = st.builds(lambda a, n: Span(a, a + n), st.integers(0, 300), st.integers(0, 40))


def covered(items: list[Span]) -> set[int]:
    return {b for s in items for b in range(s.start, s.end)}


@given(st.lists(spans, max_size=20), st.integers(0, 10))
def test_coalesce_covers_exactly_the_inputs_and_gaps(items: list[Span], gap: int) -> None:
    out = ranges.coalesce(items, gap)
    assert all(len(s) for s in out)
    for a, b in itertools.pairwise(out):
        assert b.start > a.end + gap  # sorted, disjoint, and not joinable
    inputs, outputs = covered(items), covered(out)
    assert inputs <= outputs
    extra = sorted(outputs - inputs)
    # Every byte added lies in a hole of at most `gap` bytes between input bytes.
    holes: list[list[int]] = []
    for byte in extra:
        if holes and holes[-1][-1] == byte - 1:
            holes[-1].append(byte)
        else:
            holes.append([byte])
    for hole in holes:
        assert len(hole) <= gap
        assert hole[0] - 1 in inputs and hole[-1] + 1 in inputs


@given(st.lists(spans, max_size=10), st.integers(1, 8), st.integers(1, 6))
def test_split_keeps_bytes_and_cuts_on_alignment(items: list[Span], align: int,
                                                 times: int) -> None:
    limit = align * times
    pieces = ranges.split(items, limit, align)
    assert [b for p in pieces for b in range(p.start, p.end)] == \
        [b for s in items for b in range(s.start, s.end)]
    for piece in pieces:
        assert 0 < len(piece) <= limit
    assert pieces == [p for s in items for p in ranges.split([s], limit, align)]
    for span in items:
        for a, _ in itertools.pairwise(ranges.split([span], limit, align)):
            assert a.end % align == 0  # a cut inside one input span


@given(st.binary(min_size=1, max_size=8), st.integers(1, 16), spans)
def test_missing_runs_are_exactly_the_absent_chunks(bitmap: bytes, chunk: int,
                                                    span: Span) -> None:
    chunks = len(bitmap) * 8
    size = chunks * chunk - random.Random(span.start).randrange(chunk)
    span = Span(min(span.start, size), min(span.end, size))
    touched = ranges.chunk_range(span, chunk)
    runs = ranges.missing_runs(bitmap, touched)
    absent = [i for i in touched if not ranges.has_chunk(bitmap, i)]
    assert [i for r in runs for i in r] == absent
    for a, b in itertools.pairwise(runs):
        assert b.start > a.stop  # maximal: runs never touch
    for s in ranges.runs_to_spans(runs, chunk, size):
        assert s.start % chunk == 0 and (s.end % chunk == 0 or s.end == size)
    # Reading the span is covered by its present chunks plus the missing spans.
    present = covered([Span(i * chunk, min((i + 1) * chunk, size)) for i in touched
                       if ranges.has_chunk(bitmap, i)])
    assert covered([span]) <= present | covered(ranges.runs_to_spans(runs, chunk, size))


@given(st.binary(max_size=16), st.integers(0, 128))
def test_set_and_count_chunks(bitmap: bytes, upto: int) -> None:
    upto = min(upto, len(bitmap) * 8)
    naive = sum(ranges.has_chunk(bitmap, i) for i in range(upto))
    assert ranges.count_present(bitmap, upto) == naive
    grown = bytearray(bitmap)
    ranges.set_chunks(grown, range(upto))
    assert ranges.count_present(grown, upto) == upto
    assert all(ranges.has_chunk(grown, i) == ranges.has_chunk(bitmap, i)
               for i in range(upto, len(bitmap) * 8))


@given(st.integers(1, 64), st.integers(1, 10), st.lists(st.integers(1, 50), min_size=1,
                                                      max_size=30))
def test_readahead_doubles_on_sequential_reads_and_stops_on_random(
        initial: int, factor: int, sizes: list[int]) -> None:
    maximum = initial * factor
    streams: tuple[ranges.Stream, ...] = ()
    pos, windows = 1000, []
    for size in sizes:
        streams, ahead = ranges.readahead(streams, Span(pos, pos + size), initial=initial,
                                          maximum=maximum)
        windows.append(ahead)
        pos += size
    assert windows[0] == 0  # the first read of a stream is taken as random
    for before, after in itertools.pairwise(windows[1:]):
        assert after == min(maximum, max(initial, before * 2))
    assert all(w <= maximum for w in windows)
    # A read far from every stream reads nothing ahead and starts a new stream.
    streams, ahead = ranges.readahead(streams, Span(0, 1), initial=initial, maximum=maximum)
    assert ahead == 0 and streams[0] == ranges.Stream(1, 0)


def test_readahead_follows_several_streams_at_once() -> None:
    streams: tuple[ranges.Stream, ...] = ()
    kw = {"initial": 10, "maximum": 80}
    for step in range(4):
        for base in (0, 10_000, 20_000):
            streams, ahead = ranges.readahead(
                streams, Span(base + 5 * step, base + 5 * step + 5), **kw)
            assert ahead == (0 if step == 0 else min(80, 10 * 2 ** (step - 1)))
    assert len(streams) == 3


# ---------------------------------------------------------------------------------------
# The cache file.

CHUNK = 4096


def blob_bytes(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def chunk_spans(size: int, chunk: int = CHUNK) -> list[Span]:
    return [Span(i, min(i + chunk, size)) for i in range(0, size, chunk)]


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    return directory


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_cache_stores_reads_and_survives_a_reopen(cache_dir: Path) -> None:
    blob = blob_bytes(10 * CHUNK + 123)
    digest = digest_of(blob)
    with RangeCache.in_directory(cache_dir, digest, len(blob), CHUNK) as cache:
        assert cache.missing(Span(5, 9000)) == [Span(0, 3 * CHUNK)]
        cache.store([(Span(CHUNK, 2 * CHUNK), blob[CHUNK:2 * CHUNK])])
        assert cache.missing(Span(5, 9000)) == [Span(0, CHUNK), Span(2 * CHUNK, 3 * CHUNK)]
        last = Span(10 * CHUNK, len(blob))
        cache.store([(last, blob[last.start:])])
        assert cache.read(Span(CHUNK + 7, 2 * CHUNK)) == blob[CHUNK + 7:2 * CHUNK]
        assert not cache.complete()
        with pytest.raises(CacheError, match="chunk-aligned"):
            cache.store([(Span(1, CHUNK + 1), blob[1:CHUNK + 1])])
    # The data file is sparse: only what was stored occupies disk.
    assert os.stat(cache.data_path).st_blocks * 512 < 4 * CHUNK + 8192
    with RangeCache.in_directory(cache_dir, digest, len(blob), CHUNK) as again:  # a remount
        assert again.present_chunks() == 2
        assert again.read(last) == blob[last.start:]
        again.store((s, blob[s.start:s.end]) for s in again.all_missing())
        assert again.complete()
    assert cache.data_path.read_bytes() == blob


def test_cache_refuses_another_blobs_map_and_an_open_directory(cache_dir: Path) -> None:
    blob = blob_bytes(3 * CHUNK)
    RangeCache.in_directory(cache_dir, digest_of(blob), len(blob), CHUNK).close()
    with pytest.raises(CacheError, match="another blob"):
        RangeCache.in_directory(cache_dir, digest_of(blob), len(blob) + 1, CHUNK)
    from squashstore.lazy.cache import check_directory

    check_directory(cache_dir)
    cache_dir.chmod(0o777)
    with pytest.raises(CacheError, match="writable only by it"):
        check_directory(cache_dir)


def test_cache_a_crash_before_the_header_leaves_a_new_cache(cache_dir: Path) -> None:
    blob = blob_bytes(2 * CHUNK)
    cache = RangeCache.in_directory(cache_dir, digest_of(blob), len(blob), CHUNK)
    cache.store([(Span(0, CHUNK), blob[:CHUNK])])
    cache.close()
    with open(cache.map_path, "r+b") as f:  # header torn away, bits left behind
        f.write(bytes(128))
    with RangeCache.in_directory(cache_dir, digest_of(blob), len(blob), CHUNK) as again:
        assert again.present_chunks() == 0
        assert again.missing(Span(0, len(blob))) == [Span(0, len(blob))]


def _fill_worker(directory: str, digest: str, size: int, seed: int, start: object) -> None:
    blob = blob_bytes(size)
    order = chunk_spans(size)
    random.Random(seed).shuffle(order)
    start.wait()  # type: ignore[attr-defined]
    stored = []
    with RangeCache.in_directory(Path(directory), digest, size, CHUNK) as cache:
        for span in order[: len(order) * 2 // 3]:
            if cache.missing(span):
                cache.store([(span, blob[span.start:span.end])])
                stored.append(str(span.start))
    (Path(directory) / f"stored-{seed}").write_text(" ".join(stored))


def test_cache_is_shared_by_racing_processes(cache_dir: Path) -> None:
    size = 200 * CHUNK + 77
    blob = blob_bytes(size)
    digest = digest_of(blob)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    workers = [ctx.Process(target=_fill_worker,
                           args=(str(cache_dir), digest, size, seed, barrier))
               for seed in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    with RangeCache.in_directory(cache_dir, digest, size, CHUNK) as cache:
        # No bit was lost to a racing read-modify-write of the map: every chunk a worker
        # stored is marked present.
        stored = {int(x) for seed in range(4)
                  for x in (cache_dir / f"stored-{seed}").read_text().split()}
        missing = cache.all_missing()
        present = [s for s in chunk_spans(size) if not cache.missing(s)]
        assert {s.start for s in present} == stored
        assert len(stored) > len(chunk_spans(size)) * 2 // 3
        for span in present:
            assert cache.read(span) == blob[span.start:span.end]
        cache.store((s, blob[s.start:s.end]) for s in missing)
        assert cache.complete()
    assert hashlib.sha256(cache.data_path.read_bytes()).hexdigest() == digest[7:]


# ---------------------------------------------------------------------------------------
# Reading a squash file through a real registry.

# The registry is tests/support/registry.py's (TLS, no auth unless a test asks).

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import requests  # noqa: E402

from squashstore.lazy.lazyfile import LazyFile  # noqa: E402
from squashstore.lazy.source import FetchError, RangeSource, session_get  # noqa: E402
from squashstore.squashfs.reader import SqInode, SquashfsError, SquashReader  # noqa: E402
from support.registry import PASSWORD, USER, LocalHTTP, RegistryServer  # noqa: E402

REPO = "lazy/test"


def squash_dir(root: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "squashstore.cli.main", "squash", f"rootfs:{root}",
                    str(out)], check=True, capture_output=True)
    return out


def make_tree(root: Path) -> None:
    """Small text files (what a start reads) beside large incompressible ones."""
    rng = random.Random(13)
    for d in range(4):
        sub = root / f"dir{d}"
        sub.mkdir(parents=True)
        for i in range(15):
            (sub / f"small{i}.txt").write_text(f"file {d}/{i}\n" * rng.randrange(1, 200))
        (sub / f"big{d}.bin").write_bytes(rng.randbytes(1_400_000 + d * 7919))
        (sub / f"medium{d}.bin").write_bytes(rng.randbytes(150_000))
    (root / "etc").mkdir()
    (root / "etc" / "os-release").write_text('NAME="lazy"\n')
    os.symlink("etc/os-release", root / "link")


@dataclass
class Pushed:
    registry: RegistryServer
    squash: Path
    digest: str
    size: int
    cache_dir: Path
    certs: Path
    """A --cert-dir trusting the registry (its CA)."""
    ca: Path

    def served(self) -> tuple[int, int]:
        return self.registry.served(self.digest)

    def remote(self) -> Any:
        return lazy_image.Remote(self.registry.host, REPO, self.digest, self.size,
                                 cert_dir=str(self.certs))


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[Pushed]:
    certs = request.getfixturevalue("pki")  # test_registry's CA and server certificate
    base = tmp_path_factory.mktemp("lazy-registry")
    make_tree(base / "rootfs")
    squash = squash_dir(base / "rootfs", base / "image.sqfs")
    registry = RegistryServer(base / "registry", certs)
    try:
        data = squash.read_bytes()
        digest = registry.push_blob(REPO, data)
        yield Pushed(registry, squash, digest, len(data), base, certs.certs, certs.ca_cert)
    finally:
        registry.close()


def open_lazy(pushed: Pushed, cache_dir: Path, **kw: object) -> tuple[LazyFile, RangeSource]:
    cache_dir.mkdir(mode=0o700, exist_ok=True)
    session = requests.Session()
    session.verify = str(pushed.ca)
    session.trust_env = False  # else $REQUESTS_CA_BUNDLE wins over session.verify
    source = RangeSource(session_get(session, pushed.registry.blob_url(REPO, pushed.digest)),
                         pushed.size, f"127.0.0.1/{REPO}@{pushed.digest[:19]}", backoff=0.05)
    cache = RangeCache.in_directory(cache_dir, pushed.digest, pushed.size)
    return LazyFile(cache, source, **kw), source  # type: ignore[arg-type]


def lazy_reader(lazy: LazyFile) -> SquashReader:
    """What `pull --lazy` and the server do: metadata up front, then the reader."""
    lazy.prefetch_metadata()
    return SquashReader(lazy.cache.data_path, source=lazy)


def read_file(reader: SquashReader, path: str) -> bytes:
    inode = reader.resolve(path)
    return reader.read(inode, 0, inode.size)


def walk(reader: SquashReader) -> Iterator[tuple[str, SqInode]]:
    pending = [("", reader.root)]
    while pending:
        prefix, directory = pending.pop()
        for entry in reader.readdir(directory):
            inode = reader.inode(entry.ref)
            path = f"{prefix}/{entry.name.decode()}"
            yield path, inode
            if inode.kind is tree.Kind.DIR:
                pending.append((path, inode))


def test_lazy_read_of_a_few_files_fetches_little(pushed: Pushed, tmp_path: Path) -> None:
    lazy, source = open_lazy(pushed, tmp_path / "cache")
    local = SquashReader(pushed.squash)
    before = pushed.served()
    started = time.perf_counter()
    reader = lazy_reader(lazy)
    opened = time.perf_counter() - started
    after_meta = pushed.served()
    # ls -lR and stat of everything: answered from the metadata fetched up front.
    listing = {p: (i.st_mode, i.size, i.uid) for p, i in walk(reader)}
    assert listing == {p: (i.st_mode, i.size, i.uid) for p, i in walk(local)}
    assert pushed.served() == after_meta
    assert reader.readlink(reader.resolve("/link")) == b"etc/os-release"
    latencies = []
    for path in ("/etc/os-release", "/dir1/small3.txt", "/dir2/medium2.bin"):
        t = time.perf_counter()
        assert read_file(reader, path) == read_file(local, path)
        latencies.append(time.perf_counter() - t)
    t = time.perf_counter()
    assert read_file(reader, "/dir2/medium2.bin") == read_file(local, "/dir2/medium2.bin")
    cached = time.perf_counter() - t
    count, served = pushed.served()
    count -= before[0]
    served -= before[1]
    print(f"\nlazy: squash file {pushed.size} B; metadata up front "
          f"{after_meta[1] - before[1]} B in {opened * 1000:.1f} ms; 3 files: "
          f"{served} B served in {count} requests ({100 * served / pushed.size:.1f} %), "
          f"cold reads {', '.join(f'{x * 1000:.1f}' for x in latencies)} ms, "
          f"cached {cached * 1000:.2f} ms")
    assert served == source.bytes
    assert served > after_meta[1] - before[1]  # the medium file came from the registry
    assert served < pushed.size / 4
    assert not lazy.cache.complete()
    reader.close()
    lazy.close()
    source.close()


def test_reading_every_file_completes_the_cache(pushed: Pushed, tmp_path: Path) -> None:
    lazy, source = open_lazy(pushed, tmp_path / "cache")
    reader = lazy_reader(lazy)
    local = SquashReader(pushed.squash)
    t = time.perf_counter()
    files = 0
    for path, inode in walk(reader):
        if inode.kind is tree.Kind.FILE:
            assert read_file(reader, path) == read_file(local, path)
            files += 1
    elapsed = time.perf_counter() - t
    assert lazy.cache.complete()
    assert lazy.cache.data_path.read_bytes() == pushed.squash.read_bytes()
    print(f"\nlazy: all {files} files in {elapsed:.2f} s, {source.requests} range requests, "
          f"{source.bytes} B for a {pushed.size} B file")
    # A remount (a new cache object, no registry at all) serves everything from the file.
    reader.close()
    lazy.close()
    source.close()
    offline = LazyFile(
        RangeCache.in_directory(tmp_path / "cache", pushed.digest, pushed.size), None)
    again = SquashReader(offline.cache.data_path, source=offline)
    assert read_file(again, "/dir3/big3.bin") == read_file(local, "/dir3/big3.bin")
    again.close()
    offline.close()


def test_sequential_read_reads_ahead(pushed: Pushed, tmp_path: Path) -> None:
    lazy, source = open_lazy(pushed, tmp_path / "cache")
    reader = lazy_reader(lazy)
    meta_requests = source.requests
    inode = reader.resolve("/dir0/big0.bin")
    data = b"".join(reader.read(inode, pos, 128 << 10) for pos in range(0, inode.size, 128 << 10))
    assert data == read_file(SquashReader(pushed.squash), "/dir0/big0.bin")
    blocks = -(-inode.size // reader.block_size)
    # Without readahead, every 128 KiB block is at least one request of its own.
    print(f"\nlazy: sequential read of {blocks} blocks: {source.requests - meta_requests} "
          "range requests")
    assert source.requests - meta_requests < blocks / 2
    reader.close()
    lazy.close()
    source.close()


def test_registry_down_fails_uncached_reads_only(pushed: Pushed, tmp_path: Path) -> None:
    lazy, source = open_lazy(pushed, tmp_path / "cache")
    reader = lazy_reader(lazy)
    local = SquashReader(pushed.squash)
    cached = read_file(reader, "/dir0/small1.txt")
    pushed.registry.kill()
    try:
        t = time.perf_counter()
        with pytest.raises(SquashfsError, match="connection refused"):
            read_file(reader, "/dir3/big3.bin")
        failed_in = time.perf_counter() - t
        assert read_file(reader, "/dir0/small1.txt") == cached
        assert [p for p, _ in walk(reader)]  # ls still works
        with pytest.raises(FetchError):
            lazy.pread(10, pushed.size - (pushed.size // 2))
    finally:
        pushed.registry.start()
    assert read_file(reader, "/dir3/big3.bin") == read_file(local, "/dir3/big3.bin")
    print(f"\nlazy: a read with the registry down failed in {failed_in * 1000:.0f} ms")
    reader.close()
    lazy.close()
    source.close()


def test_auth_callback_is_asked_again_after_401(pushed: Pushed, tmp_path: Path,
                                                request: pytest.FixtureRequest) -> None:
    creds = (USER, PASSWORD)
    registry = RegistryServer(tmp_path / "registry", request.getfixturevalue("pki"),
                              "htpasswd")
    session = requests.Session()
    session.verify = str(pushed.ca)
    session.trust_env = False  # else $REQUESTS_CA_BUNDLE wins over session.verify
    try:
        blob = blob_bytes(300_000)
        digest = registry.push_blob(REPO, blob, auth=creds)
        asked: list[bool] = []

        def auth(refresh: bool) -> dict[str, str]:
            asked.append(refresh)
            if not refresh:
                return {"Authorization": "Basic " + "ZXhwaXJlZDp0b2tlbg=="}  # stale
            return {"Authorization": requests.auth._basic_auth_str(*creds)}

        source = RangeSource(session_get(session, registry.blob_url(REPO, digest), auth),
                             len(blob), "test")
        assert source.fetch(Span(1000, 70_000)) == blob[1000:70_000]
        assert asked == [False, True]
        no_auth = RangeSource(session_get(session, registry.blob_url(REPO, digest)),
                              len(blob), "test", retries=0)
        with pytest.raises(FetchError, match="HTTP 401"):
            no_auth.fetch(Span(0, 10))
    finally:
        registry.close()


# ---------------------------------------------------------------------------------------
# A lazy squash file in a store layout, served by the real FUSE server.

from squashstore.fuse import daemon  # noqa: E402
from squashstore.lazy import image as lazy_image  # noqa: E402
from squashstore.lazy import paths as lazy_paths  # noqa: E402
from squashstore.lazy import remote as lazy_remote  # noqa: E402


def test_fuse_server_serves_a_lazy_squash_file(pushed: Pushed, tmp_path: Path) -> None:
    meta = tmp_path / "store-meta"
    (meta / "squash").mkdir(parents=True)
    squash = meta / "squash" / ("ab" * 32 + ".sqfs")
    staged = tmp_path / "staged.sqfs"
    remote = pushed.remote()
    source = lazy_remote.open_source(remote)
    fetched = lazy_image.stage(staged, squash, remote, source)
    source.close()
    staged.rename(squash)  # what the store's publish does
    assert lazy_paths.is_lazy(squash)
    assert fetched < pushed.size / 10
    status = lazy_image.status(squash)
    assert status is not None and status.present == fetched
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = pushed.served()
    daemon.start(squash, mnt, ("--log-file", str(tmp_path / "fuse.log")))
    try:
        root = pushed.squash.parent / "rootfs"
        names = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
        assert names == sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        files = [p for p in names if (root / p).is_file() and not (root / p).is_symlink()]
        assert {p: (mnt / p).lstat().st_size for p in files} == \
            {p: (root / p).lstat().st_size for p in files}
        # ls and stat of everything: no request at all (the metadata came with the pull).
        assert pushed.served() == before
        assert (mnt / "dir1/small3.txt").read_bytes() == (root / "dir1/small3.txt").read_bytes()
        assert (mnt / "dir3/medium3.bin").read_bytes() == \
            (root / "dir3/medium3.bin").read_bytes()
        served = pushed.served()[1] - before[1]
        assert served < pushed.size / 4
        pushed.registry.kill()
        try:
            with pytest.raises(OSError) as failed:
                (mnt / "dir2/big2.bin").read_bytes()
            assert failed.value.errno == 5  # EIO, for that read only
            assert (mnt / "dir3/medium3.bin").read_bytes() == \
                (root / "dir3/medium3.bin").read_bytes()
            assert (mnt / "etc/os-release").read_text() == 'NAME="lazy"\n'
        finally:
            pushed.registry.start()
        assert (mnt / "dir2/big2.bin").read_bytes() == (root / "dir2/big2.bin").read_bytes()
        log = (tmp_path / "fuse.log").read_text()
        assert "connection refused" in log
        # Completing it (what `pull` does to a lazy image) while it is mounted.
        assert lazy_image.complete(squash, lazy_remote.open_source)
        assert not lazy_paths.is_lazy(squash) and not lazy_paths.map_path(squash).exists()
        assert squash.read_bytes() == pushed.squash.read_bytes()
        assert (mnt / "dir0/big0.bin").read_bytes() == (root / "dir0/big0.bin").read_bytes()
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert lazy_image.complete(squash, None) is False  # an ordinary squash file now


# ---------------------------------------------------------------------------------------
# A lazy image in a real store: verify and gc know it.


def publish_lazy(store_root: Path, pushed: Pushed) -> tuple[Any, Path]:
    """What `pull --lazy` does, with the store's own publication: a sparse squash file with
    its metadata fetched, the marker and map in place, then publish."""
    from squashstore.migrate import squashed_config, squashed_manifest
    from squashstore.store import Publication, Store

    store = Store(store_root)
    store.init()
    diff = "sha256:" + hashlib.sha256(pushed.squash.read_bytes() + b"diff").hexdigest()
    config = squashed_config({"architecture": "amd64", "os": "linux", "config": {},
                              "rootfs": {"type": "layers", "diff_ids": []}}, diff)
    final = store.squash_file(diff.removeprefix("sha256:"))
    remote = pushed.remote()
    with store.staging() as stage:
        source = lazy_remote.open_source(remote)
        lazy_image.stage(stage / "layer.sqfs", final, remote, source)
        source.close()
        image = store.publish(Publication(
            stage / "layer.sqfs", diff, 1, config, squashed_manifest(config, diff, 1),
            ("localhost/lazy:1",), "2026-01-01T00:00:00Z"))
    return store, image.squash


def test_verify_and_gc_know_lazy_images(pushed: Pushed, tmp_path: Path) -> None:
    from test_store import cli

    from squashstore import host

    store, squash = publish_lazy(tmp_path / "store", pushed)
    assert lazy_paths.is_lazy(squash)  # survived the writer lock's leftover cleanup
    before = pushed.served()
    # verify of an incomplete lazy image: its structure from the cache, no download.
    out = cli(store.root, "verify")
    assert "ok: 1 image(s), 1 of them incomplete (lazy)" in out.stdout
    status = lazy_image.status(squash)
    assert status is not None
    share = 100 * status.present / pushed.size
    assert f"incomplete (lazy): {share:.1f} % present" in out.stdout, out.stdout
    assert "chunks unverified until complete" in out.stdout  # staged without digests
    assert pushed.served() == before
    listed = json.loads(cli(store.root, "images", "--format", "json").stdout)
    assert listed[0]["lazy_status"] == {"present": status.present, "size": pushed.size,
                                        "source": status.remote.describe(),
                                        "node_present": None}
    # A stale marker of a layer nobody stages goes at the next gc; the live image's stays.
    stale = lazy_paths.marker_path(squash.with_name("cd" * 32 + ".sqfs"))
    stale.write_text(json.dumps({"registry": "x", "repository": "y", "digest": "sha256:00",
                                 "size": 1, "writer": f"{host.hostname()}.{os.getpid()}.1"}))
    stale.chmod(0o644)
    cli(store.root, "gc")
    assert not stale.exists() and lazy_paths.is_lazy(squash)
    # Every chunk present: verify checks the digest and makes the image ordinary.
    lazy = lazy_image.open_lazy(squash, lazy_remote.open_source)
    assert lazy is not None and lazy.source is not None
    lazy.fill()
    lazy.source.close()
    lazy.close()
    assert lazy_paths.is_lazy(squash)
    out = cli(store.root, "verify")
    assert out.stdout.strip().endswith("ok: 1 image(s)") and "incomplete" not in out.stdout
    assert not lazy_paths.is_lazy(squash) and not lazy_paths.map_path(squash).exists()
    listed = json.loads(cli(store.root, "images", "--format", "json").stdout)
    assert listed[0]["lazy_status"] is None
    assert squash.read_bytes() == pushed.squash.read_bytes()
    # Removing the image takes its lazy files along (none are left here) and its file.
    cli(store.root, "rmi", "localhost/lazy:1")
    assert not squash.exists()
    assert not list(lazy_paths.lazy_dir(squash).iterdir())


def test_a_completed_lazy_image_with_wrong_bytes_fails_verify(pushed: Pushed,
                                                                tmp_path: Path) -> None:
    from test_store import cli

    store, squash = publish_lazy(tmp_path / "store", pushed)
    lazy = lazy_image.open_lazy(squash, lazy_remote.open_source)
    assert lazy is not None and lazy.source is not None
    lazy.fill()
    lazy.source.close()
    lazy.close()
    with open(squash, "r+b") as f:  # a bit flipped in the cache after it was fetched
        f.seek(len(pushed.squash.read_bytes()) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    out = cli(store.root, "verify", check=False)
    assert out.returncode != 0
    assert "expected " + pushed.digest in out.stdout + out.stderr
    assert lazy_paths.is_lazy(squash)  # still lazy; its cache forgotten
    status = lazy_image.status(squash)
    assert status is not None and status.present == 0


# ---------------------------------------------------------------------------------------
# pull --lazy end to end: a store image pushed by one site, pulled lazily by another, run by
# podman through a real FUSE mount, then completed.

from test_registry import (  # noqa: E402, F401 - their fixtures, used by name
    CREDS,
    Site,
    _migrated_id,
    make_site,
    pki,
    registries,
)

from support.fixture_trees import image_ref  # noqa: E402
from support.podman import Podman  # noqa: E402

LAZY_IMAGE = "localhost/sqs-lazy-data:latest"


@pytest.fixture(scope="module")
def data_image(podman: Podman, fixture_images: dict[str, str],
               tmp_path_factory: pytest.TempPathFactory) -> str:
    """base + 6 MB of incompressible data a container start never reads."""
    ctx = tmp_path_factory.mktemp("lazy-image")
    (ctx / "Containerfile").write_text(
        f"FROM {image_ref('base')}\n"
        "RUN head -c 6000000 /dev/urandom > /data.bin && echo lazy-hello > /hello\n")
    podman.build(ctx, LAZY_IMAGE)
    return LAZY_IMAGE


def _squash_served(server: RegistryServer, digest: str) -> int:
    return server.served(digest)[1]


@pytest.mark.podman
@pytest.mark.slow
def test_pull_lazy_runs_in_podman_and_completes(
        request: pytest.FixtureRequest, data_image: str) -> None:
    new_site: Any = request.getfixturevalue("make_site")
    servers: dict[str, Any] = request.getfixturevalue("registries")
    origin = new_site("origin")
    iid = _migrated_id(origin, data_image)
    server = servers["token"]  # bearer tokens: the FUSE server fetches its own
    ref = f"{server.host}/lazy/data:1"
    origin.cli("push", "--creds", CREDS, data_image, ref)
    original = origin.store.resolve(iid).squash.read_bytes()
    digest = digest_of(original)

    node: Site = new_site("node")
    node.cli("login", "-u", CREDS.split(":")[0], "-p", CREDS.split(":", 1)[1], server.host)
    t = time.perf_counter()
    out = node.cli("pull", "--lazy", "--format", "json", ref)
    pulled_in = time.perf_counter() - t
    result = json.loads(out.stdout)
    assert result["id"] == iid and result["lazy"] is True
    image = node.store.resolve(iid)
    assert lazy_paths.is_lazy(image.squash)
    assert image.metadata  # listed like any other image
    # The chunk digests came along (the push sent them) and sit beside the marker.
    from squashstore.lazy import chunkdigests

    kept = lazy_paths.chunks_path(image.squash).read_bytes()
    assert chunkdigests.parse(kept, "x").table == \
        chunkdigests.compute(origin.store.resolve(iid).squash).table
    meta_served = _squash_served(server, digest)
    t = time.perf_counter()
    hello = node.mig.consumer.text("run", "--rm", "--pull=never", ref, "cat", "/hello")
    run_in = time.perf_counter() - t
    assert hello.strip() == "lazy-hello"
    served = _squash_served(server, digest)
    print(f"\nlazy pull: squash file {len(original)} B; pull --lazy {pulled_in:.2f} s "
          f"({meta_served} B); podman run cat: {run_in:.2f} s, {served} B served in all "
          f"({100 * served / len(original):.1f} %)")
    assert served < len(original) / 2
    assert node.cli("verify", tls=False).returncode == 0  # metadata only, nothing fetched
    assert _squash_served(server, digest) == served
    # A plain pull completes it: the same bytes, an ordinary image, verify reads it all.
    done = json.loads(node.cli("pull", "--creds", CREDS, "--format", "json", ref).stdout)
    assert done["id"] == iid and done["downloaded"] > 0
    assert not lazy_paths.is_lazy(image.squash)
    assert not lazy_paths.chunks_path(image.squash).exists()  # gone with the marker
    assert image.squash.read_bytes() == original
    assert node.mig.consumer.text("run", "--rm", "--pull=never", ref, "wc", "-c",
                                  "/data.bin").split()[0] == "6000000"
    assert node.cli("verify", tls=False).returncode == 0


# ---------------------------------------------------------------------------------------
# Start-up prefetch lists: recorded while a command reads the image, fetched in bulk.

from squashstore.image import SourceError  # noqa: E402
from squashstore.lazy import prefetch  # noqa: E402


@given(st.lists(st.integers(0, 200), max_size=60))
def test_prefetch_list_round_trips_and_covers_the_recorded_chunks(chunks: list[int]) -> None:
    size = 150 * 1000 + 17
    listed = prefetch.from_chunks(chunks, 1000, "sha256:" + "a" * 64, size, "cmd")
    assert prefetch.parse(listed.to_json(), "t") == listed
    wanted = {b for i in chunks if i * 1000 < size
              for b in range(i * 1000, min((i + 1) * 1000, size))}
    assert covered(list(listed.spans)) == wanted
    for a, b in itertools.pairwise(listed.spans):
        assert b.start > a.end  # sorted, disjoint, merged


def test_prefetch_list_refuses_bad_lists_and_ignores_later_versions() -> None:
    good = prefetch.PrefetchList("sha256:" + "b" * 64, 100, (Span(0, 10),))
    doc = json.loads(good.to_json())
    assert prefetch.parse(json.dumps({**doc, "version": 2}).encode(), "t") is None
    for bad in (b"[", b"[]", json.dumps({**doc, "ranges": [[90, 20]]}).encode(),
                json.dumps({**doc, "ranges": [[-1, 5]]}).encode(),
                json.dumps({**doc, "ranges": [[1, True]]}).encode(),
                json.dumps({**doc, "squash": {"digest": 5, "size": 100}}).encode(),
                b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(SourceError):
            prefetch.parse(bad, "t")
    assert prefetch.for_squash(good, good.digest, 100, "t") is good
    with pytest.raises(SourceError, match="another squash file"):
        prefetch.for_squash(good, good.digest, 101, "t")


def test_recorder_notes_each_chunk_once_in_first_read_order(tmp_path: Path) -> None:
    blob = blob_bytes(10 * CHUNK + 5)
    (tmp_path / "f").write_bytes(blob)
    (tmp_path / "rec").touch()
    fd = os.open(tmp_path / "rec", os.O_WRONLY | os.O_APPEND)
    inner = prefetch.FileSource(tmp_path / "f")
    recorder = prefetch.Recorder(inner, fd, CHUNK)
    assert recorder.size == len(blob)
    assert recorder.pread(10, 5 * CHUNK - 5) == blob[5 * CHUNK - 5:5 * CHUNK + 5]
    assert recorder.pread(CHUNK, 0) == blob[:CHUNK]
    assert recorder.pread(100, 5 * CHUNK + 9) == blob[5 * CHUNK + 9:5 * CHUNK + 109]
    assert recorder.pread(50, 10 * CHUNK) == blob[10 * CHUNK:]
    os.close(fd)
    inner.close()
    assert prefetch.read_recording(tmp_path / "rec") == [4, 5, 0, 10]


def test_a_recorded_start_is_prefetched_in_few_requests(pushed: Pushed, tmp_path: Path) -> None:
    """Read a few files through a recording lazy reader; a fresh cache then fetches that
    list in bulk, and reading the same files again asks the registry nothing."""
    wanted = ["/etc/os-release", "/dir1/small3.txt", "/dir0/small7.txt", "/dir3/small1.txt",
              *(f"/dir{d}/medium{d}.bin" for d in range(4))]
    heads = [f"/dir{d}/big{d}.bin" for d in range(4)]  # scattered: a start reads a bit of each

    def read_all(reader: SquashReader) -> None:
        for path in wanted:
            assert read_file(reader, path) == read_file(local, path)
        for path in heads:
            assert reader.read(reader.resolve(path), 0, 5000) == \
                read_file(local, path)[:5000]

    lazy, source = open_lazy(pushed, tmp_path / "first")
    lazy.prefetch_metadata()
    first_meta = source.requests
    (tmp_path / "rec").touch()
    fd = os.open(tmp_path / "rec", os.O_WRONLY | os.O_APPEND)
    reader = SquashReader(lazy.cache.data_path, source=prefetch.Recorder(lazy, fd))
    local = SquashReader(pushed.squash)
    read_all(reader)
    cold_requests = source.requests - first_meta
    reader.close()
    lazy.close()
    source.close()
    os.close(fd)
    listed = prefetch.from_chunks(prefetch.read_recording(tmp_path / "rec"),
                                  prefetch.RECORD_CHUNK, pushed.digest, pushed.size)
    assert listed.total < pushed.size / 3

    lazy, source = open_lazy(pushed, tmp_path / "second")
    lazy.prefetch_metadata()
    before = pushed.served()
    t = time.perf_counter()
    lazy.prefetch_bulk(listed.spans)
    bulk_in = time.perf_counter() - t
    bulk = pushed.served()
    reader = SquashReader(lazy.cache.data_path, source=lazy)
    read_all(reader)
    after = pushed.served()
    print(f"\nprefetch: {listed.total} B in {len(listed.spans)} ranges fetched in "
          f"{bulk[0] - before[0]} requests ({bulk_in * 1000:.0f} ms); reading the files "
          f"afterwards: {after[0] - bulk[0]} requests (cold, without the list: "
          f"{cold_requests})")
    # Ranges merged, then cut into about one piece per fetching thread: few requests.
    assert bulk[0] - before[0] <= min(len(listed.spans), cold_requests) + source.workers
    assert after == bulk  # nothing more from the registry
    reader.close()
    lazy.close()
    source.close()


def test_bulk_prefetch_fails_whole_with_the_registry_down_and_works_after(
        pushed: Pushed, tmp_path: Path) -> None:
    lazy, source = open_lazy(pushed, tmp_path / "cache")
    lazy.prefetch_metadata()
    present = lazy.cache.present_chunks()
    pushed.registry.kill()
    try:
        with pytest.raises(FetchError, match="connection refused"):
            lazy.prefetch_bulk([Span(0, pushed.size)])
        assert lazy.cache.present_chunks() == present  # nothing marked that did not come
    finally:
        pushed.registry.start()
    lazy.prefetch_bulk([Span(0, pushed.size)])
    assert lazy.cache.complete()
    assert lazy.cache.data_path.read_bytes() == pushed.squash.read_bytes()
    lazy.close()
    source.close()


@pytest.mark.podman
@pytest.mark.slow
def test_record_push_and_pull_lazy_prefetch_the_start(
        request: pytest.FixtureRequest, data_image: str) -> None:
    from support.podman import PODMAN

    new_site: Any = request.getfixturevalue("make_site")
    servers: dict[str, Any] = request.getfixturevalue("registries")
    origin = new_site("origin")
    iid = _migrated_id(origin, data_image)
    squash = origin.store.resolve(iid).squash
    consumer = origin.mig.consumer
    podman_env = {k: consumer.env[k] for k in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF",
                                               "CONTAINERS_REGISTRIES_CONF", "TMPDIR")}
    origin.authfile.write_text('{"auths": {}}')  # podman run insists on it when named
    # An image in use is not recorded (its mount has a warm cache): one line.
    mounted = origin.store.resolve(iid).diff
    origin.cli("mount", data_image, tls=False)
    with (mounted / "hello").open("rb"):
        busy = origin.cli("record", data_image, "--", "true", tls=False, check=False)
    assert busy.returncode == 1 and "is in use" in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1, busy.stderr
    # A failing command records nothing.
    failed = origin.cli("record", data_image, "--", "false", tls=False, check=False)
    assert failed.returncode == 1 and "nothing recorded" in failed.stderr
    assert not prefetch.store_path(squash).exists()
    out = origin.cli("record", "--format", "json", data_image, "--", PODMAN, "run", "--rm",
                     "--pull=never", data_image, "cat", "/hello", tls=False, env=podman_env)
    recorded = json.loads(out.stdout)
    listed = prefetch.load(squash)
    assert listed is not None and recorded["bytes"] == listed.total > 0
    assert listed.digest == digest_of(squash.read_bytes())
    assert "cat /hello" in listed.command
    assert listed.total < squash.stat().st_size / 2  # not /data.bin
    # --add merges another recording into the list (here one that reads nothing more).
    origin.cli("record", "--add", data_image, "--", "true", tls=False)
    merged = prefetch.load(squash)
    assert merged is not None and merged.command == f"{listed.command}; true"
    assert all(any(m.start <= o.start and o.end <= m.end for m in merged.spans)
               for o in listed.spans)
    listed = merged
    server = servers["token"]
    ref = f"{server.host}/lazy/prefetch:1"
    origin.cli("push", "--creds", CREDS, data_image, ref)

    node: Site = new_site("node")
    node.cli("login", "-u", CREDS.split(":")[0], "-p", CREDS.split(":", 1)[1], server.host)
    before = server.served(listed.digest)
    t = time.perf_counter()
    node.cli("pull", "--lazy", ref)
    pulled_in = time.perf_counter() - t
    pulled = server.served(listed.digest)
    image = node.store.resolve(iid)
    assert lazy_paths.is_lazy(image.squash)
    assert prefetch.load(image.squash) == listed  # kept: a push from here sends it on
    status = lazy_image.status(image.squash)
    assert status is not None and status.present >= listed.total
    hello = node.mig.consumer.text("run", "--rm", "--pull=never", ref, "cat", "/hello")
    assert hello.strip() == "lazy-hello"
    ran = server.served(listed.digest)
    print(f"\nprefetch: recorded {listed.total} B in {len(listed.spans)} ranges "
          f"({100 * listed.total / image.squash.stat().st_size:.1f} %); pull --lazy "
          f"{pulled_in:.2f} s: {pulled[0] - before[0]} requests, {pulled[1] - before[1]} B; "
          f"podman run afterwards: {ran[0] - pulled[0]} requests, {ran[1] - pulled[1]} B")
    # Metadata (2 requests) and the list in few requests; the start then fetches (almost)
    # nothing: a different kernel readahead may touch a chunk the recording did not.
    assert pulled[0] - before[0] <= 2 + len(listed.spans) + 4  # metadata, list in pieces
    assert ran[0] - pulled[0] <= 1
    assert ran[1] - pulled[1] <= 256 << 10
    # pull --background completes it in a detached process; pull returns at once.
    done = json.loads(node.cli("pull", "--background", "--format", "json", ref).stdout)
    assert done["background"] is not None and done["downloaded"] == 0
    deadline = time.monotonic() + 120
    while lazy_paths.is_lazy(image.squash) and time.monotonic() < deadline:
        time.sleep(0.2)
    log = Path(done["background"]["log"]).read_text()
    assert not lazy_paths.is_lazy(image.squash), log
    assert "complete" in log
    assert image.squash.read_bytes() == squash.read_bytes()
    again = json.loads(node.cli("pull", "--background", "--format", "json", ref).stdout)
    assert again["background"] is None  # nothing left to complete


# ---------------------------------------------------------------------------------------
# Node-local caches: a shared store keeps the marker; each host its own fetched bytes.


def test_node_local_caches_leave_the_shared_store_alone(
        pushed: Pushed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from squashstore import config, host

    store, squash = publish_lazy(tmp_path / "store", pushed)
    shared_map = lazy_paths.map_path(squash).read_bytes()
    shared_bytes = digest_of(squash.read_bytes())
    root = pushed.squash.parent / "rootfs"
    mounts: list[Path] = []
    try:
        served = pushed.served()
        for host_name in ("node-a", "node-b"):
            conf = tmp_path / f"{host_name}.toml"
            conf.write_text(f'[lazy]\ncache_dir = "{tmp_path}/{host_name}/$LAZY_USER/cache"\n')
            monkeypatch.setenv("SQUASHSTORE_CONFIG", str(conf))
            monkeypatch.setenv("LAZY_USER", "u1")
            mnt = tmp_path / f"mnt-{host_name}"
            mnt.mkdir()
            daemon.start(squash, mnt, ("--log-file", str(tmp_path / f"{host_name}.log")))
            mounts.append(mnt)
            assert sorted(p.name for p in mnt.rglob("*")) == \
                sorted(p.name for p in root.rglob("*"))
        # Each node's cache was seeded from the store's (metadata): nothing fetched.
        assert pushed.served() == served
        caches = [tmp_path / h / "u1" / "cache" for h in ("node-a", "node-b")]
        for cache_dir in caches:
            assert (cache_dir / f"{pushed.digest[7:]}.map").is_file()
            assert cache_dir.stat().st_mode & 0o077 == 0
        a, b = mounts
        assert (a / "dir1/medium1.bin").read_bytes() == (root / "dir1/medium1.bin").read_bytes()
        after_a = pushed.served()
        assert after_a[1] > served[1]
        assert (b / "dir1/medium1.bin").read_bytes() == (root / "dir1/medium1.bin").read_bytes()
        after_b = pushed.served()
        assert after_b[1] > after_a[1]  # node b's cache is its own: fetched again
        assert (a / "dir1/medium1.bin").read_bytes() == (root / "dir1/medium1.bin").read_bytes()
        assert pushed.served() == after_b  # node a's is kept
        # The store was only read.
        assert lazy_paths.map_path(squash).read_bytes() == shared_map
        assert digest_of(squash.read_bytes()) == shared_bytes
        status = lazy_image.status(squash)
        assert status is not None
        with RangeCache.in_directory(caches[0], pushed.digest, pushed.size) as node:
            assert node.present_bytes() > status.present
    finally:
        for mnt in mounts:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    # A cache directory others could write to is refused (it would feed a mount bytes).
    caches[0].chmod(0o777)
    monkeypatch.setenv("SQUASHSTORE_CONFIG", str(tmp_path / "node-a.toml"))
    with pytest.raises(CacheError, match="writable only by it"):
        lazy_image.open_lazy(squash, None, config.load().lazy.cache_path())
    caches[0].chmod(0o700)
    (tmp_path / "rel.toml").write_text('[lazy]\ncache_dir = "relative/dir"\n')
    monkeypatch.setenv("SQUASHSTORE_CONFIG", str(tmp_path / "rel.toml"))
    with pytest.raises(config.ConfigError, match="absolute"):
        config.load().lazy.cache_path()
    # cleanup keeps a node's cache while the store's image is lazy, and while a process has
    # it open; once the image is complete in the store, the cache goes.
    from test_store import cli

    env = {**os.environ, "SQUASHSTORE_CONFIG": str(tmp_path / "node-a.toml"),
           "LAZY_USER": "u1", "SQUASHSTORE_RUNTIME_DIR": str(tmp_path / "run")}
    files = sorted(caches[0].iterdir())
    for path in files:
        os.utime(path, (time.time() - 60, time.time() - 60))
    deadline = time.monotonic() + 60  # the servers unmounted lazily: until they closed it
    while host.open_files_under(str(caches[0])):
        assert time.monotonic() < deadline, "a lazily unmounted server keeps its cache open"
        time.sleep(0.1)
    out = cli(store.root, "cleanup", "--grace", "0", env=env)
    assert "lazy cache" not in out.stdout and sorted(caches[0].iterdir()) == files
    assert lazy_image.complete(squash, lazy_remote.open_source)
    with files[0].open("rb"):
        out = cli(store.root, "cleanup", "--grace", "0", env=env)
        assert "lazy cache" not in out.stdout  # open: a server may still read it
    out = cli(store.root, "cleanup", "--grace", "0", "--dry-run", env=env)
    assert f"would remove lazy cache {caches[0] / files[0].name}" in out.stdout
    out = cli(store.root, "cleanup", "--grace", "0", env=env)
    assert f"removed lazy cache {caches[0] / files[0].name}" in out.stdout
    assert list(caches[0].iterdir()) == []


def test_concurrent_first_range_requests_share_one_token(request: pytest.FixtureRequest,
                                                          tmp_path: Path) -> None:
    """The FUSE server's first reads go out together on a fresh client: the registry
    client answers their 401s under its lock, so one token serves them all (lazy/remote.py
    no longer sends a first request alone)."""
    import urllib.parse

    from squashstore.registry.client import Client, RegistryOptions
    from support.registry import RegistryServer, TokenIssuer

    certs = request.getfixturevalue("pki")
    issuer = TokenIssuer(certs)
    server = RegistryServer(tmp_path / "token", certs, "token", issuer)
    try:
        blob = blob_bytes(1_600_000)
        digest = digest_of(blob)
        options = RegistryOptions(cert_dir=certs.certs, creds=CREDS)
        with Client(server.host, options) as pusher:
            pusher.upload_bytes("lazy/tok", blob, digest)
        remote = lazy_image.Remote(server.host, "lazy/tok", digest, len(blob))
        spans = [Span(i * 200_000, (i + 1) * 200_000) for i in range(8)]
        for _ in range(3):  # a race: a few fresh clients
            issuer.requests.clear()
            with Client(server.host, options) as client:
                source = lazy_remote.client_source(client, remote)
                try:
                    assert b"".join(source.fetch_many(spans)) == blob
                finally:
                    source.close()
            scopes = [urllib.parse.parse_qs(urllib.parse.urlsplit(r).query).get("scope")
                      for r in issuer.requests]
            assert scopes == [["repository:lazy/tok:pull"]], scopes
    finally:
        server.close()
        issuer.close()


def test_a_damaged_marker_is_one_error_whatever_its_shape(tmp_path: Path) -> None:
    squash = tmp_path / "meta" / "squash" / ("ef" * 32 + ".sqfs")
    squash.parent.mkdir(parents=True)
    lazy_paths.lazy_dir(squash).mkdir()
    good = {"registry": "h", "repository": "r", "digest": "sha256:" + "0" * 64}
    for text in ("{", "[]", '{"registry": 1}', "[" * 100_000 + "]" * 100_000,
                 json.dumps({**good, "size": 10**30}), json.dumps({**good, "size": -1}),
                 "x" * (2 << 20)):
        lazy_paths.marker_path(squash).write_text(text)
        with pytest.raises(lazy_image.LazyError, match="damaged lazy-image marker"):
            lazy_image.read_marker(squash)
    # A marker that is a FIFO or a symlink is not read through (a FIFO blocked for ever).
    lazy_paths.marker_path(squash).unlink()
    os.mkfifo(lazy_paths.marker_path(squash))
    failed: list[BaseException] = []

    def read() -> None:
        try:
            lazy_image.read_marker(squash)
        except lazy_image.LazyError as exc:
            failed.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock it before failing
        with open(lazy_paths.marker_path(squash), "w"):
            pass
    assert not reader.is_alive() and "not a regular file" in str(failed[0])
    lazy_paths.marker_path(squash).unlink()
    (tmp_path / "elsewhere.json").write_text(json.dumps({**good, "size": 1}))
    lazy_paths.marker_path(squash).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(lazy_image.LazyError, match="damaged lazy-image marker"):
        lazy_image.read_marker(squash)
    lazy_paths.marker_path(squash).unlink()
    lazy_paths.marker_path(squash).write_text("{")
    # The leftover check takes a marker it cannot read for one nobody is staging.
    assert lazy_paths.leftovers(squash.parent.parent, set(), ".tmp", 60) == \
        [lazy_paths.marker_path(squash)]


# ---------------------------------------------------------------------------------------
# Per-chunk digests: every chunk a lazy image fetches is checked before it is cached.

from squashstore.lazy import chunkdigests  # noqa: E402
from squashstore.lazy.cache import ChunkMismatch  # noqa: E402

LAZY_CHUNK = chunkdigests.CHUNK
"""The lazy cache's chunk (this module's `CHUNK` is a small one for the cache tests)."""


@given(st.binary(max_size=5 * 4096 + 17), st.lists(st.integers(1, 5000), max_size=8))
def test_chunk_digests_hash_every_chunk_however_the_file_streams(
        blob: bytes, cuts: list[int]) -> None:
    chunk = 4096
    hasher = chunkdigests.Hasher(chunk)
    pos = 0
    for cut in cuts:  # the file arrives in pieces of any size
        hasher.update(blob[pos:pos + cut])
        pos += cut
    hasher.update(blob[pos:])
    listed = hasher.result()
    assert listed.digest == digest_of(blob) and listed.size == len(blob)
    pieces = [blob[i:i + chunk] for i in range(0, len(blob), chunk)]
    assert listed.table == b"".join(hashlib.sha256(p).digest() for p in pieces)
    assert all(listed.matches(i, p) for i, p in enumerate(pieces))
    encoded = listed.to_bytes()
    assert len(encoded) == chunkdigests.limit(len(blob), chunk)
    assert chunkdigests.parse(encoded, "x") == listed


def test_chunk_digest_lists_that_are_malformed_or_of_another_file_are_refused() -> None:
    blob = blob_bytes(3 * LAZY_CHUNK + 5)
    hasher = chunkdigests.Hasher()
    hasher.update(blob)
    listed = hasher.result()
    encoded = listed.to_bytes()
    for bad, message in ((encoded[:-1], "needs"), (encoded + b"\0" * 32, "needs"),
                         (b"SQSCHKD2" + encoded[8:], "not a chunk digest list"),
                         (encoded[:40], "too short")):
        with pytest.raises(SourceError, match=message):
            chunkdigests.parse(bad, "x")
    with pytest.raises(SourceError, match="another squash file"):
        chunkdigests.for_squash(listed, digest_of(b"other"), len(blob), "x")
    with pytest.raises(SourceError, match="another squash file"):
        chunkdigests.for_squash(listed, listed.digest, len(blob) + 1, "x")
    small = chunkdigests.Hasher(4096)
    small.update(blob)
    with pytest.raises(SourceError, match="4096-byte chunks"):
        chunkdigests.for_squash(small.result(), listed.digest, len(blob), "x")


def test_cache_stores_only_chunks_matching_their_digests(cache_dir: Path) -> None:
    blob = blob_bytes(4 * LAZY_CHUNK + 99)
    hasher = chunkdigests.Hasher()
    hasher.update(blob)
    wrong = bytearray(blob)
    wrong[2 * LAZY_CHUNK + 7] ^= 1
    with RangeCache.in_directory(cache_dir, digest_of(blob), len(blob),
                                 digests=hasher.result()) as cache:
        with pytest.raises(ChunkMismatch, match="1 chunk") as raised:
            cache.store([(Span(0, len(blob)), bytes(wrong))])
        assert raised.value.errno == errno.EIO
        # The other chunks are in; the wrong one is neither written nor marked.
        assert cache.missing(Span(0, len(blob))) == [Span(2 * LAZY_CHUNK, 3 * LAZY_CHUNK)]
        assert cache.read(Span(2 * LAZY_CHUNK, 3 * LAZY_CHUNK)) == bytes(LAZY_CHUNK)
        cache.store([(Span(2 * LAZY_CHUNK, 3 * LAZY_CHUNK), blob[2 * LAZY_CHUNK:3 * LAZY_CHUNK])])
        assert cache.complete() and cache.read(Span(0, len(blob))) == blob


@pytest.fixture
def tampered(pushed: Pushed) -> tuple[str, int]:
    """The pushed squash file with one byte flipped inside /dir3/big3.bin's data (stored
    uncompressed: random bytes), pushed as a blob of its own: what a lying registry or
    blob storage would serve for the real digest. Its digest and the flipped offset."""
    data = bytearray(pushed.squash.read_bytes())
    content = read_file(SquashReader(pushed.squash), "/dir3/big3.bin")
    offset = bytes(data).find(content[700_000:700_064])
    assert offset > 0
    data[offset] ^= 0xFF
    return pushed.registry.push_blob(REPO, bytes(data)), offset


def test_a_chunk_served_wrong_fails_its_read_and_is_not_cached(
        pushed: Pushed, tampered: tuple[str, int], tmp_path: Path) -> None:
    bad_digest, offset = tampered
    digests = chunkdigests.compute(pushed.squash)
    local = SquashReader(pushed.squash)
    session = requests.Session()
    session.verify = str(pushed.ca)
    session.trust_env = False
    (tmp_path / "cache").mkdir(mode=0o700)
    liar = RangeSource(session_get(session, pushed.registry.blob_url(REPO, bad_digest)),
                       pushed.size, "liar", backoff=0.05)
    cache = RangeCache.in_directory(tmp_path / "cache", pushed.digest, pushed.size,
                                    digests=digests)
    lazy = LazyFile(cache, liar)
    reader = lazy_reader(lazy)  # the metadata chunks are the right ones
    assert read_file(reader, "/dir1/small3.txt") == read_file(local, "/dir1/small3.txt")
    assert read_file(reader, "/dir0/big0.bin") == read_file(local, "/dir0/big0.bin")
    with pytest.raises(SquashfsError) as raised:  # without the digests: wrong bytes
        read_file(reader, "/dir3/big3.bin")
    assert "wrong digest" in str(raised.value)
    index = offset // LAZY_CHUNK
    assert cache.missing(Span(index * LAZY_CHUNK, (index + 1) * LAZY_CHUNK))  # its bit not set
    on_disk = cache.data_path.read_bytes()[index * LAZY_CHUNK:(index + 1) * LAZY_CHUNK]
    assert on_disk in (bytes(len(on_disk)),
                       pushed.squash.read_bytes()[index * LAZY_CHUNK:(index + 1) * LAZY_CHUNK])
    # The mount stays alive: the right source (the registry fixed) serves it later.
    honest = RangeSource(session_get(session, pushed.registry.blob_url(REPO, pushed.digest)),
                         pushed.size, "honest", backoff=0.05)
    lazy.source = honest
    assert read_file(reader, "/dir3/big3.bin") == read_file(local, "/dir3/big3.bin")
    assert not cache.missing(Span(index * LAZY_CHUNK, (index + 1) * LAZY_CHUNK))
    reader.close()
    lazy.close()
    liar.close()
    honest.close()


@pytest.mark.podman
@pytest.mark.slow
def test_pull_lazy_refuses_bad_chunk_digests_and_pulls_artifacts_without(
        request: pytest.FixtureRequest, data_image: str) -> None:
    from squashstore.blobs import digest_bytes
    from squashstore.registry import artifact
    from squashstore.registry.client import Client, RegistryOptions

    new_site: Any = request.getfixturevalue("make_site")
    servers: dict[str, Any] = request.getfixturevalue("registries")
    origin = new_site("origin")
    iid = _migrated_id(origin, data_image)
    server = servers["token"]
    repo = "lazy/chunks"
    origin.cli("push", "--creds", CREDS, data_image, f"{server.host}/{repo}:1")
    squash = origin.store.resolve(iid).squash
    plan = artifact.plan_push(origin.store, origin.store.resolve(iid))
    manifest = json.loads(plan.manifest)
    listed = [layer for layer in manifest["layers"]
              if layer["mediaType"] == artifact.CHUNK_DIGESTS_TYPE]
    assert listed == [{"mediaType": artifact.CHUNK_DIGESTS_TYPE,
                       "digest": digest_bytes(plan.chunk_digests),
                       "size": chunkdigests.limit(squash.stat().st_size),
                       "annotations": listed[0]["annotations"]}]
    assert chunkdigests.parse(plan.chunk_digests, "x") == chunkdigests.compute(squash)
    others = [layer for layer in manifest["layers"]
              if layer["mediaType"] != artifact.CHUNK_DIGESTS_TYPE]
    wrong = bytearray(squash.read_bytes())
    wrong[len(wrong) // 2] ^= 1
    hasher = chunkdigests.Hasher()
    hasher.update(bytes(wrong))
    variants = {"other": hasher.result().to_bytes(),  # of another file of the same size
                "short": plan.chunk_digests[:-32],
                "long": plan.chunk_digests + bytes(32),
                "garbage": b"\x00" * len(plan.chunk_digests)}
    with Client(server.host, RegistryOptions(cert_dir=origin.certs, creds=CREDS)) as client:
        for tag, blob in variants.items():
            client.upload_bytes(repo, blob, digest_bytes(blob))
            layer = {**listed[0], "digest": digest_bytes(blob), "size": len(blob)}
            client.put_manifest(repo, tag, json.dumps({**manifest, "layers": [*others, layer]}
                                                      ).encode(), oci_manifest_type)
        client.put_manifest(repo, "old", json.dumps({**manifest, "layers": others}).encode(),
                            oci_manifest_type)
        # A squash file claimed to be 2**50 bytes with a chunk list to match (never served):
        # pull --lazy allocated a 2 GiB chunk map and would read a 2**36-byte list.
        huge = 1 << 50
        claimed = [{**layer, "size": huge} if layer["mediaType"] == artifact.SQUASHFS_TYPE
                   else layer for layer in others]
        client.put_manifest(repo, "huge", json.dumps({**manifest, "layers": [
            *claimed, {**listed[0], "size": chunkdigests.limit(huge)}]}).encode(),
            oci_manifest_type)

    node: Site = new_site("node")
    node.cli("login", "-u", CREDS.split(":")[0], "-p", CREDS.split(":", 1)[1], server.host)
    for tag, reason in (("other", "of another squash file"), ("short", "needs"),
                        ("long", "more than"), ("garbage", "not a chunk digest list"),
                        ("huge", "lazy pulls take at most")):
        out = node.cli("pull", "--lazy", f"{server.host}/{repo}:{tag}", check=False)
        assert out.returncode != 0 and reason in out.stderr, (tag, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("squashstore: "), out.stderr
        assert not node.store.images()  # nothing installed
    # An artifact pushed before chunk digests existed still pulls lazily (unverified
    # chunks until complete, as before) and runs.
    node.cli("pull", "--lazy", f"{server.host}/{repo}:old")
    image = node.store.resolve(iid)
    assert lazy_paths.is_lazy(image.squash)
    assert not lazy_paths.chunks_path(image.squash).exists()
    hello = node.mig.consumer.text("run", "--rm", "--pull=never", iid, "cat", "/hello")
    assert hello.strip() == "lazy-hello"


oci_manifest_type = "application/vnd.oci.image.manifest.v1+json"


def test_cleanup_removes_chunk_digests_with_their_marker(tmp_path: Path) -> None:
    meta = tmp_path / "meta"
    live, done, gone = ("a1" * 32, "b2" * 32, "c3" * 32)
    (meta / "squash").mkdir(parents=True)
    lazy_paths.lazy_dir(meta / "squash" / "x.sqfs").mkdir()
    for layer in (live, done, gone):
        squash = meta / "squash" / f"{layer}.sqfs"
        for path in lazy_paths.lazy_files(squash):
            path.write_text("{}")
    lazy_paths.marker_path(meta / "squash" / f"{done}.sqfs").unlink()  # completed
    found = lazy_paths.leftovers(meta, {live, done}, ".tmp", 60)
    squash = {layer: meta / "squash" / f"{layer}.sqfs" for layer in (live, done, gone)}
    assert sorted(found) == sorted([
        lazy_paths.map_path(squash[done]), lazy_paths.chunks_path(squash[done]),
        *lazy_paths.lazy_files(squash[gone])])


def test_a_node_cache_skips_a_store_chunk_that_fails_its_digest(tmp_path: Path) -> None:
    blob = blob_bytes(5 * LAZY_CHUNK + 11)
    squash = tmp_path / "meta" / "squash" / ("d4" * 32 + ".sqfs")
    squash.parent.mkdir(parents=True)
    remote = lazy_image.Remote("127.0.0.1:1", "r", digest_of(blob), len(blob))
    lazy_image.write_marker(squash, remote)
    chunkdigests.save(squash, chunkdigests.compute_bytes(blob))
    with lazy_image.open_cache(squash, remote) as shared:  # the store's cache: all present
        shared.store([(Span(0, len(blob)), blob)])
    with open(squash, "r+b") as f:  # then a byte of chunk 3 rots on disk
        f.seek(3 * LAZY_CHUNK + 5)
        f.write(b"\xff" if blob[3 * LAZY_CHUNK + 5] != 0xFF else b"\0")
    node = tmp_path / "node"
    with lazy_image.node_cache(node, squash, remote) as cache:
        assert cache.missing(Span(0, len(blob))) == \
            [Span(3 * LAZY_CHUNK, 4 * LAZY_CHUNK)]  # fetched anew from the registry
        assert cache.read(Span(0, 3 * LAZY_CHUNK)) == blob[:3 * LAZY_CHUNK]


def test_verify_rechecks_cached_chunks_and_reads_the_node_cache(pushed: Pushed,
                                                                 tmp_path: Path) -> None:
    """`verify` of an incomplete lazy image said ok however the chunks already cached had
    rotted (they have per-chunk digests), and neither it nor `images` looked at this node's
    ``[lazy] cache_dir``. Both caches are read (never written), their present chunks hashed
    again; a node cache another user owns is named and not counted."""
    from test_store import cli

    store, squash = publish_lazy(tmp_path / "store", pushed)
    chunkdigests.save(squash, chunkdigests.compute(pushed.squash))
    node = tmp_path / "node"
    conf = tmp_path / "conf.toml"
    conf.write_text(f'[lazy]\ncache_dir = "{node}"\n')
    env = {**os.environ, "SQUASHSTORE_CONFIG": str(conf)}
    remote = lazy_image.read_marker(squash)
    assert remote is not None
    listed = json.loads(cli(store.root, "images", "--format", "json", env=env).stdout)
    assert listed[0]["lazy_status"]["node_present"] is None  # nothing cached on this node
    with lazy_image.node_cache(node, squash, remote):  # seeded from the store's cache
        pass
    status = lazy_image.status(squash, check=True, node_dir=node)
    assert status is not None and status.node is not None and status.store is not None
    assert status.present > 0 and status.node.present == status.present
    assert status.store.bad == () == status.node.bad
    listed = json.loads(cli(store.root, "images", "--format", "json", env=env).stdout)
    assert listed[0]["lazy_status"]["node_present"] == status.present
    assert "ok: 1 image(s), 1 of them incomplete" in cli(store.root, "verify", env=env).stdout
    before = {p: p.read_bytes() for p in (squash, lazy_paths.map_path(squash),
                                           *node.iterdir())}
    # A byte of the first chunk rots in the store's cache, another in the node's.
    for data in (squash, status.node.data):
        with open(data, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 1]))
    out = cli(store.root, "verify", env=env, check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"its cache in the store {squash}: 1 chunk(s) fail" in out.stdout, out.stdout
    assert f"this node's cache {status.node.data}: 1 chunk(s) fail" in out.stdout
    after = {p: p.read_bytes() for p in before}
    assert [p for p in before if p not in (squash, status.node.data)
            and before[p] != after[p]] == []  # maps untouched: verify wrote nothing
    os.chown(node, 65534, 65534)  # another user's directory: not trusted, not counted
    out = cli(store.root, "verify", env=env, check=False)
    assert f"this node's cache is not used: {node}: cache directory must be owned" in \
        out.stdout, out.stdout
    listed = json.loads(cli(store.root, "images", "--format", "json", env=env).stdout)
    assert listed[0]["lazy_status"]["node_present"] is None


# ---------------------------------------------------------------------------------------
# A registry that serves ranges slowly or too generously (session 4's adversarial pass).

import contextlib  # noqa: E402
import http.server  # noqa: E402
import threading  # noqa: E402

from squashstore.registry.options import Deadline, RegistryOptions  # noqa: E402


class _RangeServer(LocalHTTP):
    """A plain-HTTP 'registry' on 127.0.0.1 answering ``GET /v2/`` and, for a blob, a 206
    with the right Content-Range whose body `behaviour` spoils: ``drip`` sends a byte every
    0.2 s (for at most 15 s, then closes: never long enough to stall), ``flood`` sends
    endless bytes (no Content-Length); ``whole`` ignores Range: 200 and the whole blob."""

    def __init__(self, behaviour: str, size: int) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if not self.path.startswith("/v2/r/blobs/"):
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                outer.requests += 1
                if behaviour == "whole":
                    self.send_response(200)
                    self.send_header("Content-Length", str(size))
                    self.end_headers()
                    with contextlib.suppress(OSError):
                        for _ in range(size >> 20):
                            self.wfile.write(bytes(1 << 20))
                    return
                first, last = map(int, self.headers["Range"].removeprefix("bytes=").split("-"))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                if behaviour == "drip":
                    self.send_header("Content-Length", str(last - first + 1))
                self.end_headers()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    if behaviour == "drip":
                        for _ in range(75):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.2)
                        return
                    for _ in range(1 << 16):  # 4 GiB at most
                        self.wfile.write(b"y" * 65536)

            def log_message(self, *args: object) -> None:
                pass

        self.requests = 0
        super().__init__(Handler)


@pytest.mark.parametrize("behaviour", ["drip", "flood"])
def test_a_range_dripped_or_flooded_fails_in_bounded_time(behaviour: str) -> None:
    """A FUSE read's range from a registry that drips a byte at a time never stalled, so
    it held the read (and its process) as long as the registry liked; a 206 whose body does
    not end was read whole into memory. Now a range has a time budget and is read to one
    byte past its size."""
    size = 1 << 20
    server = _RangeServer(behaviour, size)
    try:
        remote = lazy_image.Remote(server.host, "r", "sha256:" + "ab" * 32, size,
                                   tls_verify=False)
        source = lazy_remote.open_source(remote)
        source.budget = 2.0
        started = time.monotonic()
        with pytest.raises(FetchError) as info:
            source.fetch(Span(0, 65536))
        elapsed = time.monotonic() - started
        source.close()
        message = "too slow" if behaviour == "drip" else "sent more than the 65536 bytes"
        assert message in str(info.value) and elapsed < 6, (str(info.value), elapsed)
    finally:
        server.close()


def test_completing_a_lazy_image_keeps_the_commands_timeout() -> None:
    """`pull` completing a lazy image opened its registry source without the command's
    `--timeout` (and the range bodies were read without it): a dripping registry kept it
    going. The command's deadline ends it with one line."""
    size = 1 << 20
    server = _RangeServer("drip", size)
    try:
        remote = lazy_image.Remote(server.host, "r", "sha256:" + "ab" * 32, size,
                                   tls_verify=False)
        source = lazy_remote.open_source(remote, RegistryOptions(deadline=Deadline.after(2)))
        assert source.budget is None  # a whole download: no per-range budget
        started = time.monotonic()
        with pytest.raises(FetchError) as info:
            source.fetch(Span(0, 65536))
        elapsed = time.monotonic() - started
        source.close()
        assert elapsed < 6, (str(info.value), elapsed)
        assert "\n" not in str(info.value)
    finally:
        server.close()


def test_a_planted_node_cache_directory_is_refused_and_never_aims_removals(
        tmp_path: Path) -> None:
    """As root, `[lazy] cache_dir` in a shared place (/tmp) that another user made a symlink
    to a directory of root's: the FUSE server stat()ed through it (ours, 0755: accepted)
    and `cleanup` listed the target and removed its old ``*.data``/``*.map`` files. The
    directory must be a real one of ours with no other user able to swap a parent; cleanup
    removes only regular files of ours named after a digest."""
    from test_store import cli

    victim = tmp_path / "victim"
    victim.mkdir()
    precious = [victim / ("ab" * 32 + ".data"), victim / ("ab" * 32 + ".map")]
    for path in precious:
        path.write_text("root's")
        os.utime(path, (1, 1))
    planted = tmp_path / "planted"
    planted.symlink_to(victim)
    theirs = tmp_path / "theirs"
    (theirs / "cache").mkdir(parents=True, mode=0o700)
    os.chown(theirs, 65534, 65534)
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    blob = blob_bytes(3 * LAZY_CHUNK)
    squash = tmp_path / "meta" / "squash" / ("d4" * 32 + ".sqfs")
    squash.parent.mkdir(parents=True)
    remote = lazy_image.Remote("127.0.0.1:1", "r", digest_of(blob), len(blob))
    lazy_image.write_marker(squash, remote)
    for directory, message in ((planted, "a symlink"), (other, "must be owned by uid 0"),
                               (theirs / "cache", "can be changed by another user")):
        with pytest.raises(CacheError, match=message):
            lazy_image.node_cache(directory, squash, remote)
        conf = tmp_path / "conf.toml"
        conf.write_text(f'[lazy]\ncache_dir = "{directory}"\n')
        env = {**os.environ, "SQUASHSTORE_CONFIG": str(conf),
               "SQUASHSTORE_RUNTIME_DIR": str(tmp_path / "run")}
        out = cli(tmp_path / "store", "cleanup", "--grace", "0", env=env, check=False)
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
        assert message in out.stderr and "not cleaned" in out.stderr
    assert [p.read_text() for p in precious] == ["root's", "root's"]
    # In a good directory, only our regular files named after a digest go.
    good = tmp_path / "good"
    good.mkdir(mode=0o700)
    (good / ("cd" * 32 + ".data")).symlink_to(precious[0])
    (good / ("ef" * 32 + ".data")).write_text("x")
    os.chown(good / ("ef" * 32 + ".data"), 65534, 65534)
    (good / "notes.data").write_text("x")
    mine = [good / ("12" * 32 + ".data"), good / ("12" * 32 + ".map")]
    for path in [*mine, good / "notes.data"]:
        path.write_text("x")
    for path in good.iterdir():
        os.utime(path, (1, 1), follow_symlinks=False)
    assert lazy_image.stale_node_caches(good, set(), set(), 60, time.time()) == mine


def test_verify_of_a_damaged_lazy_map_reports_it_and_writes_nothing(pushed: Pushed,
                                                                    tmp_path: Path) -> None:
    """`verify` opened a lazy image's cache read-write: a map one byte short (a crash, a
    full disk) was taken for a half-made one and reset, forgetting every chunk the store
    had, and verify said ok. It is read only now: the map is named, nothing is written."""
    from test_store import cli

    store, squash = publish_lazy(tmp_path / "store", pushed)
    map_ = lazy_paths.map_path(squash)
    damaged = map_.read_bytes()[:-1]
    map_.write_bytes(damaged)
    out = cli(store.root, "verify", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"{map_}: not a whole chunk map" in out.stdout, out.stdout
    assert map_.read_bytes() == damaged
    listed = json.loads(cli(store.root, "images", "--format", "json").stdout)
    assert listed[0]["lazy_status"]["present"] == 0  # nothing counts from a damaged map
    assert map_.read_bytes() == damaged


def test_a_registry_ignoring_range_serves_near_ranges_and_refuses_far_ones() -> None:
    """A registry (or its blob storage) that answers every range with the whole blob was
    read up to each range and the rest dropped: completing a big image so downloads it
    once per range. The first `SKIP_MAX` bytes are still served that way; beyond, one line
    says to pull it without --lazy."""
    from squashstore.lazy.source import SKIP_MAX

    size = SKIP_MAX + (2 << 20)
    server = _RangeServer("whole", size)
    try:
        remote = lazy_image.Remote(server.host, "r", "sha256:" + "ab" * 32, size,
                                   tls_verify=False)
        source = lazy_remote.open_source(remote, RegistryOptions())
        assert source.fetch(Span(1 << 20, (1 << 20) + 100)) == bytes(100)
        with pytest.raises(FetchError, match="ignores Range requests"):
            source.fetch(Span(SKIP_MAX + (1 << 20), SKIP_MAX + (1 << 20) + 100))
        source.close()
        assert server.requests == 2
    finally:
        server.close()


def test_a_full_disk_fails_the_store_and_marks_nothing_unwritten(tmp_path: Path) -> None:
    """A cache on a file system that fills up (a real 256 KiB tmpfs): the store fails with
    ENOSPC and no chunk whose bytes did not reach the disk is marked present; what was
    written before reads back; the cache stays usable."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        blob = blob_bytes(16 * LAZY_CHUNK)
        with RangeCache.in_directory(mnt, digest_of(blob), len(blob)) as cache:
            cache.store([(Span(0, 2 * LAZY_CHUNK), blob[:2 * LAZY_CHUNK])])
            with pytest.raises(OSError) as info:
                cache.store([(Span(2 * LAZY_CHUNK, len(blob)), blob[2 * LAZY_CHUNK:])])
            assert info.value.errno == errno.ENOSPC
            assert cache.missing(Span(0, len(blob))) == [Span(2 * LAZY_CHUNK, len(blob))]
            assert cache.read(Span(0, 2 * LAZY_CHUNK)) == blob[:2 * LAZY_CHUNK]
        with RangeCache.in_directory(mnt, digest_of(blob), len(blob)) as again:
            assert again.present_bytes() == 2 * LAZY_CHUNK
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_lazy_image_imports_no_http_client() -> None:
    """Every FUSE server imports `lazy.image` to ask whether its image is lazy; through
    `lazy.source` that imported requests and urllib3 (~260 M instructions, ~45 ms per mount
    of an ordinary image, measured by helper start). They come with the first fetch now."""
    probe = ("import sys, squashstore.lazy.image, squashstore.lazy.lazyfile; "
             "print(sorted({'requests', 'urllib3'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
