"""adv7 (session 6): the poststop hook's fast exit and the FUSE server's own loop, attacked.

Real podman (the hermetic harness), the real installed hook, real FUSE mounts: what a
hostile or merely unlucky user can do to the two mechanisms that landed in session 6
(NOTES.md, "adv7 (session 6)").
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_cleanup import A, _wait_until, base_image, setup_store  # noqa: F401 (a fixture)
from test_fuse import Mounts, _gone, _mountinfo, _wait_for, images, mounts_, tree  # noqa: F401
from test_hook import _modules_opened, _traced_hook
from test_store import SqLayer

from squashstore import host, tracker
from squashstore.image import Image

pytestmark = pytest.mark.root


def test_the_fast_exit_never_skips_an_image_built_on_a_store_image(
        tmp_path: Path, base_image: tuple[Image, SqLayer]) -> None:  # noqa: F811 (fixture)
    """An image built FROM a store image has its own layers in podman's graphroot, all of
    them local but the store layer at the bottom: the hook must take its full path and
    unmount the store image's mount when the container stops."""
    with setup_store(tmp_path, base_image, hooks=True) as s:
        log = tmp_path / "hook.trace"
        _traced_hook(tmp_path / "hooks.d", log)
        context = tmp_path / "ctx"
        context.mkdir()
        (context / "extra").write_text("on top\n")
        (context / "Containerfile").write_text(f"FROM {A}\nCOPY extra /extra\n"
                                               "COPY extra /extra2\n")
        s.podman("build", "--pull=never", "-t", "localhost/ontop:1", str(context))
        layers = json.loads((Path(s.consumer.graphroot) / "overlay-layers" /
                             "layers.json").read_text())
        assert len(layers) >= 2, "the built image's layers are the graphroot's"
        assert s.podman("run", "--rm", "--pull=never", "localhost/ontop:1", "cat",
                        "/extra2", "/etc/config") == "on top\nbase config"
        _wait_until(lambda: s.mounted() == set())
        assert {"hook", "cleanup", "tracker"} <= _modules_opened(log)


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _read(path: Path, mode: str) -> bytes:
    if mode == "direct":  # O_DIRECT: every read reaches the server, page-aligned buffer
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            buf, out = mmap.mmap(-1, 1 << 20), bytearray()
            while (n := os.readv(fd, [buf])) > 0:
                out += buf[:n]
            return bytes(out)
        finally:
            os.close(fd)
    if mode == "mmap":
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)[:] if size else b""
    return path.read_bytes()


@pytest.mark.parametrize("threads", [0, 4])
def test_the_loop_under_parallel_readers_a_killed_reader_and_signals(
        threads: int, images: dict[str, Path], tree: Path,  # noqa: F811 (fixtures)
        mounts_: Mounts) -> None:  # noqa: F811 (a fixture)
    """32 processes reading the same and different files (plain, O_DIRECT, mmap) while
    another reader is SIGKILLed mid-read and 3,000 missing names are looked up: every byte
    right, no request hangs, no CPU at idle; then readers holding files across a SIGTERM
    (detached, still served) and a second one (ENOTCONN, or ECONNABORTED for a read in
    flight at that moment; no reader hangs, server gone)."""
    mnt, pid = mounts_.serve(images["mksquashfs"], "fuse", "--cache-size=1",
                             f"--threads={threads}")
    names = ["big/large", "big/sparse", "big/zeros", *(f"many/f{i}" for i in range(0, 3000, 97))]
    want = {n: hashlib.sha256((tree / n).read_bytes()).hexdigest() for n in names}
    killed = subprocess.Popen(["sh", "-c", f"while :; do cat {mnt}/big/large {mnt}/big/sparse"
                               " >/dev/null; done"], start_new_session=True)
    children = []
    for i in range(32):
        child = os.fork()
        if child == 0:  # pragma: no cover (child)
            bad = 100  # an exception in the child must never unwind into pytest
            try:
                mode = ("plain", "direct", "mmap")[i % 3]
                part = names[i % 4::4] if i % 2 else names
                bad = sum(hashlib.sha256(_read(mnt / n, mode)).hexdigest() != want[n]
                          for n in part)
            finally:
                os._exit(min(bad, 100))
        children.append(child)
    time.sleep(0.3)
    os.killpg(killed.pid, signal.SIGKILL)  # the shell and the cat it runs, mid-read
    killed.wait()
    deadline = time.monotonic() + 120
    bad = []
    for child in children:
        while (done := os.waitpid(child, os.WNOHANG))[0] == 0:
            assert time.monotonic() < deadline, "a reader hangs"
            time.sleep(0.05)
        bad.append(os.waitstatus_to_exitcode(done[1]))
    assert bad == [0] * 32
    for i in range(3000):
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "many" / f"missing{i}")
    before = _cpu_ticks(pid)
    time.sleep(2)
    # A spinning server burns ~200 ticks in 2 s; a stray late request (a FORGET) a few.
    assert _cpu_ticks(pid) - before <= 10, "the server spins at idle"

    data = (tree / "big" / "large").read_bytes()
    fds = [os.open(mnt / "big" / "large", os.O_RDONLY) for _ in range(8)]
    phase = [1]
    errors: dict[int, set[str]] = {i: set() for i in range(len(fds))}
    stop = threading.Event()

    def reader(i: int) -> None:
        n = 0
        while not stop.is_set():
            os.posix_fadvise(fds[i], 0, 0, os.POSIX_FADV_DONTNEED)
            off = (n * 131072 * (i + 1)) % len(data)
            try:
                got = os.pread(fds[i], 1 << 17, off)
                if got != data[off:off + (1 << 17)][:len(got)] or (
                        phase[0] == 1 and len(got) != len(data[off:off + (1 << 17)])):
                    errors[i].add(f"wrong data in phase {phase[0]}")
            except OSError as exc:
                errors[i].add(f"{errno.errorcode[exc.errno]} in phase {phase[0]}")
            n += 1

    readers = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(len(fds))]
    try:
        for t in readers:
            t.start()
        time.sleep(0.5)
        os.kill(pid, signal.SIGTERM)
        assert _wait_for(lambda: _mountinfo(mnt) is None), "the first signal detaches"
        time.sleep(0.5)  # the readers go on through the detached mount
        assert not _gone(pid)
        phase[0] = 2
        os.kill(pid, signal.SIGTERM)
        assert _wait_for(lambda: _gone(pid))
        assert _wait_for(lambda: any(errors.values())), "no read failed after the server ended"
        stop.set()
        for t in readers:
            t.join(20)
        assert not any(t.is_alive() for t in readers), "a reader hangs after the server ended"
    finally:
        stop.set()
        for fd in fds:
            os.close(fd)
    # The second signal ends the server at once: the kernel fails a read it had already
    # handed to the server with ECONNABORTED (fuse_abort_conn), every later one with ENOTCONN.
    ended = {"ENOTCONN in phase 2", "ECONNABORTED in phase 2"}
    assert all(e <= ended for e in errors.values()), errors


def test_the_root_hook_never_swallows_a_huge_file_a_user_plants_as_a_podman_record(
        tmp_path: Path) -> None:
    """A user can make root's hook (and cleanup) read their directory as a podman store: a
    mount of their own (fusermount3) on ``<dir>/overlay/<x>/merged`` makes ``<dir>`` a
    graphroot the tracker reads, with owner=None (through symlinks). A layers.json that is
    a symlink to a 64 GiB sparse file was read whole (MemoryError, or the machine's memory
    and minutes while podman waits for the hook): it must be refused unread."""
    user_root = tmp_path / "user"
    merged = user_root / "overlay" / "x" / "merged"
    merged.mkdir(parents=True)
    (user_root / "overlay-layers").mkdir()
    (user_root / "overlay-containers").mkdir()
    sparse = user_root / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(64 << 30)
    (user_root / "overlay-layers" / "layers.json").symlink_to(sparse)
    (user_root / "overlay-containers" / "containers.json").symlink_to(sparse)
    for path in [user_root, *user_root.rglob("*")]:
        os.lchown(path, 65534, 65534)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(merged)], check=True)
    try:
        assert str(user_root) in tracker.graphroots_mounted(host.mount_table())
    finally:
        subprocess.run(["umount", "-l", str(merged)], check=True)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30));"
            "from squashstore import tracker; from squashstore.config import PodmanStore;"
            f"v = tracker.StoreView.read(PodmanStore({str(user_root)!r}));"
            "print(v.parents, v.containers)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "{} {}\n", "")
