"""The native squashfs writer against the real tools as oracles.

A source tree with every entry type (support.fixture_trees "full" plus sockets, a directory
of more than 256 entries whose listing exceeds 64 KiB, trusted./security. xattrs, sizes
around block boundaries, duplicates) is written with every compressor and several block
sizes, then: ``unsquashfs -lln`` lists it exactly as it lists mksquashfs's image of the same
tree; ``unsquashfs -d``, ``rdsquashfs -u /``, the kernel (``mount -t squashfs``) and
``squashfuse`` all give the source's canonical listing; ``sqfsdiff -T`` finds no difference
from mksquashfs's image; writing twice gives the same bytes. Hypothesis writes random small
trees and checks them through unsquashfs and the kernel. Needs root (devices, owners, mounts).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from squashstore.image import LayerError, SourceError
from squashstore.rootfs import tree_from_directory
from squashstore.squashfs import format as fmt
from squashstore.squashfs.compress import CodecError, codec_for
from squashstore.squashfs.writer import (
    SquashOptions,
    SquashWriter,
    WriterError,
    WriteSummary,
    parse_size,
)
from squashstore.tree import Inode, Kind, new_dir
from support import listing as listing_module
from support.fixture_trees import CAP_NET_RAW_EP, FIXED_MTIME, make_tree
from support.listing import Listing, canonical_from_dir, diff_listings

pytestmark = pytest.mark.root

COMBOS = [
    ("gzip", 128 * 1024),
    ("xz", 128 * 1024),
    ("lz4", 128 * 1024),
    ("zstd", 128 * 1024),
    ("none", 128 * 1024),
    ("zstd", 4096),
    ("gzip", 1024 * 1024),
]
SOME = [("gzip", 128 * 1024), ("xz", 128 * 1024), ("zstd", 4096)]
WIDE_ENTRIES = 700
"""Entries of /wide: names of 100+ bytes, so its listing is > 64 KiB (and > 256 entries)."""


# --- the source tree -------------------------------------------------------------------


def _add_extras(root: Path) -> None:
    """What make_tree("full") lacks: sockets, a >64 KiB listing, more xattrs, sizes around
    block boundaries, duplicates, a hard-linked symlink."""
    extra = root / "extra"
    extra.mkdir()
    for name in ("sock", "sock-xattr"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(extra / name))
    os.setxattr(extra / "sock-xattr", "trusted.kind", b"socket")
    os.symlink("target", extra / "link")
    os.link(extra / "link", extra / "link-hard", follow_symlinks=False)
    os.setxattr(extra / "link", "trusted.on-link", b"1", follow_symlinks=False)
    os.setxattr(extra / "link", "security.on-link", b"2", follow_symlinks=False)
    os.mknod(extra / "dev-xattr", 0o640 | 0o020000, os.makedev(4, 64))
    os.setxattr(extra / "dev-xattr", "trusted.dev", b"yes")
    os.mkfifo(extra / "fifo-xattr")
    os.setxattr(extra / "fifo-xattr", "security.fifo", b"\x00\x01")
    rng = random.Random(7)
    sizes = (1, 4095, 4096, 4097, 8191, 8192, 65536, 131071, 131072, 131073, 262144 + 5)
    for size in sizes:
        (extra / f"size-{size}").write_bytes(rng.randbytes(size))
        (extra / f"text-{size}").write_bytes((b"squash %d\n" % size * (size // 9 + 1))[:size])
    (extra / "dup-1").write_bytes((extra / "size-262149").read_bytes())
    (extra / "dup-2").write_bytes((extra / "text-131073").read_bytes())
    zeros_then_data = bytes(3 * 131072) + b"data after holes"
    (extra / "zeros-then-data").write_bytes(zeros_then_data)
    os.setxattr(extra / "size-4097", "user.big", rng.randbytes(3000))
    os.setxattr(extra / "size-4097", "user.same", b"shared")
    os.setxattr(extra / "size-8191", "user.same", b"shared")
    shared = b"a value shared by two different xattr sets"
    os.setxattr(extra / "size-4096", "user.shared", shared)
    os.setxattr(extra / "size-8192", "user.shared", shared)
    os.setxattr(extra / "size-8192", "trusted.other", b"1")

    chain = root / "chain"
    for _ in range(150):
        chain = chain / "d"
    chain.mkdir(parents=True)
    (chain / "bottom").write_bytes(b"deep down\n")
    wide = root / "wide"
    wide.mkdir()
    for i in range(WIDE_ENTRIES):
        name = f"{i:05d}-" + "w" * 100
        if i % 50 == 0:
            (wide / name).mkdir()
        elif i % 7 == 0:
            os.symlink(name, wide / (name + ".lnk"))
        else:
            (wide / name).write_bytes(b"%d" % (i % 13))


def _fix_mtimes(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(
                os.path.join(dirpath, name), (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False
            )
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_tree(tmp_path_factory.mktemp("writer") / "src", "full")
    _add_extras(root)
    _fix_mtimes(root)
    return root


@pytest.fixture(scope="module")
def expected(source: Path) -> Listing:
    return canonical_from_dir(source)


def write_image(src: Path, dest: Path, **options: object) -> WriteSummary:
    with SquashWriter(dest, SquashOptions(**options)) as writer:  # type: ignore[arg-type]
        return writer.finish(tree_from_directory(src, writer.add_file, keep_holes=True))


def mksquashfs(src: Path, dest: Path, compression: str, block_size: int) -> Path:
    comp = ["-comp", "gzip", "-noI", "-noD", "-noF", "-noX"] if compression == "none" else [
        "-comp", compression]
    subprocess.run(
        ["mksquashfs", src, dest, "-noappend", "-quiet", "-no-progress", "-b", str(block_size),
         *comp],
        check=True, capture_output=True,
    )
    return dest


Combo = tuple[str, int]
Images = Callable[[Combo], tuple[Path, Path]]


@pytest.fixture(scope="module")
def images(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Images:
    """combo -> (our image, mksquashfs's image) of the source tree, each made once."""
    made: dict[Combo, tuple[Path, Path]] = {}

    def get(combo: Combo) -> tuple[Path, Path]:
        if combo not in made:
            compression, block_size = combo
            out = tmp_path_factory.mktemp(f"img-{compression}-{block_size}")
            ours = out / "ours.sqfs"
            write_image(source, ours, compression=compression, block_size=block_size, jobs=2)
            theirs = mksquashfs(source, out / "mksquashfs.sqfs", compression, block_size)
            made[combo] = (ours, theirs)
        return made[combo]

    return get


def _combo_id(combo: Combo) -> str:
    return f"{combo[0]}-{combo[1] // 1024}K"


every_combo = pytest.mark.parametrize("combo", COMBOS, ids=_combo_id)
some_combos = pytest.mark.parametrize("combo", SOME, ids=_combo_id)
"""The slower oracles that add little per codec run on a few combinations (test time)."""


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)


@contextlib.contextmanager
def mounted(image: Path, fuse: str = "") -> Iterator[Path]:
    """`image` mounted by the kernel, or by the FUSE program `fuse` (squashfuse[_ll])."""
    with tempfile.TemporaryDirectory(prefix="sqmnt-") as mnt:
        if fuse:
            result = _run(fuse, image, mnt)
        else:
            result = _run("mount", "-t", "squashfs", "-o", "loop,ro", image, mnt)
        assert result.returncode == 0, result.stderr
        try:
            yield Path(mnt)
        finally:
            _run("umount", mnt).check_returncode()


def _assert_same(expected: Listing, got: Listing, **kw: object) -> None:
    diffs = diff_listings(expected, got, **kw)  # type: ignore[arg-type]
    assert not diffs, "\n".join(diffs[:40])


# --- oracles ---------------------------------------------------------------------------


@every_combo
def test_unsquashfs_lists_like_mksquashfs_image(images: Images, combo: Combo) -> None:
    ours, theirs = images(combo)
    a = _run("unsquashfs", "-lln", ours)
    b = _run("unsquashfs", "-lln", theirs)
    assert a.returncode == 0, a.stderr
    assert a.stdout.splitlines() == b.stdout.splitlines()


@every_combo
def test_sqfsdiff_finds_no_difference(images: Images, combo: Combo) -> None:
    ours, theirs = images(combo)
    result = _run("sqfsdiff", "-T", "-a", theirs, "-b", ours)
    assert result.returncode == 0, result.stdout + result.stderr


@every_combo
def test_unsquashfs_extracts_the_tree(
    images: Images, combo: Combo, expected: Listing, tmp_path: Path
) -> None:
    dest = tmp_path / "x"
    result = _run("unsquashfs", "-d", dest, images(combo)[0])
    assert result.returncode == 0, result.stderr
    _assert_same(expected, canonical_from_dir(dest))


@some_combos
def test_rdsquashfs_extracts_the_tree(
    images: Images, combo: Combo, expected: Listing, tmp_path: Path
) -> None:
    dest = tmp_path / "x"
    dest.mkdir()
    image = images(combo)[0]
    result = _run("rdsquashfs", "-q", "-C", "-O", "-T", "-X", "-u", "/", "-p", dest, image)
    assert result.returncode == 0, result.stderr
    # rdsquashfs 1.2 unpacks every name as its own file (no hard links), leaves the root
    # directory it was given alone, and chowns after setting xattrs, which clears
    # security.capability: compare the rest, and read that xattr with rdsquashfs -x.
    def plain(listing: Listing) -> Listing:
        return {
            path: replace(entry, hardlinks=(), xattrs={
                k: v for k, v in entry.xattrs.items() if k != "security.capability"})
            for path, entry in listing.items()
        }

    _assert_same(plain(expected), plain(canonical_from_dir(dest)), ignore_paths={"/"})
    shown = _run("rdsquashfs", "-x", "/special/capability", image).stdout
    assert "security.capability=0x" + CAP_NET_RAW_EP.hex() in shown


@every_combo
def test_kernel_mount_shows_the_tree(images: Images, combo: Combo, expected: Listing) -> None:
    with mounted(images(combo)[0]) as mnt:
        _assert_same(expected, canonical_from_dir(mnt))
        wide = sorted(os.listdir(mnt / "wide"))
        assert len(wide) == WIDE_ENTRIES
        for name in wide[::-1]:  # every lookup goes through the directory index
            os.lstat(mnt / "wide" / name)


def _check_fuse(image: Path, expected: Listing, program: str, mp: pytest.MonkeyPatch) -> None:
    # squashfuse 0.1.104 swaps the trusted./security. prefixes and fails on empty values
    # (with mksquashfs's images too): compare without xattrs, then check user. ones. Its
    # high-level binary numbers inodes per path, so hard links show only with _ll.
    mp.setattr(listing_module, "_dir_xattrs", lambda path: {})
    links = program == "squashfuse_ll"
    plain = {
        path: replace(entry, xattrs={}, hardlinks=entry.hardlinks if links else ())
        for path, entry in expected.items()
    }
    with mounted(image, fuse=program) as mnt:
        _assert_same(plain, canonical_from_dir(mnt))
        assert os.getxattr(mnt / "special" / "user-xattrs", "user.binary") == bytes(range(256))
        assert os.getxattr(mnt / "special" / "xattr-dir", "user.on-dir") == b"yes"


@every_combo
def test_squashfuse_ll_shows_the_tree(
    images: Images, combo: Combo, expected: Listing, monkeypatch: pytest.MonkeyPatch
) -> None:
    _check_fuse(images(combo)[0], expected, "squashfuse_ll", monkeypatch)


@some_combos
def test_squashfuse_shows_the_tree(
    images: Images, combo: Combo, expected: Listing, monkeypatch: pytest.MonkeyPatch
) -> None:
    _check_fuse(images(combo)[0], expected, "squashfuse", monkeypatch)


# --- layout facts ----------------------------------------------------------------------


def _superblock(image: Path) -> fmt.Superblock:
    with open(image, "rb") as f:
        return fmt.Superblock.unpack(f.read(fmt.SUPERBLOCK_SIZE))


@pytest.mark.parametrize("compression", ["gzip", "zstd", "lz4", "xz", "none"])
def test_superblock_and_options_like_mksquashfs(
    source: Path, tmp_path: Path, compression: str
) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "f").write_bytes(b"hello\n" * 1000)
    ours = tmp_path / "ours"
    write_image(tmp_path / "t", ours, compression=compression)
    theirs = mksquashfs(tmp_path / "t", tmp_path / "theirs", compression, 128 * 1024)
    a, b = _superblock(ours), _superblock(theirs)
    for name in ("compressor", "flags", "block_size", "block_log", "inode_count",
                 "fragment_count", "id_count"):
        assert getattr(a, name) == getattr(b, name), name
    # Same layout; python-lz4 bundles another liblz4 that packs small blocks a little
    # differently, so sizes may differ by a few bytes.
    assert abs(a.bytes_used - b.bytes_used) <= 8
    assert ours.stat().st_size % 4096 == 0
    if compression != "xz":  # mksquashfs's xz blocks also record their sizes in the header
        assert ours.read_bytes()[96:110] == theirs.read_bytes()[96:110]


@pytest.mark.parametrize(
    ("compression", "xopts", "level"),
    [("gzip", ["-Xcompression-level", "6"], 6), ("zstd", ["-Xcompression-level", "3"], 3),
     ("lz4", ["-Xhc"], 12)],
)
def test_options_block_like_mksquashfs(
    tmp_path: Path, compression: str, xopts: list[str], level: int
) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "f").write_bytes(b"x")
    subprocess.run(
        ["mksquashfs", tmp_path / "t", tmp_path / "theirs", "-comp", compression, *xopts,
         "-noappend", "-quiet", "-no-progress"], check=True, capture_output=True)
    theirs = (tmp_path / "theirs").read_bytes()
    (header,) = fmt.BLOCK_SIZE_ENTRY.unpack(theirs[96:98] + b"\0\0")
    length, compressed = fmt.parse_metadata_header(header)
    assert not compressed
    payload = theirs[98 : 98 + length]
    assert codec_for(compression, level).options_block() == payload
    ours = tmp_path / "ours"
    write_image(tmp_path / "t", ours, compression=compression, level=level)
    assert ours.read_bytes()[96 : 98 + length] == theirs[96 : 98 + length]
    assert codec_for(compression, options_block=payload).options_block() == payload


def test_same_input_same_bytes(source: Path, tmp_path: Path) -> None:
    write_image(source, tmp_path / "a", compression="zstd", level=3, jobs=2)
    write_image(source, tmp_path / "b", compression="zstd", level=3, jobs=1)
    write_image(source, tmp_path / "c", compression="zstd", level=3, jobs=3)
    a = (tmp_path / "a").read_bytes()
    assert a == (tmp_path / "b").read_bytes()
    assert a == (tmp_path / "c").read_bytes()


def test_superblock_time(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    write_image(source, tmp_path / "a", compression="lz4")
    assert _superblock(tmp_path / "a").mtime == FIXED_MTIME
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234567")
    write_image(source, tmp_path / "b", compression="lz4")
    assert _superblock(tmp_path / "b").mtime == 1234567
    write_image(source, tmp_path / "c", compression="lz4", mtime=42)
    assert _superblock(tmp_path / "c").mtime == 42


def test_bad_source_date_epoch(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(WriterError, match="SOURCE_DATE_EPOCH"):
        write_image(source / "etc", tmp_path / "a", compression="lz4")
    assert list(tmp_path.iterdir()) == []


def test_file_shrinking_while_read_names_it(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x" * 300_000)

    def shrinking_sink(stream: io.RawIOBase, size: int) -> object:
        os.truncate(tmp_path / "src" / "f", 1000)
        return writer.add_file(stream, size)  # type: ignore[arg-type]

    with pytest.raises(SourceError, match="src/f"), SquashWriter(
        tmp_path / "x", SquashOptions()
    ) as writer:
        tree_from_directory(tmp_path / "src", shrinking_sink)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_export_table_and_xattrs_can_be_left_out(source: Path, tmp_path: Path) -> None:
    write_image(source, tmp_path / "a", compression="lz4", export_table=False, xattrs=False)
    sb = _superblock(tmp_path / "a")
    assert sb.export_table == fmt.INVALID_BLK
    assert sb.xattr_id_table == fmt.INVALID_BLK
    assert not sb.flags & fmt.Flag.EXPORTABLE
    with mounted(tmp_path / "a") as mnt:
        assert os.listxattr(mnt / "special" / "user-xattrs") == []
        assert (mnt / "big" / "large").stat().st_size == 3 * 1024 * 1024 + 5


def test_long_xattr_lists_and_shared_values(tmp_path: Path) -> None:
    """A list over 64 KiB moves its values out of line; a value of a set stored before is
    referenced, not repeated (ext4 cannot hold such lists, so the tree is built here)."""
    many = {f"user.x{i:03d}": bytes([i % 251]) * 100 for i in range(700)}
    big = bytes(range(256)) * 4
    root = new_dir(mtime=1)
    assert root.children is not None
    root.children["many"] = Inode(Kind.DIR, children={}, xattrs=many)
    for i in range(40):
        root.children[f"f{i}"] = Inode(Kind.FIFO, xattrs={"trusted.big": big,
                                                         "trusted.n": b"%d" % i})
    only_fifos = new_dir(mtime=1)
    only_fifos.children = {k: v for k, v in root.children.items() if k != "many"}
    with SquashWriter(tmp_path / "fifos.sqfs", SquashOptions(compression="none")) as writer:
        writer.finish(only_fifos)
    # the 1 KiB value is stored once, not 40 times
    assert (tmp_path / "fifos.sqfs").stat().st_size <= 8192
    dest = tmp_path / "x.sqfs"
    with SquashWriter(dest, SquashOptions(compression="none")) as writer:
        writer.finish(root)
    with mounted(dest) as mnt:
        assert sorted(os.listxattr(mnt / "many")) == sorted(many)
        for name, value in many.items():
            assert os.getxattr(mnt / "many", name) == value
        for i in range(40):
            path = mnt / f"f{i}"
            assert os.getxattr(path, "trusted.big", follow_symlinks=False) == big
            assert os.getxattr(path, "trusted.n", follow_symlinks=False) == b"%d" % i
    shown = _run("rdsquashfs", "-x", "/f39", dest).stdout
    assert "trusted.big=0x" + big.hex() in shown.lower()


def test_duplicates_are_stored_once(tmp_path: Path) -> None:
    content = random.Random(3).randbytes(700_000)
    for name, files in (("one", {"a": content}), ("two", {"a": content, "b": content})):
        (tmp_path / name).mkdir()
        for fname, data in files.items():
            (tmp_path / name / fname).write_bytes(data)
        write_image(tmp_path / name, tmp_path / f"{name}.sqfs", compression="none")
    sizes = [(tmp_path / f"{n}.sqfs").stat().st_size for n in ("one", "two")]
    assert sizes[0] == sizes[1]
    with SquashWriter(tmp_path / "h.sqfs", SquashOptions()) as writer:
        h1 = writer.add_file(io.BytesIO(content), len(content))
        h2 = writer.add_file(io.BytesIO(content), len(content))
        h3 = writer.add_file(io.BytesIO(b"small"), 5)
        h4 = writer.add_file(io.BytesIO(b"small"), 5)
        assert h1 is h2 and h3 is h4 and h1 is not h3
        writer.abort()


def test_any_add_order_and_unused_content(tmp_path: Path) -> None:
    """Content added top-layer-first, some of it never used by the tree, duplicates of
    big files after other data: the image still reads back right."""
    rng = random.Random(11)
    blobs = {f"f{i}": rng.randbytes(rng.choice([0, 10, 5000, 200_000, 300_000]))
             for i in range(12)}
    blobs["dup"] = blobs["f3"]
    root = new_dir(mtime=5)
    assert root.children is not None
    dest = tmp_path / "img.sqfs"
    with SquashWriter(dest, SquashOptions(compression="gzip", level=1, jobs=2)) as writer:
        writer.add_file(io.BytesIO(rng.randbytes(400_000)), 400_000)  # dropped later
        for name in sorted(blobs, reverse=True):
            data = blobs[name]
            handle = writer.add_file(io.BytesIO(data), len(data))
            root.children[name] = Inode(Kind.FILE, mode=0o600, size=len(data), data=handle)
        writer.add_file(io.BytesIO(blobs["f5"]), len(blobs["f5"]))  # duplicate, dropped
        writer.finish(root)
    with mounted(dest) as mnt:
        for name, data in blobs.items():
            assert (mnt / name).read_bytes() == data, name


class _Zeros(io.RawIOBase):
    """`size` zero bytes, then `tail`, without holding them in memory."""

    def __init__(self, size: int, tail: bytes) -> None:
        self.left = size
        self.tail = tail
        self.chunk = bytes(1 << 20)

    def read(self, n: int = -1) -> bytes:
        if self.left > 0:
            take = min(n, self.left, len(self.chunk))
            self.left -= take
            return self.chunk if take == len(self.chunk) else bytes(take)
        out, self.tail = self.tail[:n], self.tail[n:]
        return out


def test_file_over_4_gib(tmp_path: Path) -> None:
    size = (4 << 30) + 123
    root = new_dir(mtime=7)
    assert root.children is not None
    dest = tmp_path / "big.sqfs"
    with SquashWriter(dest, SquashOptions(compression="lz4", block_size=1 << 20)) as writer:
        handle = writer.add_file(_Zeros(size - 5, b"tail!"), size)  # type: ignore[arg-type]
        root.children["huge"] = Inode(Kind.FILE, mode=0o644, size=size, data=handle)
        writer.finish(root)
    assert dest.stat().st_size < 1 << 20
    with mounted(dest) as mnt:
        assert (mnt / "huge").stat().st_size == size
        with open(mnt / "huge", "rb") as f:
            f.seek(size - 10)
            assert f.read() == bytes(5) + b"tail!"
            f.seek(3 << 30)
            assert f.read(4096) == bytes(4096)
    listing = _run("unsquashfs", "-lln", dest).stdout
    assert f" {size} " in listing


def test_unwritable_destination_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WriterError, match="cannot write"):
        SquashWriter(tmp_path / "missing" / "x.sqfs", SquashOptions())


def test_short_read_fails_and_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "img.sqfs"
    with pytest.raises(LayerError), SquashWriter(dest, SquashOptions()) as writer:
        writer.add_file(io.BytesIO(b"x" * 1000), 5000)
    assert list(tmp_path.iterdir()) == []


def test_failure_in_block_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "img.sqfs"
    with pytest.raises(RuntimeError), SquashWriter(dest, SquashOptions()) as writer:
        writer.add_file(io.BytesIO(b"x" * 300_000), 300_000)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with SquashWriter(dest, SquashOptions()) as writer:
        pass  # never finished: nothing is left either
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "inode"),
    [("a/b", Inode(Kind.FIFO)), ("nul\0", Inode(Kind.FIFO)), ("..", Inode(Kind.FIFO)),
     ("x" * 257, Inode(Kind.FIFO)), ("dev", Inode(Kind.CHARDEV, rdev=(4096, 1))),
     ("owner", Inode(Kind.FIFO, uid=1 << 32)),
     ("content", Inode(Kind.FILE, size=10, data=None))],
)
def test_bad_tree_is_refused(tmp_path: Path, name: str, inode: Inode) -> None:
    root = new_dir()
    assert root.children is not None
    root.children[name] = inode
    with pytest.raises(WriterError), SquashWriter(tmp_path / "x", SquashOptions()) as w:
        w.finish(root)
    assert list(tmp_path.iterdir()) == []


def test_empty_root(tmp_path: Path) -> None:
    with SquashWriter(tmp_path / "x", SquashOptions(compression="gzip")) as writer:
        summary = writer.finish(new_dir(mode=0o700, uid=5, mtime=100))
    assert (summary.files, summary.bytes_in, summary.bytes_out) == (0, 0, 4096)
    with mounted(tmp_path / "x") as mnt:
        st = os.stat(mnt)
        assert (os.listdir(mnt), st.st_mode & 0o7777, st.st_uid, st.st_mtime) == (
            [], 0o700, 5, 100)


@pytest.mark.parametrize(
    "options",
    [{"compression": "lzo"}, {"compression": "brotli"}, {"block_size": 3000},
     {"block_size": 2 << 20}, {"compression": "gzip", "level": 12}, {"jobs": -1}],
)
def test_bad_options_are_refused(tmp_path: Path, options: dict[str, object]) -> None:
    with pytest.raises(WriterError):
        SquashWriter(tmp_path / "x", SquashOptions(**options))  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_parse_size() -> None:
    assert parse_size("128K") == 131072
    assert parse_size("128k") == 131072
    assert parse_size("1M") == 1 << 20
    assert parse_size("4096") == 4096
    assert parse_size("1MiB") == 1 << 20
    for bad in ("", "K", "1.5M", "-4K", "12Q"):
        with pytest.raises(WriterError):
            parse_size(bad)


# --- codecs ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gzip", "xz", "lz4", "zstd"])
def test_codec_round_trip_and_bombs(name: str) -> None:
    codec = codec_for(name)
    data = b"".join(b"block %d\n" % i for i in range(15000))[:131072]
    packed = codec.compress(data)
    assert len(packed) < len(data)
    assert codec.decompress(packed, len(data)) == data
    with pytest.raises(CodecError):
        codec.decompress(packed, len(data) - 1)
    with pytest.raises(CodecError):
        codec.decompress(packed[: len(packed) // 2], len(data))
    with pytest.raises(CodecError):
        codec.decompress(b"\x00garbage" * 20, len(data))


def test_lzo_error_names_the_package() -> None:
    try:
        import lzo  # noqa: F401
    except ImportError:
        with pytest.raises(CodecError, match="python-lzo"):
            codec_for("lzo")
    else:
        assert codec_for(3).name == "lzo"


# --- random trees ----------------------------------------------------------------------

_NAMES = st.text(
    alphabet=st.sampled_from("abcXYZ019._- äß日"), min_size=1, max_size=12
).filter(lambda n: n not in (".", ".."))
_SIZES = st.sampled_from([0, 1, 100, 4095, 4096, 4097, 8192, 12289, 20000])


@st.composite
def _trees(draw: st.DrawFn) -> list[tuple[str, str, dict[str, object]]]:
    """A list of (kind, relative path, attributes) creating a small tree in order."""
    ops: list[tuple[str, str, dict[str, object]]] = []
    dirs = [""]
    files: list[str] = []
    used: set[str] = set()
    for _ in range(draw(st.integers(1, 25))):
        parent = draw(st.sampled_from(dirs))
        name = draw(_NAMES)
        path = f"{parent}/{name}" if parent else name
        if path in used:
            continue
        used.add(path)
        kind = draw(st.sampled_from(["file", "file", "file", "dir", "symlink", "fifo", "link"]))
        if kind == "link" and not files:
            kind = "file"
        attrs: dict[str, object] = {
            "mode": draw(st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o1777, 0o000])),
            "uid": draw(st.sampled_from([0, 1, 1000, 65534, 100000])),
            "gid": draw(st.sampled_from([0, 2, 1000, 4294967294])),
            "mtime": draw(st.integers(0, 2**32 - 1)),
        }
        if kind in ("file", "dir"):
            attrs["xattrs"] = draw(st.dictionaries(
                st.sampled_from(["user.a", "user.b", "trusted.t", "security.s"]),
                st.binary(max_size=40), max_size=3))
        if kind == "file":
            attrs["size"] = draw(_SIZES)
            attrs["fill"] = draw(st.sampled_from(["random", "zero", "text"]))
            files.append(path)
        elif kind == "dir":
            dirs.append(path)
        elif kind == "symlink":
            attrs["target"] = draw(_NAMES)
        elif kind == "link":
            attrs["target"] = draw(st.sampled_from(files))
        ops.append((kind, path, attrs))
    return ops


def _build(root: Path, ops: list[tuple[str, str, dict[str, object]]], seed: int) -> None:
    rng = random.Random(seed)
    for kind, rel, attrs in ops:
        path = root / rel
        if kind == "file":
            size = int(attrs["size"])  # type: ignore[call-overload]
            fill = attrs["fill"]
            data = (rng.randbytes(size) if fill == "random" else bytes(size) if fill == "zero"
                    else (b"text %d " % size * size)[:size])
            path.write_bytes(data)
        elif kind == "dir":
            path.mkdir()
        elif kind == "symlink":
            os.symlink(str(attrs["target"]), path)
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            os.link(root / str(attrs["target"]), path)
            continue
        os.chown(path, int(attrs["uid"]), int(attrs["gid"]),  # type: ignore[call-overload]
                 follow_symlinks=False)
        for key, value in dict(attrs.get("xattrs", {})).items():  # type: ignore[call-overload]
            os.setxattr(path, key, value)
        if kind != "symlink":
            os.chmod(path, int(attrs["mode"]))  # type: ignore[call-overload]
    for kind, rel, attrs in reversed(ops):
        if kind != "link":
            t = int(attrs["mtime"])  # type: ignore[call-overload]
            os.utime(root / rel, (t, t), follow_symlinks=False)
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_trees(), seed=st.integers(0, 1000),
       compression=st.sampled_from(["gzip", "lz4", "zstd", "none"]),
       block_size=st.sampled_from([4096, 8192, 131072]))
def test_random_trees(
    ops: list[tuple[str, str, dict[str, object]]], seed: int, compression: str, block_size: int
) -> None:
    with tempfile.TemporaryDirectory(prefix="sqhyp-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        os.chmod(src, 0o755)
        _build(src, ops, seed)
        want = canonical_from_dir(src)
        image = Path(tmp) / "img.sqfs"
        write_image(src, image, compression=compression, block_size=block_size, level=1
                    if compression in ("gzip", "zstd") else None)
        dest = Path(tmp) / "x"
        result = _run("unsquashfs", "-d", dest, image)
        assert result.returncode == 0, result.stderr
        _assert_same(want, canonical_from_dir(dest))
        with mounted(image) as mnt:
            _assert_same(want, canonical_from_dir(mnt))
