"""The FUSE server against the kernel's squashfs: real mounts of mksquashfs and tar2sqfs images.

Every test mounts for real (root, /dev/fuse) and unmounts in teardown with ``fusermount3 -u
-z`` (FUSE) or ``umount -l`` (kernel loop mounts), whatever happened.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from squashstore import mounts
from squashstore.fuse import backend, daemon, server
from squashstore.fuse.loop import Loop
from squashstore.squashfs.reader import SquashReader
from support.fixture_trees import (
    CAP_NET_RAW_EP,
    LONG_NAME,
    MANY,
    UNICODE_NAME,
    XATTR_BINARY,
    make_tree,
)
from support.listing import canonical_from_dir, diff_listings, tar_of_dir_gnu

pytestmark = pytest.mark.root


# ----------------------------------------------------------------------------- helpers


def _mountinfo(mountpoint: Path) -> list[str] | None:
    """The /proc/self/mountinfo fields of the mount on `mountpoint`, or None."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                return fields
    return None


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie counts: it serves nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL)


class Mounts:
    """Mounts made by one test; all are undone in teardown."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.fuse: list[tuple[Path, int]] = []
        self.kernel: list[Path] = []

    def _dir(self, name: str) -> Path:
        d = self.base / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def serve(self, image: Path, name: str = "fuse", *extra: str) -> tuple[Path, int]:
        mnt = self._dir(name)
        pid = daemon.start(image, mnt, ("--log-file", str(self.base / f"{name}.log"), *extra))
        self.fuse.append((mnt, pid))
        return mnt, pid

    def kernel_mount(self, image: Path, name: str = "kernel") -> Path:
        mnt = self._dir(name)
        _run(["mount", "-t", "squashfs", "-o", "loop,ro", str(image), str(mnt)])
        self.kernel.append(mnt)
        return mnt

    def close(self) -> None:
        for mnt, pid in self.fuse:
            subprocess.run(["fusermount3", "-u", "-z", "-q", str(mnt)], capture_output=True)
            if not _wait_for(lambda pid=pid: _gone(pid), 10):  # type: ignore[misc]
                os.kill(pid, signal.SIGKILL)
        for mnt in self.kernel:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def mounts_(tmp_path: Path) -> Iterator[Mounts]:
    m = Mounts(tmp_path / "mnt")
    try:
        yield m
    finally:
        m.close()


# ----------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("fuse-tree") / "t", "full")


@pytest.fixture(scope="module")
def images(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The "full" tree packed by mksquashfs (zstd, with export table) and by tar2sqfs
    (gzip, no export table, from a GNU tar with xattrs)."""
    out = tmp_path_factory.mktemp("fuse-images")
    mk = out / "mksquashfs.sqfs"
    _run(["mksquashfs", str(tree), str(mk), "-comp", "zstd", "-quiet", "-no-progress"])
    tar = tar_of_dir_gnu(tree, out / "tree.tar")
    ng = out / "tar2sqfs.sqfs"
    with open(tar, "rb") as f:
        subprocess.run(["tar2sqfs", "-q", "-c", "gzip", str(ng)], stdin=f, check=True,
                       capture_output=True)
    return {"mksquashfs": mk, "tar2sqfs": ng}


@pytest.fixture(scope="module")
def kernel_listings(images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
                    ) -> dict[str, dict[str, object]]:
    """The canonical listing and every path's lstat through the kernel's squashfs."""
    out: dict[str, dict[str, object]] = {}
    m = Mounts(tmp_path_factory.mktemp("kernel-mounts"))
    try:
        for name, image in images.items():
            mnt = m.kernel_mount(image, name)
            out[name] = {"listing": canonical_from_dir(mnt), "stats": _all_stats(mnt)}
    finally:
        m.close()
    return out


def _all_stats(top: Path) -> dict[str, os.stat_result]:
    result = {"/": os.lstat(top)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            result["/" + os.path.relpath(full, top)] = os.lstat(full)
    return result


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("maker", ["mksquashfs", "tar2sqfs"])
def test_listing_equals_kernel_mount(maker: str, images: dict[str, Path],
                                     kernel_listings: dict[str, dict[str, object]],
                                     mounts_: Mounts) -> None:
    """Every entry type, owner, mode, xattr, hard link and byte: as the kernel shows them."""
    mnt, _ = mounts_.serve(images[maker])
    listing = canonical_from_dir(mnt)
    expected = kernel_listings[maker]["listing"]
    assert isinstance(expected, dict)
    assert diff_listings(expected, listing) == []
    assert len(listing) > MANY


@pytest.mark.parametrize("maker", ["mksquashfs", "tar2sqfs"])
def test_stat_fields_and_stable_inode_numbers(maker: str, images: dict[str, Path],
                                              kernel_listings: dict[str, dict[str, object]],
                                              mounts_: Mounts) -> None:
    mnt, _ = mounts_.serve(images[maker])
    kernel = kernel_listings[maker]["stats"]
    assert isinstance(kernel, dict)
    ours = _all_stats(mnt)
    assert sorted(ours) == sorted(kernel)
    root_number = kernel["/"].st_ino
    for path, k in kernel.items():
        o = ours[path]
        fields = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_rdev", "st_mtime")
        assert [getattr(o, f) for f in fields] == [getattr(k, f) for f in fields], path
        # FUSE's root must be 1: the squashfs root's number and 1 trade places.
        swapped = {root_number: 1, 1: root_number}.get(k.st_ino, k.st_ino)
        assert o.st_ino == swapped, path
    assert ours["/"].st_ino == 1
    a, b = ours["/hardlinks/a"], ours["/hardlinks/sub/c"]
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 3)


def test_xattrs_negative_lookups_and_names(images: dict[str, Path], mounts_: Mounts) -> None:
    mnt, pid = mounts_.serve(images["mksquashfs"])
    s = mnt / "special"
    assert os.getxattr(s / "user-xattrs", "user.binary") == XATTR_BINARY
    assert os.getxattr(s / "user-xattrs", "user.color") == b"red"
    assert os.getxattr(s / "user-xattrs", "user.empty") == b""
    assert os.getxattr(s / "capability", "security.capability") == CAP_NET_RAW_EP
    assert sorted(os.listxattr(s / "user-xattrs")) == ["user.binary", "user.color",
                                                       "user.empty"]
    assert os.getxattr(s / "xattr-dir", "user.on-dir") == b"yes"
    with pytest.raises(OSError) as err:
        os.getxattr(s / "user-xattrs", "user.missing")
    assert err.value.errno == errno.ENODATA
    assert os.listxattr(mnt / "etc" / "config") == []
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "etc" / "no-such-module.py")
    assert (mnt / "names" / LONG_NAME).read_bytes() == b"long\n"
    assert (mnt / "names" / UNICODE_NAME).read_bytes() == b"unicode\n"
    assert os.readlink(mnt / "dangling") == "/does/not/exist"
    assert sorted(os.listdir(mnt / "many")) == sorted(f"f{i}" for i in range(MANY))
    with pytest.raises(OSError) as err:
        os.open(mnt / "etc" / "config", os.O_RDWR)
    assert err.value.errno == errno.EROFS
    st = os.statvfs(mnt)
    assert st.f_files == SquashReader(images["mksquashfs"]).superblock.inode_count
    assert not _gone(pid)


def test_lookup_misses_are_negative_entries_the_kernel_keeps(images: dict[str, Path]) -> None:
    """A miss is an entry with inode 0 and a long timeout (not ENOENT), so the kernel caches
    it; a hit carries the long timeouts too."""
    with SquashReader(images["tar2sqfs"]) as reader:
        ops = server.SquashOperations(reader)

        async def ask() -> tuple[object, object]:
            miss = await ops.lookup(1, b"no-such-name", None)  # type: ignore[arg-type]
            hit = await ops.lookup(1, b"etc", None)  # type: ignore[arg-type]
            return miss, hit

        got: list[tuple[object, object]] = []

        async def main() -> None:
            got.append(await ask())

        Loop().run(main())
        miss, hit = got[0]
    assert miss.st_ino == 0 and miss.entry_timeout >= 86400  # type: ignore[attr-defined]
    assert hit.st_ino > 1 and hit.attr_timeout >= 86400  # type: ignore[attr-defined]
    assert stat.S_ISDIR(hit.st_mode)  # type: ignore[attr-defined]


def test_the_loop_hands_results_and_failures_back() -> None:
    """`Loop`: a thread's result or exception goes back to the task that asked; a failing
    task ends its nursery and `run` with its exception; pyfuse3's lock passes in order."""
    loop = Loop(threads=2)
    order: list[int] = []

    async def hold(n: int, lock: object) -> None:
        async with lock:  # type: ignore[attr-defined]
            order.append(n)
            await loop.run_in_thread(time.sleep, 0.01)

    async def fail() -> None:
        raise ValueError("boom")

    async def main() -> None:
        assert await loop.run_in_thread(pow, 2, 10) == 1024
        with pytest.raises(ZeroDivisionError):
            await loop.run_in_thread(divmod, 1, 0)
        lock = loop.Lock()
        async with loop.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(hold, n, lock)
        assert order == [0, 1, 2, 3]
        async with loop.open_nursery() as nursery:
            nursery.start_soon(fail)

    with pytest.raises(ValueError, match="boom"):
        loop.run(main())
    assert order == [0, 1, 2, 3]
    inline = Loop(threads=0)  # --threads=0: everything on the loop's own thread

    async def here() -> None:
        assert await inline.run_in_thread(threading.get_ident) == threading.get_ident()

    inline.run(here())


def _requests_read(pid: int) -> int:
    """How many read calls the server process has made (one per FUSE request it takes)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(": ")
        if key == "syscr":
            return int(value)
    raise AssertionError(f"no syscr in /proc/{pid}/io")


def test_the_kernel_keeps_directory_listings(tmp_path: Path, mounts_: Mounts) -> None:
    """A listing is read from the server once: the next walks are the kernel's alone.

    pyfuse3 3.5.0 cannot ask for it (its opendir reply carries only a handle); scripts/install
    builds it with `cache_readdir` and `keep_cache` set and with no-open support
    (scripts/pyfuse3-cache-dirs.py), so OPENDIR is answered ENOSYS and the kernel keeps the
    listing by itself. With the stock build every listing of this 20,000-entry directory
    takes ~30 requests again.
    """
    tree = tmp_path / "tree"
    (tree / "many").mkdir(parents=True)
    for i in range(20_000):
        (tree / "many" / f"file-with-a-longish-name-{i:05d}").touch()
    image = tmp_path / "many.sqfs"
    _run(["mksquashfs", str(tree), str(image), "-quiet", "-no-progress"])
    mnt, pid = mounts_.serve(image)
    first = _requests_read(pid)
    assert len(os.listdir(mnt / "many")) == 20_000
    cold = _requests_read(pid) - first
    again = []
    for _ in range(3):
        before = _requests_read(pid)
        assert len(os.listdir(mnt / "many")) == 20_000
        again.append(_requests_read(pid) - before)
    assert cold > 100, cold  # the first listing did reach the server
    assert max(again) == 0, (cold, again)  # no OPENDIR/RELEASEDIR either (no-open)


def _settled_requests(pid: int) -> int:
    """`_requests_read` once the server has taken what the kernel sends in the background
    after a close (RELEASE): the count has not moved over three samples 0.3 s apart (one
    quiet 0.3 s is not enough on a loaded machine, where the server can be starved that
    long with a request queued)."""
    last, same = _requests_read(pid), 0
    while same < 3:
        time.sleep(0.3)
        now = _requests_read(pid)
        same = same + 1 if now == last else 0
        last = now
    return last


def _read_all(paths: list[Path], flags: int = 0) -> list[bytes]:
    """Each file's bytes through os.open/os.read (no isatty ioctl, unlike Python's open)."""
    out = []
    for path in paths:
        fd = os.open(path, os.O_RDONLY | flags)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            out.append(b"".join(chunks))
        finally:
            os.close(fd)
    return out


@pytest.mark.parametrize("mode", ["no-open", "open-requests"])
def test_warm_reads_reach_no_server(tmp_path: Path, mounts_: Mounts, mode: str) -> None:
    """A file read again sends the server nothing: no OPEN, RELEASE or READ.

    The pyfuse3 scripts/install builds passes `read` the inode when the file handle is 0,
    so the server answers OPEN and OPENDIR with ENOSYS and the kernel stops sending OPEN,
    RELEASE, OPENDIR and RELEASEDIR and keeps the pages (FOPEN_KEEP_CACHE is its no-open
    default). With ``--open-requests`` (what a stock pyfuse3 must do) every open of a file
    still costs OPEN + RELEASE, and every listing OPENDIR + RELEASEDIR.
    """
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    contents = {f"d/f{i}": os.urandom(i * 3000 + 1) for i in range(20)}
    contents["big"] = os.urandom(3 << 20)
    for name, data in contents.items():
        (tree / name).write_bytes(data)
    image = tmp_path / "t.sqfs"
    _run(["mksquashfs", str(tree), str(image), "-quiet", "-no-progress"])
    extra = ("--open-requests",) if mode == "open-requests" else ()
    mnt, pid = mounts_.serve(image, "fuse", *extra)
    paths = [mnt / name for name in contents]
    before = _settled_requests(pid)
    assert _read_all(paths) == list(contents.values())
    assert len(os.listdir(mnt / "d")) == 20
    cold = _settled_requests(pid) - before
    # One more round before counting: under load a straggler of the cold round (the
    # kernel's asynchronous readahead of "big") could reach the server after the 0.3 s
    # settle and be counted as warm (seen once in CI at load ~5: warm 1).
    assert _read_all(paths) == list(contents.values())
    assert len(os.listdir(mnt / "d")) == 20
    before = _settled_requests(pid)
    for _ in range(3):
        assert _read_all(paths) == list(contents.values())
        assert len(os.listdir(mnt / "d")) == 20
    warm = _settled_requests(pid) - before
    assert cold > len(paths), cold
    if mode == "no-open":
        assert warm == 0, (cold, warm)
    else:  # OPEN + RELEASE per file, OPENDIR + RELEASEDIR per listing, nothing more
        assert warm == 3 * 2 * (len(paths) + 1), (cold, warm)
    # O_DIRECT reads bypass the page cache and still find the file with no open handle.
    assert _read_all([mnt / "big", mnt / "d" / "f7"], os.O_DIRECT) == [
        contents["big"], contents["d/f7"]]
    assert not _gone(pid)


def test_the_kernel_keeps_symlink_targets(tmp_path: Path, mounts_: Mounts) -> None:
    """A symlink is read from the server once (FUSE_CAP_CACHE_SYMLINKS, which stock pyfuse3
    3.5.0 cannot ask for: scripts/pyfuse3-cache-dirs.py): then READLINK never comes again."""
    tree = tmp_path / "tree"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    (tree / "bin").symlink_to("usr/bin")
    (tree / "link").symlink_to("usr/bin/tool")
    image = tmp_path / "t.sqfs"
    _run(["mksquashfs", str(tree), str(image), "-quiet", "-no-progress"])
    mnt, pid = mounts_.serve(image)

    def resolve() -> None:
        assert os.readlink(mnt / "bin") == "usr/bin"
        assert os.readlink(mnt / "link") == "usr/bin/tool"
        assert os.stat(mnt / "bin" / "tool").st_size == 10
        assert (mnt / "link").stat().st_size == 10

    before = _settled_requests(pid)
    resolve()
    cold = _settled_requests(pid) - before
    warm = []
    for _ in range(3):
        before = _settled_requests(pid)
        resolve()
        warm.append(_settled_requests(pid) - before)
    assert cold >= 2, cold  # the READLINKs (and LOOKUPs) did reach the server
    assert warm == [0, 0, 0], (cold, warm)


def test_writes_are_refused_without_open_requests(tmp_path: Path, mounts_: Mounts) -> None:
    """With no OPEN reaching the server, the read-only mount itself refuses every write."""
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"data\n")
    image = tmp_path / "t.sqfs"
    _run(["mksquashfs", str(tree), str(image), "-quiet", "-no-progress"])
    mnt, pid = mounts_.serve(image)
    f = mnt / "d" / "f"
    assert f.read_bytes() == b"data\n"  # the kernel is in no-open mode from here on
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        with pytest.raises(OSError) as err:
            os.open(f, flags)
        assert err.value.errno == errno.EROFS, flags
    for make in (lambda: os.open(mnt / "d" / "new", os.O_WRONLY | os.O_CREAT, 0o644),
                 lambda: os.mkdir(mnt / "d" / "sub"), lambda: os.unlink(f),
                 lambda: os.truncate(f, 0), lambda: os.chmod(f, 0o777),
                 lambda: os.setxattr(f, "user.x", b"1")):
        with pytest.raises(OSError) as err:
            make()
        assert err.value.errno == errno.EROFS
    assert f.read_bytes() == b"data\n"
    assert not _gone(pid)


def test_mount_options_and_process(images: dict[str, Path], mounts_: Mounts) -> None:
    """`start` returns only once the mount answers; options and process name are right."""
    mnt, pid = mounts_.serve(images["mksquashfs"])
    fields = _mountinfo(mnt)
    assert fields is not None
    sep = fields.index("-")
    assert fields[sep + 1] == backend.FSTYPE
    assert fields[sep + 2] == str(images["mksquashfs"])
    options = set(fields[5].split(",")) | set(fields[sep + 3].split(","))
    assert {"ro", "nosuid", "nodev", "default_permissions", "allow_other"} <= options
    assert os.stat(mnt).st_ino == 1
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "squashstore-fs"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert str(images["mksquashfs"]).encode() in cmdline and str(mnt).encode() in cmdline
    assert os.getsid(pid) == pid


def test_the_server_names_itself_without_ctypes() -> None:
    """`set_process_name` writes /proc/self/comm: through ctypes it imported ctypes and ran
    ``ldconfig -p`` in a child process (`ctypes.util.find_library`) before every server
    could answer the kernel's INIT."""
    code = ("import sys; from squashstore.fuse import daemon; "
            "daemon.set_process_name('squashstore-fs-and-more'); "
            "print(open('/proc/self/comm').read().strip(), 'ctypes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["squashstore-fs-", "False"]


def test_command_returns_once_mounted_and_rejects_bad_images(images: dict[str, Path],
                                                           tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    cmd = [sys.executable, "-m", "squashstore.fuse.daemon"]
    bad = tmp_path / "bad.sqfs"
    bad.write_bytes(b"not squashfs" * 100)
    proc = subprocess.run([*cmd, str(bad), str(mnt)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("squashstore: ") and "not a squashfs image" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert _mountinfo(mnt) is None
    try:
        proc = subprocess.run([*cmd, str(images["tar2sqfs"]), str(mnt)], capture_output=True)
        assert proc.returncode == 0, proc.stderr
        # No waiting: when the command returns, the mount answers.
        assert (mnt / "etc" / "config").read_bytes() == b"config\n"
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def test_foreground_serve_logs_and_exits_on_unmount(images: dict[str, Path],
                                                    tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "squashstore.fuse.daemon", "-f",
                             str(images["mksquashfs"]), str(mnt)],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: (mnt / "etc").exists())
        _run(["fusermount3", "-u", str(mnt)])
        assert proc.wait(timeout=15) == 0
        assert "serving" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        if proc.poll() is None:
            proc.kill()


SERVER_HEAVY = ("requests", "urllib3", "squashstore.lazy.image", "squashstore.lazy.remote",
                "squashstore.registry.client", "squashstore.store", "squashstore.mounts",
                "importlib.metadata", "trio", "asyncio", "ctypes")
"""Modules a server of an ordinary (not lazily pulled) image must not import: the
registry client alone was ~260 M instructions (~45 ms) before a mount could answer INIT
(NOTES.md, session 4); the others are the store's and the mount registry's, and
importlib.metadata (email, zipfile, csv, datetime), which pyfuse3 imported for its
`__version__`, and trio (~430 M instructions; through ctypes a forked ``ldconfig -p``),
which pyfuse3 imported although the server runs it on `squashstore.fuse.loop`: both
deferred by scripts/pyfuse3-cache-dirs.py (session 6)."""


def test_the_server_of_an_ordinary_image_imports_no_registry_client(
        images: dict[str, Path], tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m",
                             "squashstore.fuse.daemon", "-f", "--log-file",
                             str(tmp_path / "log"), str(images["mksquashfs"]), str(mnt)],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: (mnt / "etc").exists())
        _run(["fusermount3", "-u", str(mnt)])
        assert proc.wait(timeout=15) == 0
        stderr = proc.stderr.read()  # type: ignore[union-attr]
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        if proc.poll() is None:
            proc.kill()
    imported = {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert {"pyfuse3", "squashstore.fuse.server", "squashstore.squashfs.reader"} <= imported
    assert not imported & set(SERVER_HEAVY), sorted(imported & set(SERVER_HEAVY))


def test_sigterm_unmounts_cleanly(images: dict[str, Path], mounts_: Mounts) -> None:
    mnt, pid = mounts_.serve(images["mksquashfs"])
    assert (mnt / "etc" / "config").read_bytes() == b"config\n"
    os.kill(pid, signal.SIGTERM)
    assert _wait_for(lambda: _mountinfo(mnt) is None)
    assert _wait_for(lambda: _gone(pid))
    assert not (mnt / "etc").exists()
    log = (mounts_.base / "fuse.log").read_text()
    assert "signal 15" in log and "server exits" in log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_detaches_and_a_second_one_ends_the_server(
        signum: int, images: dict[str, Path], mounts_: Mounts) -> None:
    """The first signal unmounts lazily: a file held open keeps being served (the server
    exits when its last user is gone); a second signal ends the server at once."""
    mnt, pid = mounts_.serve(images["mksquashfs"], "fuse", "--cache-size=1")
    want = (mnt / "big" / "large").read_bytes()
    with open(mnt / "big" / "large", "rb", buffering=0) as held:
        os.kill(pid, signum)
        assert _wait_for(lambda: _mountinfo(mnt) is None)
        os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(held.fileno(), 1 << 20, len(want) // 2) == want[len(want) // 2:][:1 << 20]
        assert not _gone(pid)
        os.kill(pid, signum)
        assert _wait_for(lambda: _gone(pid))
        os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(OSError) as err:
            os.pread(held.fileno(), 4096, 0)
        assert err.value.errno == errno.ENOTCONN
    log = (mounts_.base / "fuse.log").read_text()
    assert log.count(f"signal {signum}:") == 2 and "server exits" in log
    assert "Traceback" not in log


def test_sigkill_leaves_a_dead_mount_that_lazy_fusermount_clears(images: dict[str, Path],
                                                                 mounts_: Mounts) -> None:
    mounter = backend.FuseMounter()
    mnt, pid = mounts_.serve(images["mksquashfs"])
    assert mounter.is_alive(mnt)
    os.kill(pid, signal.SIGKILL)
    assert _wait_for(lambda: _gone(pid))
    with pytest.raises(OSError) as err:
        os.statvfs(mnt)
    assert err.value.errno == errno.ENOTCONN
    with pytest.raises(OSError) as err:
        os.listdir(mnt / "etc")
    assert err.value.errno == errno.ENOTCONN
    assert not mounter.is_alive(mnt)
    mounter.umount(mnt, lazy=True)
    assert _mountinfo(mnt) is None
    assert os.stat(mnt).st_ino != 1


def _corrupt_first_block(image: Path, path: str) -> None:
    with SquashReader(image) as reader:
        node = reader.resolve(path)
        pos, word = reader.block_layout(node, 1)
    assert not word & (1 << 24), "the block must be compressed"
    with open(image, "r+b") as f:
        f.seek(pos)
        f.write(b"\xde\xad\xbe\xef" * 4)


def test_corrupt_block_gives_eio_and_the_server_stays_up(tree: Path, tmp_path: Path,
                                                         mounts_: Mounts) -> None:
    image = tmp_path / "corrupt.sqfs"
    _run(["mksquashfs", str(tree), str(image), "-comp", "zstd", "-quiet", "-no-progress"])
    _corrupt_first_block(image, "big/large")
    mnt, pid = mounts_.serve(image)
    with open(mnt / "big" / "large", "rb") as f:
        assert len(f.read(4096)) == 4096
        f.seek(200_000)
        with pytest.raises(OSError) as err:
            f.read(4096)
        assert err.value.errno == errno.EIO
    assert (mnt / "etc" / "config").read_bytes() == b"config\n"
    assert (mnt / "big" / "zeros").read_bytes() == bytes(1 << 20)
    assert not _gone(pid)
    assert "block 1" in (mounts_.base / "fuse.log").read_text()


def test_corrupt_directory_listing_gives_eio_and_the_server_stays_up(
        tree: Path, tmp_path: Path, mounts_: Mounts) -> None:
    image = tmp_path / "corrupt-dir.sqfs"
    _run(["mksquashfs", str(tree), str(image), "-comp", "zstd", "-quiet", "-no-progress"])
    with SquashReader(image) as reader:
        many = reader.resolve("many")
        first = reader.superblock.directory_table + many.dir_block
    with open(image, "r+b") as f:
        f.seek(first)
        size = int.from_bytes(f.read(2), "little") & 0x7FFF
        second = first + 2 + size  # wholly inside the 3000-entry listing of /many
        f.seek(second)
        assert int.from_bytes(f.read(2), "little") & 0x8000 == 0, "must be compressed"
        f.write(b"\xde\xad\xbe\xef" * 4)
    mnt, pid = mounts_.serve(image)
    with pytest.raises(OSError) as err:
        os.listdir(mnt / "many")
    assert err.value.errno == errno.EIO
    with pytest.raises(OSError) as err:
        os.stat(mnt / "many" / "f2999")
    assert err.value.errno == errno.EIO
    assert (mnt / "etc" / "config").read_bytes() == b"config\n"
    assert not _gone(pid)
    assert "directory table metadata block" in (mounts_.base / "fuse.log").read_text()


@pytest.mark.parametrize("threads", [3, 0])
def test_parallel_reads_of_many_files(threads: int, images: dict[str, Path], tree: Path,
                                      mounts_: Mounts) -> None:
    mnt, pid = mounts_.serve(images["mksquashfs"], "fuse", "--cache-size=1",
                             f"--threads={threads}")
    names = ["big/large", "big/sparse", "big/zeros", *(f"many/f{i}" for i in range(0, 400, 7))]
    want = {n: hashlib.sha256((tree / n).read_bytes()).hexdigest() for n in names}
    got: dict[str, str] = {}

    def worker(part: list[str]) -> None:
        for n in part:
            got[n] = hashlib.sha256((mnt / n).read_bytes()).hexdigest()

    workers = [threading.Thread(target=worker, args=(names[i::4],)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert got == want
    # Concurrent requests wait in the kernel's queue: data blocks went to worker threads.
    server_threads = len(os.listdir(f"/proc/{pid}/task"))
    assert server_threads > 1 if threads else server_threads == 1


def test_fuse_backend_in_the_mount_registry(images: dict[str, Path], mounts_: Mounts) -> None:
    assert mounts.default_backend() == "fuse"
    assert isinstance(mounts.mounter("fuse"), backend.FuseMounter)
    assert isinstance(mounts.mounter_for_fstype(backend.FSTYPE), backend.FuseMounter)
    mnt = mounts_.base / "registry"
    mnt.mkdir(parents=True)
    mounter = backend.FuseMounter()
    pid = mounter.mount(images["tar2sqfs"], mnt)
    assert pid is not None
    mounts_.fuse.append((mnt, pid))
    assert mounter.is_alive(mnt)
    with open(mnt / "etc" / "config", "rb"):
        with pytest.raises(mounts.MountError) as err:
            mounter.umount(mnt, lazy=False)
        assert isinstance(err.value.__cause__, OSError)
        assert err.value.__cause__.errno == errno.EBUSY
    mounter.umount(mnt, lazy=False)
    assert _mountinfo(mnt) is None
    assert _wait_for(lambda: _gone(pid))


def _serve_command(*argv: str) -> int:
    """Run the ``serve`` command module the way cli/main.py dispatches it."""
    import argparse

    from squashstore.cli import serve

    parser = argparse.ArgumentParser(prog="squashstore")
    serve.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", *argv])
    code: int = args.func(args)
    return code


def test_serve_command(images: dict[str, Path], tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    with pytest.raises(daemon.ServeError, match="no such squash file"):
        _serve_command(str(tmp_path / "missing.sqfs"), str(mnt))
    with pytest.raises(daemon.ServeError, match="cache-size"):
        _serve_command("--cache-size=0", str(images["tar2sqfs"]), str(mnt))
    try:
        assert _serve_command("--cache-size=4", str(images["tar2sqfs"]), str(mnt)) == 0
        assert (mnt / "hardlinks" / "b").read_bytes() == b"linked\n"
        assert backend.FuseMounter().is_alive(mnt)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert _wait_for(lambda: _mountinfo(mnt) is None)


def test_overlay_over_the_mount(images: dict[str, Path], tmp_path: Path,
                                mounts_: Mounts) -> None:
    """As podman uses it: the mount as an overlay lower layer, with copy-up on write."""
    mnt, _ = mounts_.serve(images["mksquashfs"])
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    _run(["mount", "-t", "overlay", "overlay", "-o",
          f"lowerdir={mnt},upperdir={upper},workdir={work}", str(merged)])
    try:
        assert diff_listings(canonical_from_dir(mnt), canonical_from_dir(merged),
                             ignore_root_mtime=True) == []
        with open(merged / "special" / "user-xattrs", "ab") as f:
            f.write(b"more\n")
        assert (upper / "special" / "user-xattrs").read_bytes() == b"x\nmore\n"
        assert os.getxattr(upper / "special" / "user-xattrs", "user.binary") == XATTR_BINARY
        assert (mnt / "special" / "user-xattrs").read_bytes() == b"x\n"
    finally:
        subprocess.run(["umount", "-l", str(merged)], capture_output=True)
