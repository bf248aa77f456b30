"""Lazily pulled images in a store: where their bytes, map and registry location live.

A lazy image is an ordinary store image (records, config, manifest, layer directory, and
the squash file at the store's squash-file place) whose squash file is still sparse: the
`RangeCache` data file IS the store's squash file, so the image never moves when it
completes and no mount of it goes stale. Beside the store's ``squash/`` directory,
``lazy/<layer>.json`` (the marker: which registry, repository, digest and size the squash
file comes from) and ``lazy/<layer>.map`` (the cache's chunk map) say it is lazy;
``lazy/<layer>.chunks``, when the artifact had one, lists each chunk's digest (every chunk
fetched is checked against it before it is cached, `squashstore.lazy.chunkdigests`). This
module owns those paths, reading and writing the marker, opening the squash file as a
`LazyFile` for the FUSE server, staging a new lazy squash file for `pull --lazy` (the
superblock and every metadata table fetched up front), completing an image (everything
fetched, the digest checked, then the marker and the map removed: from then on an ordinary
image), and the leftovers `cleanup` removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from squashstore import trust
from squashstore.image import SquashstoreError
from squashstore.lazy.cache import ChunkMismatch, RangeCache
from squashstore.lazy.lazyfile import LazyFile
from squashstore.lazy.paths import (
    LAZY_DIR,
    MARKER_LIMIT,
    WRITER,
    chunks_path,
    lazy_dir,
    lazy_files,
    map_path,
    marker_path,
)
from squashstore.lazy.ranges import Span
from squashstore.lazy.source import FetchError, RangeSource

if TYPE_CHECKING:
    from squashstore.lazy.chunkdigests import ChunkDigests

SourceOpener = Callable[["Remote"], RangeSource]
"""Opens the registry side of a lazy image (auth, TLS and redirects as the registry
client does them)."""


class LazyError(SquashstoreError):
    """A lazy image's marker is damaged, or its completed bytes do not match the digest."""


MAX_SIZE = 1 << 40
"""Largest squash file pulled lazily (1 TiB: a 2 MiB chunk map, a 512 MiB chunk digest
list): a manifest claiming more would make `pull --lazy` and every FUSE server of the image
allocate maps and lists in proportion to the claim, not to anything real."""


def check_size(size: int, what: str) -> None:
    """`LazyError` unless `size` is one a lazy pull takes (0 to `MAX_SIZE` bytes)."""
    if not 0 <= size <= MAX_SIZE:
        raise LazyError(f"{what}: a squash file of {size} bytes: lazy pulls take at most "
                        f"{MAX_SIZE} (pull it without --lazy)")


@dataclass(frozen=True)
class Remote:
    """Where a lazy image's squash file lives: blob `digest` of `size` bytes in
    `repository` at `registry` (``HOST[:PORT]``); `reference` is what was pulled."""

    registry: str
    repository: str
    digest: str
    size: int
    reference: str = ""
    tls_verify: bool | None = None
    cert_dir: str | None = None
    authfile: str | None = None
    """TLS and credentials as at the pull (never the credentials themselves: the FUSE
    server finds them where podman keeps them, as `squashstore login` leaves them)."""

    def describe(self) -> str:
        return f"{self.registry}/{self.repository}@{self.digest}"


def read_marker(squash: Path) -> Remote | None:
    """The registry location of a lazy squash file, None when it is an ordinary one."""
    path = marker_path(squash)
    try:
        raw = trust.read_regular(path, MARKER_LIMIT)
        if raw is None:
            return None
        data = json.loads(raw)
        remote = Remote(registry=str(data["registry"]), repository=str(data["repository"]),
                        digest=str(data["digest"]), size=int(data["size"]),
                        reference=str(data.get("reference", "")),
                        tls_verify=data.get("tls_verify"),
                        cert_dir=_optional_str(data.get("cert_dir")),
                        authfile=_optional_str(data.get("authfile")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise LazyError(f"{path}: damaged lazy-image marker "
                        f"({type(exc).__name__ if isinstance(exc, RecursionError) else exc})"
                        ) from None
    if remote.tls_verify not in (None, True, False):
        raise LazyError(f"{path}: damaged lazy-image marker (tls_verify)")
    if not 0 <= remote.size <= MAX_SIZE:
        raise LazyError(f"{path}: damaged lazy-image marker (size {remote.size})")
    return remote


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def write_marker(squash: Path, remote: Remote) -> None:
    """Record `remote` for `squash`, with this process as its writer: the store's leftover
    cleanup keeps the marker of a layer not yet published while its writer lives."""
    from squashstore import host
    from squashstore.store import atomic_write

    directory = lazy_dir(squash)
    directory.mkdir(mode=0o755, exist_ok=True)
    record = {**asdict(remote), WRITER: host.me().tag()}
    atomic_write(marker_path(squash), json.dumps(record, sort_keys=True).encode())


def chunk_digests(squash: Path, remote: Remote) -> ChunkDigests | None:
    """The per-chunk digests kept beside the marker (None: an artifact pushed without
    them, whose chunks stay unverified until the image completes); `LazyError` when they
    are damaged or of another file."""
    from squashstore.lazy import chunkdigests

    try:
        return chunkdigests.load(squash, remote.digest, remote.size)
    except SquashstoreError as exc:
        raise LazyError(str(exc)) from None


def open_cache(squash: Path, remote: Remote, data: Path | None = None) -> RangeCache:
    """The cache of a lazy image; its bytes at `data` (a staged file) or the squash file;
    every chunk stored checked against the image's chunk digests when it has them."""
    return RangeCache(data or squash, map_path(squash), remote.digest, remote.size,
                      digests=chunk_digests(squash, remote))


SEED_PIECE = 4 << 20
"""Bytes copied at a time from a store's cache into a node-local one."""


def node_cache(directory: Path, squash: Path, remote: Remote) -> RangeCache:
    """The cache of a lazy image in a node-local `directory` (``<digest hex>.data`` and
    ``.map``, created owned by us and writable only by us), first given what the store's own
    cache holds that it lacks (the metadata and prefetch list `pull --lazy` fetched there):
    the store is only read."""
    from squashstore.lazy.cache import check_directory, read_bitmap

    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise LazyError(f"{directory}: cannot create the lazy cache directory: "
                        f"{exc.strerror}") from None
    check_directory(directory)
    cache = RangeCache.in_directory(directory, remote.digest, remote.size,
                                    digests=chunk_digests(squash, remote))
    try:
        shared = read_bitmap(map_path(squash), remote.digest, remote.size, cache.chunk)
        if shared is not None:
            _seed(cache, squash, shared)
    except BaseException:
        cache.close()
        raise
    return cache


def _seed(cache: RangeCache, squash: Path, shared: bytes) -> None:
    from squashstore.lazy import ranges

    present = ranges.missing_runs(bytes(b ^ 0xFF for b in shared), range(cache.chunks))
    wanted = [m for span in ranges.runs_to_spans(present, cache.chunk, cache.size)
              for m in cache.missing(span)]
    if not wanted:
        return
    fd = os.open(squash, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        for span in ranges.split(wanted, SEED_PIECE, cache.chunk):
            data = os.pread(fd, len(span), span.start)
            if len(data) == len(span):
                # A chunk of the store's that fails its digest is left out: fetched anew.
                with contextlib.suppress(ChunkMismatch):
                    cache.store([(span, data)])
    finally:
        os.close(fd)


def lazy_digests(meta: Path) -> set[str]:
    """The blob digests of the lazy images of the store whose metadata directory is `meta`
    (unreadable markers skipped)."""
    from squashstore.storelayout import SQUASH_DIR, SQUASH_SUFFIX  # cleanup's alone

    found: set[str] = set()
    directory = meta / LAZY_DIR
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return found
    for entry in entries:
        if entry.endswith(".json"):
            with contextlib.suppress(LazyError):
                squash = meta / SQUASH_DIR / f"{entry.removesuffix('.json')}{SQUASH_SUFFIX}"
                remote = read_marker(squash)
                if remote is not None:
                    found.add(remote.digest)
    return found


def stale_node_caches(directory: Path, keep: set[str], open_paths: set[str],
                      min_age: float, now: float) -> list[Path]:
    """The files of a node-local cache `directory` that `cleanup` removes: the ``.data`` and
    ``.map`` of blobs whose digest is not in `keep` (the lazy images of the stores cleaned),
    neither of them open by any process (`open_paths`: a FUSE server still serving from
    it), and untouched for `min_age` seconds (a server opening it right now). Only regular
    files of ours named ``<hex>.data``/``.map`` count (never a symlink, nor what it points
    to); `LazyError` when the directory itself is not a cache directory of ours
    (`cache.check_directory`: a symlink planted there must not aim the removals)."""
    from squashstore.lazy.cache import CacheError, check_directory, data_path

    try:
        check_directory(directory)
    except CacheError as exc:
        raise LazyError(f"{exc}; not cleaned") from None
    directory = Path(os.path.realpath(directory))  # as the open files name it
    keep_names = {data_path(directory, d).name for d in keep if ":" in d}
    found = []
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    me = os.geteuid()
    for entry in entries:
        stem, dot, suffix = entry.rpartition(".")
        if not dot or suffix != "data" or entry in keep_names or not stem or \
                stem.strip("0123456789abcdef"):
            continue
        pair = []
        for path in (directory / entry, directory / f"{stem}.map"):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            except OSError:
                break
            if not stat.S_ISREG(st.st_mode) or st.st_uid != me or \
                    now - st.st_mtime < min_age or str(path) in open_paths:
                break
            pair.append(path)
        else:
            found += pair
    return found


def open_lazy(squash: Path, open_source: SourceOpener | None,
              cache_dir: Path | None = None) -> LazyFile | None:
    """The squash file as a `LazyFile` when it is lazy (None when it is ordinary); without
    `open_source`, only what is cached can be read. With `cache_dir` (a node-local cache,
    `squashstore.config`'s ``[lazy] cache_dir``), the bytes fetched go there and the store
    is only read."""
    remote = read_marker(squash)
    if remote is None:
        return None
    # Root reads where to fetch from, and writes the cache, only where only root can write.
    for path in (lazy_dir(squash), *lazy_files(squash)):
        if path.exists():
            trust.check_entry(path, what="a lazy image")
    if cache_dir is not None:
        cache = node_cache(cache_dir, squash, remote)
        if not marker_path(squash).exists():  # completed meanwhile: an ordinary file now
            cache.close()
            return None
    else:
        cache = open_cache(squash, remote)
        if not marker_path(squash).exists():  # completed meanwhile: an ordinary file now
            cache.close()
            for path in lazy_files(squash)[1:]:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            return None
    try:
        source = open_source(remote) if open_source is not None else None
        return LazyFile(cache, source)
    except BaseException:
        cache.close()
        raise


def prefetch_metadata(lazy: LazyFile) -> None:
    """Fetch the superblock and every metadata table, so `ls` and `stat` never wait."""
    try:
        lazy.prefetch_metadata()
    except (ValueError, struct.error) as exc:
        raise LazyError(f"{lazy.cache.data_path}: not a squash file ({exc})") from None


def stage(staged: Path, squash: Path, remote: Remote, source: RangeSource,
          prefetch: Sequence[Span] = (), digests: ChunkDigests | None = None) -> int:
    """Make `staged` the sparse squash file of a lazy image to be published at `squash`
    (its map, marker and chunk `digests` already where the published image finds them),
    with its metadata and the `prefetch` spans (a start-up prefetch list) fetched, each
    chunk checked against `digests`; returns the bytes fetched."""
    write_marker(squash, remote)
    if digests is not None:
        from squashstore.lazy import chunkdigests

        chunkdigests.save(squash, digests)
    else:  # a file of an earlier pull of this layer would check the wrong chunks
        with contextlib.suppress(FileNotFoundError):
            chunks_path(squash).unlink()
    lazy = LazyFile(open_cache(squash, remote, data=staged), source)
    try:
        before = source.bytes
        prefetch_metadata(lazy)
        if prefetch:
            lazy.prefetch_bulk(prefetch)
        return source.bytes - before
    finally:
        lazy.close()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def complete(squash: Path, open_source: SourceOpener | None,
             progress: Callable[[int], None] | None = None) -> bool:
    """Fetch what a lazy image still lacks, check its digest, and make it ordinary.

    False when it was not lazy. A digest mismatch forgets what was cached (the next read
    fetches again) and raises `LazyError`; a registry that cannot be reached raises
    `FetchError` and leaves the image lazy.
    """
    lazy = open_lazy(squash, open_source)
    if lazy is None:
        return False
    remote = read_marker(squash)
    assert remote is not None
    try:
        if not lazy.cache.complete():
            if lazy.source is None:
                raise FetchError(f"{squash}: incomplete lazy image and no registry to "
                                 "complete it from")
            lazy.fill(progress)
        finalise(squash, lazy.cache, remote)
    finally:
        if lazy.source is not None:
            lazy.source.close()
        lazy.close()
    return True


def _layer_problem(squash: Path) -> str:
    """Why a complete squash file does not hold the layer its name (the claimed diff id)
    says, as `registry.artifact.check_layer` checks an eager pull; "" when it does."""
    from squashstore.podmanstore import Layout
    from squashstore.storelayer import layer_digest
    from squashstore.storelayout import SQUASH_SUFFIX

    lid = squash.name.removesuffix(SQUASH_SUFFIX)
    split = Layout(squash.parent.parent.parent).tar_split(lid)
    if not split.is_file():  # `pull --lazy` refuses an artifact without one
        return ""
    try:
        digest, _ = layer_digest(split, squash, str(squash))
    except SquashstoreError as exc:
        return f"cannot rebuild its layer: {exc}"
    if digest != "sha256:" + lid:
        return "does not hold the layer it claims (its tar rebuilds to another diff id)"
    return ""


def finalise(squash: Path, cache: RangeCache, remote: Remote) -> None:
    """A complete cache whose digest matches: drop the marker, then the map."""
    actual = file_digest(squash)
    if actual != remote.digest:
        cache.reset()
        raise LazyError(f"{squash}: completed lazy image has digest {actual}, expected "
                        f"{remote.digest}; its cache was discarded")
    problem = _layer_problem(squash)
    if problem:  # the pusher's claim, unchecked while lazy: it stays lazy (and unverified)
        raise LazyError(f"{squash}: {problem}")
    for path in lazy_files(squash):  # the marker first: from then on an ordinary image
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@dataclass(frozen=True)
class CacheState:
    """One cache of a lazy image's bytes as read, never written: the store's own, or this
    node's (``[lazy] cache_dir``)."""

    data: Path
    """Its data file."""
    present: int
    """Bytes present (0 when its map is absent or of another blob)."""
    bad: tuple[int, ...] = ()
    """Chunks present whose bytes fail the artifact's chunk digests (only when checked)."""
    problem: str = ""
    """Why it was not read (a symlink, another user's file or directory); then nothing
    of it counts."""


@dataclass(frozen=True)
class Status:
    """How much of a lazy image is here."""

    remote: Remote
    present: int
    """Bytes present in the store."""
    chunks_verified: bool = False
    """Whether each chunk is checked against the artifact's chunk digests as it arrives
    (else only the whole file, once complete)."""
    store: CacheState | None = None
    """The store's cache, its chunks re-checked when `status` was asked to."""
    node: CacheState | None = None
    """This node's cache of the image (``[lazy] cache_dir``), None when it has none."""


def _read_own(path: Path, owner: int | None, limit: int) -> bytes | None:
    """`trust.read_regular` of `path`, its failures a `LazyError`."""
    try:
        return trust.read_regular(path, limit, owner)
    except OSError as exc:
        raise LazyError(f"{path}: {exc.strerror}") from None


def _bad_chunks(data: Path, bitmap: bytes, digests: ChunkDigests) -> tuple[int, ...]:
    """The chunks set in `bitmap` whose bytes in `data` fail their digests."""
    from squashstore.lazy import ranges

    bad = []
    fd = os.open(data, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for index in range(digests.count):
            if ranges.has_chunk(bitmap, index):
                start = index * digests.chunk
                piece = os.pread(fd, min(digests.chunk, digests.size - start), start)
                if not digests.matches(index, piece):
                    bad.append(index)
    finally:
        os.close(fd)
    return tuple(bad)


def _cache_state(data: Path, map_: Path, remote: Remote, digests: ChunkDigests | None,
                 check: bool, owner: int | None) -> CacheState:
    """A cache as its map says (read only), its present chunks re-hashed when `check`."""
    from squashstore.lazy import ranges
    from squashstore.lazy.cache import CHUNK, HEADER_SIZE, header

    chunks = ranges.chunk_count(remote.size, CHUNK)
    length = HEADER_SIZE + -(-chunks // 8)
    try:
        raw = _read_own(map_, owner, length + 1)
        if raw is not None and owner is not None:  # the data file must be ours as well
            st = os.lstat(data)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != owner:
                raise LazyError(f"{data}: not a regular file of uid {owner}")
    except LazyError as exc:
        return CacheState(data, 0, problem=str(exc))
    except OSError as exc:
        return CacheState(data, 0, problem=f"{data}: {exc.strerror}")
    if raw is None or len(raw) != length or raw[:HEADER_SIZE] != \
            header(remote.digest, remote.size, CHUNK):
        return CacheState(data, 0)
    bitmap = raw[HEADER_SIZE:]
    count = ranges.count_present(bitmap, chunks)
    present = count * CHUNK
    if chunks and ranges.has_chunk(bitmap, chunks - 1):
        present -= chunks * CHUNK - remote.size
    bad: tuple[int, ...] = ()
    if check and digests is not None and count:
        try:
            bad = _bad_chunks(data, bitmap, digests)
        except OSError as exc:
            return CacheState(data, present, problem=f"{data}: {exc.strerror}")
    return CacheState(data, present, bad)


def node_state(directory: Path, remote: Remote, digests: ChunkDigests | None,
               check: bool) -> CacheState | None:
    """This node's cache of `remote` in `directory` (read only; None when it holds none):
    used only when it is a directory of ours that only we can write, its files ours."""
    from squashstore.lazy.cache import CacheError, check_directory, data_path
    from squashstore.lazy.cache import map_path as cache_map_path

    data, map_ = data_path(directory, remote.digest), cache_map_path(directory, remote.digest)
    if not os.path.lexists(directory) or not (os.path.lexists(data)
                                                or os.path.lexists(map_)):
        return None
    try:
        check_directory(directory)
    except CacheError as exc:
        return CacheState(data, 0, problem=str(exc))
    return _cache_state(data, map_, remote, digests, check, os.geteuid())


def status(squash: Path, check: bool = False, node_dir: Path | None = None) -> Status | None:
    """How much of the lazy image `squash` is here (None: it is not lazy), read without
    writing anything: the store's cache and, with `node_dir` (``[lazy] cache_dir``), this
    node's; with `check`, every chunk present is hashed again against the artifact's chunk
    digests (`CacheState.bad`)."""
    remote = read_marker(squash)
    if remote is None:
        return None
    for path in (lazy_dir(squash), *lazy_files(squash)):
        trust.check_entry(path, what="a lazy image")
    digests = chunk_digests(squash, remote)
    store = _cache_state(squash, map_path(squash), remote, digests, check, None)
    node = node_state(node_dir, remote, digests, check) if node_dir is not None else None
    return Status(remote, store.present, digests is not None, store, node)


def open_for_verify(squash: Path) -> LazyFile | None:
    """What `verify` reads a squash file through: None for an ordinary one (read it from
    disk). A lazy one whose every chunk is present is completed here (its digest checked:
    `LazyError` when wrong) and then is ordinary; an incomplete one is its cache alone, whose
    metadata can be checked without fetching anything."""
    remote = read_marker(squash)
    if remote is None:
        return None
    for path in (lazy_dir(squash), *lazy_files(squash)):
        trust.check_entry(path, what="a lazy image")
    # Read only: verify neither creates nor repairs a map (nor needs to own the store).
    cache = RangeCache(squash, map_path(squash), remote.digest, remote.size,
                       digests=chunk_digests(squash, remote), readonly=True)
    if not cache.complete():
        return LazyFile(cache, None)
    cache.close()
    lazy = open_lazy(squash, None)  # complete: finalised, which writes the store
    if lazy is None:
        return None
    try:
        finalise(squash, lazy.cache, remote)
    finally:
        lazy.close()
    return None
