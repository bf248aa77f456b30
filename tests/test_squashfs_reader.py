"""The squashfs reader against images made by mksquashfs and tar2sqfs (the real tools).

A fixture tree with every entry type is packed by mksquashfs (every compressor, several block
sizes and layout options) and by tar2sqfs (every compressor, from a GNU tar archive); the
reader's `to_tree()` plus the content of every file must equal the source tree. Lookups are
checked against readdir, reads at random offsets against the file bytes, and mutated images
must give only `SquashfsError`, quickly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from squashstore import tree
from squashstore.squashfs.meta import MetaReader, Region
from squashstore.squashfs.reader import SqInode, SquashfsError, SquashReader
from support import listing

BIG_DIR_ENTRIES = 3000
MTIME = 1_600_000_000

# ---------------------------------------------------------------------------------------
# The source tree.


def _set_xattr(path: Path, name: str, value: bytes) -> None:
    os.setxattr(path, name, value, follow_symlinks=False)


def make_source(root: Path) -> None:
    """Fill `root` with every entry type squashfs can hold, with odd metadata."""
    root.mkdir()
    rand = _pseudo_random(1_300_000 + 17)
    (root / "empty").write_bytes(b"")
    (root / "small").write_bytes(b"hello, squashfs\n")
    (root / "random.bin").write_bytes(rand)
    (root / "text.txt").write_bytes(b"".join(b"line %d of text\n" % i for i in range(70_000)))
    (root / "exact-128k").write_bytes(rand[: 128 * 1024])
    (root / "exact-4k").write_bytes(rand[5000 : 5000 + 4096])
    (root / "dup-a").write_bytes(rand[:200_000])
    (root / "dup-b").write_bytes(rand[:200_000])
    (root / "dup-tail-a").write_bytes(b"same small tail")
    (root / "dup-tail-b").write_bytes(b"same small tail")
    with open(root / "sparse", "wb") as f:
        f.truncate(3 * 1024 * 1024 + 1234)
        f.seek(1024 * 1024 + 10)
        f.write(rand[:70_000])
        f.seek(3 * 1024 * 1024)
        f.write(b"end")
    with open(root / "huge-sparse", "wb") as f:  # > 2048 blocks of 4 KiB, mostly holes
        f.truncate(20 * 1024 * 1024 + 5)
        for where in (0, 9_000_000, 19_999_000):
            f.seek(where)
            f.write(rand[where % 1000 : where % 1000 + 50_000])
    (root / "hard-1").write_bytes(b"linked content\n" * 100)
    os.link(root / "hard-1", root / "hard-2")
    (root / "sub").mkdir()
    os.link(root / "hard-1", root / "sub" / "hard-3")
    (root / "hard-empty-1").write_bytes(b"")
    os.link(root / "hard-empty-1", root / "hard-empty-2")
    os.symlink("small", root / "symlink")
    os.symlink("does/not/exist", root / "dangling")
    os.symlink("x" * 1000, root / "long-symlink")
    os.mkfifo(root / "fifo")
    os.mknod(root / "socket", stat.S_IFSOCK | 0o644)
    os.mknod(root / "char", stat.S_IFCHR | 0o620, os.makedev(1, 3))
    os.mknod(root / "block", stat.S_IFBLK | 0o660, os.makedev(8, 1))
    os.mknod(root / "char-big", stat.S_IFCHR | 0o600, os.makedev(259, 70_000))
    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    (root / "setgid-dir").mkdir()
    os.chmod(root / "setgid-dir", 0o2750)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    (root / "owned").write_bytes(b"owned by someone\n")
    os.chown(root / "owned", 123_456, 654_321)
    os.lchown(root / "symlink", 4_000_000, 65_534)
    os.chown(root / "sub", 1000, 1000)
    (root / ("n" * 255)).write_bytes(b"long name")
    (root / "naïve-日本語-ünïcode").write_bytes(b"unicode name")
    (root / "sub" / "ütf").mkdir()
    for name, value in [
        ("user.plain", b"1"),
        ("user.binary", bytes(range(256))),
        ("user.big", rand[:3000]),
        ("trusted.t", b"trusted value"),
        ("security.s", b"security value"),
    ]:
        _set_xattr(root / "small", name, value)
    _set_xattr(root / "dup-a", "user.shared", b"same list")
    _set_xattr(root / "dup-b", "user.shared", b"same list")
    _set_xattr(root / "sub", "user.dir", b"on a directory")
    _set_xattr(root / "symlink", "trusted.link", b"on a symlink")
    _set_xattr(root / "fifo", "trusted.fifo", b"on a fifo")
    _set_xattr(root / "hard-1", "user.hard", b"on a hard link")
    _set_xattr(root, "user.root", b"on the root")
    big = root / "big-dir"
    big.mkdir()
    for i in range(BIG_DIR_ENTRIES):
        (big / f"entry-{i:05d}-{'y' * (i % 40)}").write_bytes(b"%d" % i if i % 7 else b"")
    deep = root / "deep"
    for i in range(40):
        deep = deep / f"level{i}"
    deep.mkdir(parents=True)
    (deep / "bottom").write_bytes(b"at the bottom\n")
    for i, path in enumerate(sorted(_all_paths(root), key=lambda p: -len(p.parts))):
        os.utime(path, (MTIME + i, MTIME + i), follow_symlinks=False)
    os.utime(root, (MTIME - 1, MTIME - 1))


def _all_paths(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def _pseudo_random(size: int) -> bytes:
    """Incompressible but reproducible bytes."""
    out = bytearray()
    seed = b"squashstore"
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += hashlib.shake_256(seed).digest(1 << 16)
    return bytes(out[:size])


# ---------------------------------------------------------------------------------------
# The reader's view as the shared canonical listing (tests/support/listing.py).

_KIND_NAMES = {
    tree.Kind.DIR: listing.DIR,
    tree.Kind.FILE: listing.FILE,
    tree.Kind.SYMLINK: listing.SYMLINK,
    tree.Kind.CHARDEV: listing.CHARDEV,
    tree.Kind.BLOCKDEV: listing.BLOCKDEV,
    tree.Kind.FIFO: listing.FIFO,
    tree.Kind.SOCKET: listing.SOCKET,
}


def listing_from_reader(reader: SquashReader) -> listing.Listing:
    """`reader.to_tree()` plus every file's content, as a canonical listing."""
    result: listing.Listing = {}
    groups: dict[int, list[str]] = {}
    for rel, node in tree.walk(reader.to_tree()):
        path = "/" + rel
        inode = node.data
        assert isinstance(inode, SqInode)
        sha = ""
        if node.kind is tree.Kind.FILE:
            sha = hashlib.sha256(read_all(reader, inode)).hexdigest()
        result[path] = listing.Entry(
            type=_KIND_NAMES[node.kind], mode=node.mode, uid=node.uid, gid=node.gid,
            size=node.size, mtime=node.mtime, sha256=sha, target=node.target, rdev=node.rdev,
            xattrs=dict(node.xattrs),
        )
        if not node.is_dir() and node.nlink > 1:
            groups.setdefault(id(node), []).append(path)
    for paths in groups.values():
        for path in paths:
            result[path] = replace(result[path], hardlinks=tuple(sorted(paths)))
    return result


def read_all(reader: SquashReader, inode: SqInode) -> bytes:
    """The whole content, in uneven chunks so block boundaries are crossed."""
    parts, offset = [], 0
    while offset < inode.size:
        chunk = reader.read(inode, offset, 100_003)
        assert chunk, f"empty read at {offset} of {inode.size}"
        parts.append(chunk)
        offset += len(chunk)
    assert reader.read(inode, inode.size, 10) == b""
    return b"".join(parts)


# ---------------------------------------------------------------------------------------
# Fixtures: the source, images made by the real tools.


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reader") / "src"
    make_source(root)
    return root


def mksquashfs(source: Path, out: Path, *options: str) -> Path:
    subprocess.run(
        ["mksquashfs", str(source), str(out), "-noappend", "-quiet", "-no-progress",
         "-processors", "1", *options],
        check=True, stdout=subprocess.DEVNULL,
    )
    return out


@pytest.fixture(scope="module")
def source_tar(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tar") / "src.tar"
    subprocess.run(
        ["tar", "--format=posix", "--xattrs", "--xattrs-include=*", "--sparse",
         "--numeric-owner", "-C", str(source), "-cf", str(out), "."],
        check=True, stderr=subprocess.PIPE,
    )
    return out


def tar2sqfs(tar: Path, out: Path, *options: str) -> Path:
    with open(tar, "rb") as stdin:
        subprocess.run(
            ["tar2sqfs", "-q", "-f", "-j", "1", *options, str(out)], stdin=stdin, check=True,
            stdout=subprocess.DEVNULL,
        )
    return out


@pytest.fixture(scope="module")
def gzip_image(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mksquashfs(source, tmp_path_factory.mktemp("img") / "gzip.sqfs", "-b", "4K")


MKSQUASHFS_VARIANTS = {
    "gzip": [],
    "gzip-4k-options": ["-b", "4096", "-Xcompression-level", "1", "-Xwindow-size", "12"],
    "gzip-no-fragments": ["-no-fragments"],
    "gzip-always-fragments-64k": ["-always-use-fragments", "-b", "64K"],
    "gzip-tailends-8k": ["-tailends", "-b", "8K"],
    "gzip-no-exports-no-duplicates": ["-no-exports", "-no-duplicates"],
    "gzip-no-xattrs": ["-no-xattrs"],
    "uncompressed": ["-noI", "-noD", "-noF", "-noX", "-noId"],
    "xz-1m": ["-comp", "xz", "-b", "1M"],
    "xz-bcj-dict": ["-comp", "xz", "-Xbcj", "x86,arm", "-Xdict-size", "50%"],
    "lzma": ["-comp", "lzma"],
    "lz4": ["-comp", "lz4"],
    "lz4-hc-16k": ["-comp", "lz4", "-Xhc", "-b", "16K"],
    "zstd": ["-comp", "zstd"],
    "zstd-level-3-256k": ["-comp", "zstd", "-Xcompression-level", "3", "-b", "256K"],
}


def _lzo_available() -> bool:
    return importlib.util.find_spec("lzo") is not None


def _check_image(
    image: Path,
    source: Path,
    *,
    xattrs: bool = True,
    sockets: bool = True,
    root: bool = True,
    links: bool = True,
) -> None:
    expected = listing.canonical_from_dir(source)
    if not xattrs:
        expected = {p: replace(e, xattrs={}) for p, e in expected.items()}
    with SquashReader(image) as reader:
        actual = listing_from_reader(reader)
        check_directories(reader)
    assert any(e.xattrs for e in actual.values()) == xattrs
    assert any(e.hardlinks for e in actual.values()) == links
    ignore = [] if sockets else [p for p, e in expected.items() if e.type == listing.SOCKET]
    ignore += [] if root else ["/"]
    assert listing.diff_listings(expected, actual, ignore_paths=ignore) == []


def check_directories(reader: SquashReader) -> None:
    """lookup() agrees with readdir() in every directory; inode_by_number finds each inode."""
    stack = [reader.root]
    while stack:
        directory = stack.pop()
        entries = list(reader.readdir(directory))
        names = [e.name for e in entries]
        assert names == sorted(names)
        for entry in entries:
            found = reader.lookup(directory, entry.name)
            assert found is not None and found.ref == entry.ref, entry.name
            assert found.number == entry.inode_number and found.kind is entry.kind
            assert reader.inode_by_number(found.number).ref == found.ref
            assert reader.lookup(directory, entry.name + b"~") is None
            if found.kind is tree.Kind.DIR:
                assert found.parent == directory.number
                stack.append(found)
        assert reader.lookup(directory, b"") is None
        assert reader.lookup(directory, b"\xff" * 3) is None


@pytest.mark.parametrize("variant", sorted(MKSQUASHFS_VARIANTS))
def test_mksquashfs_images_read_as_the_source(
    variant: str, source: Path, tmp_path: Path
) -> None:
    image = mksquashfs(source, tmp_path / "img.sqfs", *MKSQUASHFS_VARIANTS[variant])
    _check_image(image, source, xattrs=variant != "gzip-no-xattrs")


TAR2SQFS_COMPRESSORS = ["gzip", "xz", "lzma", "lz4", "zstd"]


@pytest.mark.parametrize("compressor", TAR2SQFS_COMPRESSORS)
def test_tar2sqfs_images_read_as_the_source(
    compressor: str, source: Path, source_tar: Path, tmp_path: Path
) -> None:
    options = ["-c", compressor]
    if compressor == "gzip":
        options += ["-e", "-b", "8192"]  # with an export table, small blocks
    image = tar2sqfs(source_tar, tmp_path / "img.sqfs", *options)
    # tar cannot carry sockets; tar2sqfs takes the root's attributes from the "./" entry.
    _check_image(image, source, sockets=False)


@pytest.mark.parametrize("compressor", ["gzip", "zstd"])
def test_sqfstar_images_read_as_the_source(
    compressor: str, source: Path, tmp_path: Path
) -> None:
    # sqfstar 4.5.1 refuses "./" member names (so archive the top-level names: the root
    # gets sqfstar's defaults) and misreads GNU sparse members (so no --sparse).
    tar, image = tmp_path / "src.tar", tmp_path / "img.sqfs"
    subprocess.run(
        ["tar", "--format=posix", "--xattrs", "--xattrs-include=*",
         "--numeric-owner", "-C", str(source), "-cf", str(tar), *sorted(os.listdir(source))],
        check=True, stderr=subprocess.PIPE,
    )
    with open(tar, "rb") as stdin:
        subprocess.run(
            ["sqfstar", "-quiet", "-no-progress", "-processors", "1", "-comp", compressor,
             str(image)],
            stdin=stdin, check=True, stdout=subprocess.DEVNULL,
        )
    _check_image(image, source, sockets=False, root=False)


@pytest.mark.parametrize("compression", ["gzip", "xz", "lz4", "zstd", "none"])
def test_project_writer_images_read_as_the_source(
    compression: str, source: Path, gzip_image: Path, tmp_path: Path
) -> None:
    """Round trip: the reader's tree of mksquashfs's image, written again by the project's
    writer, reads back as the source tree."""
    from squashstore.squashfs.writer import SquashOptions, SquashWriter

    out = tmp_path / "own.sqfs"
    with SquashReader(gzip_image) as reader:
        root = reader.to_tree()
        options = SquashOptions(compression=compression, block_size=16 * 1024, jobs=1)
        with SquashWriter(out, options) as writer:
            done: dict[int, object] = {}
            for _, node in tree.walk(root):
                if node.kind is tree.Kind.FILE and id(node) not in done:
                    inode = node.data
                    assert isinstance(inode, SqInode)
                    content = io.BytesIO(read_all(reader, inode))
                    done[id(node)] = node.data = writer.add_file(content, inode.size)
            writer.finish(root)
    _check_image(out, source)


# ---------------------------------------------------------------------------------------
# Hypothesis-generated trees.

_NAMES = st.text(
    st.characters(exclude_characters="/\0", exclude_categories=["Cs"]),
    min_size=1, max_size=24,
).filter(lambda n: n not in (".", "..") and len(n.encode()) <= 255)
_OWNERS = st.integers(0, 2**32 - 2)
_TARGETS = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]),
                   min_size=1, max_size=300)
_TIMES = st.integers(0, 2**32 - 1)
_XATTRS = st.dictionaries(
    st.text("abcxyz._-0123456789", min_size=1, max_size=12).map(lambda n: "user." + n),
    st.binary(max_size=300), max_size=3,
)
_CONTENT = st.one_of(
    st.binary(max_size=10_000),
    st.tuples(st.integers(0, 40_000), st.binary(min_size=1, max_size=50)).map(
        lambda t: bytes(t[0]) + t[1]  # zeros first: sparse blocks
    ),
    st.integers(1, 5).map(lambda n: bytes(range(256)) * 16 * n),  # whole 4 KiB blocks
)


@dataclass
class _Spec:
    """One generated entry (a ``link`` is a hard link to the file at `target`)."""

    path: str
    kind: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    content: bytes = b""
    target: str = ""
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)


@st.composite
def _trees(draw: st.DrawFn) -> list[_Spec]:
    """Entries of a random tree, parents before children."""
    dirs, used = [""], set()
    out: list[_Spec] = []

    def fresh(parent: str) -> str:
        path = f"{parent}/{draw(_NAMES)}".lstrip("/")
        return "" if path in used else path

    def spec(path: str, kind: str) -> _Spec:
        return _Spec(path, kind, draw(st.integers(0, 0o7777)), draw(_OWNERS), draw(_OWNERS),
                     draw(_TIMES))

    for _ in range(draw(st.integers(0, 4))):
        path = fresh(draw(st.sampled_from(dirs)))
        if path:
            used.add(path)
            dirs.append(path)
            out.append(spec(path, "dir"))
            out[-1].xattrs = draw(_XATTRS)
    files: list[str] = []
    for _ in range(draw(st.integers(0, 12))):
        path = fresh(draw(st.sampled_from(dirs)))
        if not path:
            continue
        used.add(path)
        kind = draw(st.sampled_from(["file", "file", "symlink", "fifo", "char", "block", "link"]))
        if kind == "link" and not files:
            kind = "file"
        entry = spec(path, kind)
        if kind == "file":
            entry.content, entry.xattrs = draw(_CONTENT), draw(_XATTRS)
            files.append(path)
        elif kind == "link":
            entry.target = draw(st.sampled_from(files))
        elif kind == "symlink":
            entry.target = draw(_TARGETS)
        elif kind in ("char", "block"):
            entry.rdev = (draw(st.integers(0, 4095)), draw(st.integers(0, 2**20 - 1)))
        out.append(entry)
    return out


def _materialise(root: Path, entries: list[_Spec]) -> None:
    root.mkdir()
    for e in entries:
        path = root / e.path
        if e.kind == "dir":
            path.mkdir()
        elif e.kind == "file":
            path.write_bytes(e.content)
        elif e.kind == "link":
            os.link(root / e.target, path)
            continue
        elif e.kind == "symlink":
            os.symlink(e.target, path)
        elif e.kind == "fifo":
            os.mkfifo(path)
        else:
            ifmt = stat.S_IFCHR if e.kind == "char" else stat.S_IFBLK
            os.mknod(path, ifmt | 0o600, os.makedev(*e.rdev))
        for name, value in e.xattrs.items():
            _set_xattr(path, name, value)
        os.chown(path, e.uid, e.gid, follow_symlinks=False)
        if e.kind != "symlink":
            os.chmod(path, e.mode)
    for e in reversed(entries):  # children before their directories
        if e.kind != "link":
            os.utime(root / e.path, (e.mtime, e.mtime), follow_symlinks=False)


@settings(max_examples=40, deadline=None)
@given(entries=_trees())
def test_generated_trees_read_as_the_source(entries: list[_Spec]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, tar = Path(tmp) / "src", Path(tmp) / "src.tar"
        _materialise(src, entries)
        expected = listing.canonical_from_dir(src)
        images = [mksquashfs(src, Path(tmp) / "m.sqfs", "-b", "4K")]
        subprocess.run(
            ["tar", "--format=posix", "--xattrs", "--xattrs-include=*", "--numeric-owner",
             "-C", str(src), "-cf", str(tar), "."],
            check=True,
        )
        images.append(tar2sqfs(tar, Path(tmp) / "t.sqfs", "-b", "4096", "-c", "zstd"))
        for image in images:
            with SquashReader(image) as reader:
                actual = listing_from_reader(reader)
                check_directories(reader)
            assert listing.diff_listings(expected, actual) == [], image.name


EDGE_TREES = {
    "empty": {},
    "empty-subdir": {"d/": b""},
    "one-empty-file": {"f": b""},
    "one-block": {"f": bytes(range(256)) * 16},
}


@pytest.mark.parametrize("tool", ["mksquashfs", "mksquashfs-bare", "tar2sqfs"])
@pytest.mark.parametrize("shape", sorted(EDGE_TREES))
def test_edge_images(tool: str, shape: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name, content in EDGE_TREES[shape].items():
        if name.endswith("/"):
            (src / name).mkdir()
        else:
            (src / name).write_bytes(content)
    image = tmp_path / "img.sqfs"
    if tool == "tar2sqfs":
        tar = tmp_path / "src.tar"
        names = os.listdir(src)
        subprocess.run(["tar", "-C", str(src), "-cf", str(tar), "-T", "/dev/null", *names],
                       check=True)
        tar2sqfs(tar, image, "-b", "4096")
    else:
        bare = ["-no-exports", "-no-xattrs", "-no-fragments"] if tool.endswith("bare") else []
        mksquashfs(src, image, "-b", "4K", *bare)
    _check_image(image, src, root=tool != "tar2sqfs", links=False, xattrs=False)


@pytest.mark.parametrize("tool", ["mksquashfs", "tar2sqfs"])
def test_lzo_images_need_python_lzo(
    tool: str, source: Path, source_tar: Path, tmp_path: Path
) -> None:
    """With python-lzo installed lzo images read as the source; without, a clear error."""
    if tool == "mksquashfs":
        image = mksquashfs(source, tmp_path / "img.sqfs", "-comp", "lzo")
    else:
        image = tar2sqfs(source_tar, tmp_path / "img.sqfs", "-c", "lzo")
    if _lzo_available():
        _check_image(image, source, sockets=tool == "mksquashfs")
        return
    with pytest.raises(SquashfsError, match="python-lzo"):
        SquashReader(image)


# ---------------------------------------------------------------------------------------
# Random access.


@pytest.fixture(scope="module")
def reader(gzip_image: Path) -> Iterator[SquashReader]:
    with SquashReader(gzip_image, metadata_cache_blocks=8, data_cache_blocks=2) as r:
        yield r


_FIXTURE_OK = [HealthCheck.function_scoped_fixture]


@settings(max_examples=200, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(
    name=st.sampled_from(
        ["random.bin", "sparse", "text.txt", "exact-128k", "small", "empty", "huge-sparse"]
    ),
    offset=st.one_of(st.integers(0, 3_200_000), st.integers(0, 21_000_000)),
    size=st.integers(0, 400_000),
)
@example(name="huge-sparse", offset=19_998_000, size=60_000)  # data in the third chunk
@example(name="huge-sparse", offset=8_999_999, size=4098)
def test_read_at_any_offset_matches_the_file(
    reader: SquashReader, source: Path, name: str, offset: int, size: int
) -> None:
    data = _file_bytes(source / name)
    assert reader.read(reader.resolve(name), offset, size) == data[offset : offset + size]


_FILE_CACHE: dict[Path, bytes] = {}


def _file_bytes(path: Path) -> bytes:
    if path not in _FILE_CACHE:
        _FILE_CACHE[path] = path.read_bytes()
    return _FILE_CACHE[path]


def test_big_directory_uses_its_index(
    reader: SquashReader, gzip_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = reader.resolve("/big-dir")
    assert big.extended and len(big.dir_index) > 5
    names = [e.name for e in reader.readdir(big)]
    assert len(names) == BIG_DIR_ENTRIES
    # A fresh reader looking up the last name touches few directory metadata blocks.
    with SquashReader(gzip_image) as fresh:
        directory = fresh.resolve("big-dir")
        touched: list[int] = []
        original = MetaReader.block

        def counting(self: MetaReader, region: Region, pos: int) -> tuple[bytes, int]:
            if region.name == "directory table":
                touched.append(pos)
            return original(self, region, pos)

        monkeypatch.setattr(MetaReader, "block", counting)
        assert fresh.lookup(directory, names[-1]) is not None
        assert fresh.lookup(directory, names[len(names) // 2]) is not None
        listing_blocks = (big.size // 8192) + 1
        assert 0 < len(set(touched)) <= 4 < listing_blocks


def test_readdir_resumes_from_any_next_offset(reader: SquashReader) -> None:
    for path in ("big-dir", "", "sub"):
        directory = reader.resolve(path)
        entries = list(reader.readdir(directory))
        for i in [*range(0, len(entries), 97), len(entries) - 1]:
            resumed = list(reader.readdir(directory, entries[i].next_offset))
            assert resumed == entries[i + 1 :]
        assert all(e.next_offset > 2 for e in entries)
        assert len({e.next_offset for e in entries}) == len(entries)


def test_resolve(reader: SquashReader) -> None:
    assert reader.resolve("/") is reader.root or reader.resolve("/").ref == reader.root.ref
    assert reader.resolve("sub/hard-3").ref == reader.resolve("/hard-1").ref
    assert reader.resolve("sub/../small").ref == reader.resolve("small").ref
    assert reader.resolve("naïve-日本語-ünïcode".encode()).kind is tree.Kind.FILE
    assert reader.readlink(reader.resolve("symlink")) == b"small"
    with pytest.raises(FileNotFoundError):
        reader.resolve("sub/nothing")
    with pytest.raises(NotADirectoryError):
        reader.resolve("small/x")
    assert reader.resolve("symlink").kind is tree.Kind.SYMLINK


def test_file_beyond_4_gib(tmp_path: Path) -> None:
    """An extended inode with a 64-bit size (sparse, so tar and tar2sqfs stay quick)."""
    src = tmp_path / "src"
    src.mkdir()
    size = (4 << 30) + 4096 + 77
    marks = {1 << 20: b"start", (4 << 30) + 100: b"beyond 4 GiB", size - 3: b"end"}
    with open(src / "huge", "wb") as f:
        f.truncate(size)
        for where, data in marks.items():
            f.seek(where)
            f.write(data)
    tar = tmp_path / "src.tar"
    subprocess.run(["tar", "--sparse", "--format=posix", "-C", str(src), "-cf", str(tar), "."],
                   check=True)
    with SquashReader(tar2sqfs(tar, tmp_path / "img.sqfs", "-c", "zstd")) as r:
        huge = r.resolve("huge")
        assert huge.extended and huge.size == size and huge.block_count > 2 * 2048
        for where, data in marks.items():
            assert r.read(huge, where - 5, len(data) + 10) == (
                bytes(5) + data + bytes(5)
            )[: size - (where - 5)]
        assert r.read(huge, size - 1, 100) == b"d"


def test_inode_by_number_without_export_table(source: Path, tmp_path: Path) -> None:
    image = mksquashfs(source, tmp_path / "img.sqfs", "-no-exports")
    with SquashReader(image) as r:
        assert r.superblock.export_table == 0xFFFF_FFFF_FFFF_FFFF
        for number in range(1, r.superblock.inode_count + 1):
            assert r.inode_by_number(number).number == number
        with pytest.raises(SquashfsError):
            r.inode_by_number(r.superblock.inode_count + 1)


def test_threads_share_one_reader(reader: SquashReader, source: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    names = ["random.bin", "sparse", "text.txt", "dup-a", "hard-1", "huge-sparse"]

    def job(i: int) -> bool:
        name = names[i % len(names)]
        inode = reader.resolve(name)
        offset = (i * 7919) % max(1, inode.size)
        return reader.read(inode, offset, 50_000) == _file_bytes(source / name)[
            offset : offset + 50_000
        ]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(job, range(200)))


# ---------------------------------------------------------------------------------------
# Bad images.


def test_not_a_squashfs(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"hsqs" + bytes(200))
    with pytest.raises(SquashfsError):
        SquashReader(bad)
    bad.write_bytes(b"short")
    with pytest.raises(SquashfsError):
        SquashReader(bad)
    with pytest.raises(SquashfsError, match="cannot open"):
        SquashReader(tmp_path / "missing")


def test_a_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(SquashfsError, match="directory"):
        SquashReader(tmp_path)


@pytest.mark.root
def test_reads_a_block_device(gzip_image: Path) -> None:
    device = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(gzip_image)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    try:
        with SquashReader(device) as on_device, SquashReader(gzip_image) as on_file:
            assert listing_from_reader(on_device) == listing_from_reader(on_file)
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)


def test_truncated_image(gzip_image: Path, tmp_path: Path) -> None:
    data = gzip_image.read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SquashfsError, match="truncated"):
        SquashReader(cut)


class _Hung(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise _Hung("the reader took more than the time limit on one image")


@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    base = tmp_path_factory.mktemp("small")
    src = base / "src"
    src.mkdir()
    (src / "file").write_bytes(_pseudo_random(20_000) + bytes(10_000))
    (src / "tail").write_bytes(b"tail" * 100)
    (src / "d").mkdir()
    (src / "d" / "inner").write_bytes(b"inner")
    os.link(src / "tail", src / "d" / "hl")
    os.symlink("file", src / "link")
    os.mkfifo(src / "fifo")
    _set_xattr(src / "file", "user.a", b"value")
    _set_xattr(src / "d", "trusted.b", b"x" * 100)
    for i in range(40):
        (src / "d" / f"many-{i:03d}").write_bytes(b"%d" % i)
    images = {}
    for comp in ("gzip", "zstd"):
        out = mksquashfs(src, base / f"{comp}.sqfs", "-comp", comp, "-b", "4K")
        images[comp] = out.read_bytes()
    plain = ("-noI", "-noD", "-noF", "-noX", "-noId", "-b", "4K")
    images["uncompressed"] = mksquashfs(src, base / "plain.sqfs", *plain).read_bytes()
    _HOT.extend(_record_positions(base / "plain.sqfs"))
    tar = base / "src.tar"
    subprocess.run(
        ["tar", "--format=posix", "--xattrs", "--xattrs-include=*", "-C", str(src),
         "-cf", str(tar), "."],
        check=True,
    )
    images["tar2sqfs-xz"] = tar2sqfs(tar, base / "t.sqfs", "-c", "xz", "-b", "4096").read_bytes()
    shutil.rmtree(src)
    return images


_HOT: list[int] = []
"""Positions of inode and directory records in the uncompressed small image."""


def _record_positions(path: Path) -> Iterator[int]:
    """Every byte position of the inodes and listings of an uncompressed one-block image."""
    with SquashReader(path) as r:
        sb = r.superblock
        assert sb.directory_table - sb.inode_table < 8192
        for _, node in tree.walk(r.to_tree()):
            inode = node.data
            assert isinstance(inode, SqInode)
            start = sb.inode_table + (inode.ref >> 16) + 2 + (inode.ref & 0xFFFF)
            yield from range(start, start + 40)
            if inode.kind is tree.Kind.DIR:
                start = sb.directory_table + inode.dir_block + 2 + inode.dir_offset
                yield from range(start, start + inode.size - 3)


def exercise(path: Path) -> None:
    """Everything the FUSE server and CLI would do to an image."""
    with SquashReader(path) as r:
        r.to_tree()
        stack = [r.root]
        seen = 0
        while stack and seen < 500:
            directory = stack.pop()
            for entry in r.readdir(directory):
                seen += 1
                inode = r.lookup(directory, entry.name)
                if inode is None:
                    continue
                r.xattrs(inode)
                r.inode_by_number(inode.number)
                if inode.kind is tree.Kind.FILE:
                    r.read(inode, 0, inode.size)
                elif inode.kind is tree.Kind.SYMLINK:
                    r.readlink(inode)
                elif inode.kind is tree.Kind.DIR:
                    stack.append(inode)


@settings(max_examples=600, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(data=st.data())
def test_mutated_images_give_only_clean_errors(
    small_images: dict[str, bytes], tmp_path: Path, data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(sorted(small_images)))
    image = bytearray(small_images[name])
    # Most damage goes to the metadata (inode table onwards), where the parsing is; in the
    # uncompressed image, straight to the inode and directory records.
    meta, used = int.from_bytes(image[64:72], "little"), int.from_bytes(image[40:48], "little")
    hot = st.sampled_from(_HOT) if name == "uncompressed" else st.integers(meta, used - 1)
    where = st.one_of(hot, hot, st.integers(0, len(image) - 1))
    how = data.draw(st.sampled_from(["flip", "set", "truncate", "pointer", "field", "zeros"]))
    if how == "flip":
        for pos in data.draw(st.lists(where, min_size=1, max_size=8)):
            image[pos] ^= data.draw(st.integers(1, 255))
    elif how == "set":  # small values hit types, counts and sizes
        for pos in data.draw(st.lists(where, min_size=1, max_size=4)):
            image[pos] = data.draw(st.sampled_from([0, 1, 2, 7, 8, 9, 14, 15, 0x80, 0xFF]))
    elif how == "truncate":
        del image[data.draw(st.integers(0, len(image) - 1)) :]
    elif how == "pointer":  # one of the superblock's table positions
        slot = data.draw(st.integers(0, 7))
        value = data.draw(st.one_of(st.integers(0, len(image) + 100), st.integers(0, 2**64 - 1)))
        image[32 + 8 * slot : 40 + 8 * slot] = value.to_bytes(8, "little")
    elif how == "field":  # a 16- or 32-bit word (counts, sizes, references)
        pos = data.draw(where)
        width = data.draw(st.sampled_from([2, 4]))
        value = data.draw(st.sampled_from([0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 8192]))
        image[pos : pos + width] = (value & (1 << 8 * width) - 1).to_bytes(width, "little")
    else:
        start = data.draw(where)
        image[start : start + data.draw(st.integers(1, 64))] = bytes(64)[: len(image) - start]
    path = tmp_path / "mutated.sqfs"
    path.write_bytes(bytes(image))
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 10.0)
    try:
        exercise(path)
    except SquashfsError as exc:  # one clear line naming the image
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), str(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------
# Hand-made damage in uncompressed images (positions found through the reader itself).


@pytest.fixture(scope="module")
def plain_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    base = tmp_path_factory.mktemp("plain")
    src = base / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "file").write_bytes(b"x" * 9000)
    (src / "big").write_bytes(b"a" * 8192)
    _set_xattr(src / "big", "user.make", b"extended")
    image = mksquashfs(
        src, base / "plain.sqfs", "-noI", "-noD", "-noF", "-noX", "-noId", "-b", "8K"
    )
    return image.read_bytes()


def _inode_pos(reader: SquashReader, inode: SqInode) -> int:
    """Absolute position of an inode in an uncompressed image (header of its block skipped)."""
    return reader.superblock.inode_table + (inode.ref >> 16) + 2 + (inode.ref & 0xFFFF)


def _open_patched(tmp_path: Path, image: bytes | bytearray) -> SquashReader:
    path = tmp_path / "patched.sqfs"
    path.write_bytes(bytes(image))
    return SquashReader(path)


def test_directory_loop_is_an_error(plain_image: bytes, tmp_path: Path) -> None:
    image = bytearray(plain_image)
    with _open_patched(tmp_path, image) as r:
        a, b = r.resolve("a"), r.resolve("a/b")
        assert a.ref >> 16 == b.ref >> 16 == 0
        listing_pos = r.superblock.directory_table + a.dir_block + 2 + a.dir_offset
    # a's listing: one header {count, start, base}, then the entry of b.
    base = int.from_bytes(image[listing_pos + 8 : listing_pos + 12], "little")
    entry = listing_pos + 12
    assert image[entry + 8 : entry + 9] == b"b"
    image[entry : entry + 2] = (a.ref & 0xFFFF).to_bytes(2, "little")
    image[entry + 2 : entry + 4] = (a.number - base).to_bytes(2, "little", signed=True)
    with _open_patched(tmp_path, image) as r:
        assert r.resolve("a/b/b/b").ref == a.ref
        with pytest.raises(SquashfsError, match="loop"):
            r.to_tree()


@pytest.mark.parametrize("bad", [b"fi/e", b"fi\0e", b"..", b"."])
def test_invalid_names_are_an_error(plain_image: bytes, tmp_path: Path, bad: bytes) -> None:
    image = bytearray(plain_image)
    with _open_patched(tmp_path, image) as r:
        b = r.resolve("a/b")
        entry = r.superblock.directory_table + b.dir_block + 2 + b.dir_offset + 12
    assert image[entry + 8 : entry + 12] == b"file"
    image[entry + 6 : entry + 8] = (len(bad) - 1).to_bytes(2, "little")
    image[entry + 8 : entry + 12] = bad.ljust(4, b"x")
    with _open_patched(tmp_path, image) as r, pytest.raises(SquashfsError, match="invalid name"):
        r.to_tree()


def test_directories_sharing_a_listing_are_an_error(tmp_path: Path) -> None:
    """A hostile image cannot multiply its entries by pointing directories at one listing."""
    src = tmp_path / "src"
    (src / "x").mkdir(parents=True)
    (src / "x" / "f").write_bytes(b"f")
    (src / "y").mkdir()
    image = bytearray(mksquashfs(src, tmp_path / "img.sqfs", "-noI").read_bytes())
    with _open_patched(tmp_path, image) as r:
        x, y = r.resolve("x"), r.resolve("y")
        assert not y.extended and y.size == 3
        pos = _inode_pos(r, y) + 16  # basic dir: u32 start, u32 nlink, u16 size, u16 offset
    image[pos : pos + 4] = x.dir_block.to_bytes(4, "little")
    image[pos + 8 : pos + 10] = x.size.to_bytes(2, "little")
    image[pos + 10 : pos + 12] = x.dir_offset.to_bytes(2, "little")
    with _open_patched(tmp_path, image) as r:
        assert [e.name for e in r.readdir(r.resolve("y"))] == [b"f"]
        with pytest.raises(SquashfsError, match="add up"):
            r.to_tree()


def test_absurd_file_size_is_an_error_not_an_allocation(
    plain_image: bytes, tmp_path: Path
) -> None:
    image = bytearray(plain_image)
    with _open_patched(tmp_path, image) as r:
        big = r.resolve("big")
        assert big.extended and big.size == 8192
        pos = _inode_pos(r, big) + 16 + 8  # extended file: u64 start, then u64 size
    huge = 1 << 61
    image[pos : pos + 8] = huge.to_bytes(8, "little")
    with _open_patched(tmp_path, image) as r:
        big = r.resolve("big")
        assert big.size == huge
        with pytest.raises(SquashfsError):
            r.read(big, huge - 10, 10)
        with pytest.raises(SquashfsError):
            r.read(big, 0, 1 << 20)


def test_decompression_bomb_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "rnd").write_bytes(_pseudo_random(8192))  # one raw block of 8 KiB
    image = bytearray(mksquashfs(src, tmp_path / "img.sqfs", "-b", "8K", "-noI").read_bytes())
    with _open_patched(tmp_path, image) as r:
        rnd = r.resolve("rnd")
        word_pos = r.superblock.inode_table + 2 + (rnd.block_list_ref & 0xFFFF)
        assert rnd.block_list_ref >> 16 == 0 and r.block_layout(rnd, 0) == (96, 8192 | 1 << 24)
    bomb = zlib.compress(bytes(4 << 20), 9)  # 4 MiB of zeros in a few KiB
    assert len(bomb) < 8192
    image[96 : 96 + len(bomb)] = bomb
    image[word_pos : word_pos + 4] = len(bomb).to_bytes(4, "little")
    with _open_patched(tmp_path, image) as r, pytest.raises(SquashfsError, match="more than"):
        r.read(r.resolve("rnd"), 0, 10)


def test_reads_through_a_byte_source(gzip_image: Path, source: Path) -> None:
    """The hook lazily pulled images use: every read goes to `source`, none to the path."""
    data = gzip_image.read_bytes()
    reads: list[tuple[int, int]] = []

    class Source:
        size = len(data)

        def pread(self, size: int, offset: int) -> bytes:
            reads.append((offset, size))
            return data[offset : offset + size]

    with SquashReader("/nonexistent/image", source=Source()) as r:
        assert r.remote and reads
        assert r.read(r.resolve("random.bin"), 0, 1 << 30) == _file_bytes(source / "random.bin")
    with SquashReader(gzip_image) as plain:
        assert not plain.remote


def test_ls_lists_any_depth_and_escapes_hostile_names(tmp_path: Path) -> None:
    """``ls -R`` of a 2,000-deep tree lists every level (no recursion limit), and names
    with control characters cannot break the listing's lines or reach the terminal raw."""
    import sys
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ["/".join(["d"] * 2000) + "/f", "x\x1b]0;PWNED\x07\x1b[2J", "a\nb"]:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"z"))
    (tmp_path / "in.tar").write_bytes(buf.getvalue())

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "squashstore.cli.main", *args],
                              capture_output=True, text=True, timeout=300, check=False)

    image = str(tmp_path / "deep.sqfs")
    assert cli("squash", f"tar:{tmp_path / 'in.tar'}", image).returncode == 0
    listed = cli("ls", image, "/", "-R")
    assert listed.returncode == 0, listed.stderr[-500:]
    assert listed.stdout.count(":\n") == 2001 and listed.stdout.rstrip().endswith(" f")
    assert "\x1b" not in listed.stdout and "\x07" not in listed.stdout
    top = cli("ls", image, "/").stdout.splitlines()
    assert len(top) == 3 and any(line.endswith(" a\\nb") for line in top), top
