"""Root on a store another user can write (issue 10 #2 and #3): an unprivileged user
(``sqsevil``, made here; never ``sqsuser``, which the rootless test owns) with write access
to a store plants symlinks in ``diff``, in ``overlay/`` and in ``squashstore/``, and root's
``mount``, ``umount``, ``gc``, ``rmi``, ``cleanup``, ``verify`` and the mount program
neither mount, unmount, read nor delete anything outside the store. Real mounts: a tmpfs is
the unrelated mount, FIFOs are the files nobody may read (opening one blocks, so a read
shows as a timeout), and /proc/self/mountinfo and the file system are checked after each
command. Also the rule itself (`squashstore.trust`) and the guards below it.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_store import IMAGE, Env, cli, images, publish, store_setup, write_wrapper

from squashstore import host, trust
from squashstore.mounts import Registry
from squashstore.store import link_name
from support.podman import Podman, mounts_below

__all__ = ["images"]  # the module fixture, imported for its use here

EVIL = "sqsevil"
PYTHON_MOUNT_PROGRAM = "squashstore-mount-program"


def _evil_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(EVIL)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", EVIL],
                       check=True, capture_output=True)
        return pwd.getpwnam(EVIL)


def as_evil(*argv: str) -> None:
    subprocess.run(["runuser", "-u", EVIL, "--", *argv], check=True, capture_output=True,
                   timeout=30)


@dataclass
class Scene:
    env: Env
    base: Path
    layer: str
    victim: Path
    """A directory outside the store whose ``diff`` is an unrelated tmpfs mount."""
    target: Path
    """A directory outside the store a planted ``diff`` symlink points at."""
    fifo: Path
    """A FIFO outside the store: reading it blocks."""

    def outside(self) -> dict[str, object]:
        """What must not change: mounts outside the store (below this test's directory, and
        the whole table's file systems by device: other tests run meanwhile) and the files."""
        store = str(self.env.store.root)
        points = {p for p in mounts_below(self.base) if not p.startswith(store + "/")}
        points |= {f"{e.device} {e.fstype}" for e in host.read_mountinfo()
                   if e.fstype in ("squashfs", "tmpfs") and not e.mountpoint.startswith(
                       store + "/") and e.mountpoint.startswith(str(self.base))}
        files = {str(p): p.read_bytes() for p in (self.victim / "diff" / "precious",
                                                   self.target / "passwd")}
        return {"mounts": points, "files": files, "fifo": stat.S_ISFIFO(
            os.lstat(self.fifo).st_mode)}


@pytest.fixture
def scene(podman: Podman, make_podman: Any, images: Any) -> Iterator[Scene]:
    user = _evil_user()
    # Below /tmp (sticky, root's), so the user can reach the store; pytest's tmp dirs are 0700.
    base = Path(tempfile.mkdtemp(prefix="sqssec-", dir="/tmp"))
    os.chmod(base, 0o755)
    victim = base / "victim"
    (victim / "diff").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "sqssec-victim",
                    str(victim / "diff")], check=True)
    (victim / "diff" / "precious").write_bytes(b"unrelated data\n")
    target = base / "target"
    target.mkdir()
    (target / "passwd").write_bytes(b"root:x:0:0\n")
    fifo = base / "fifo"
    os.mkfifo(fifo)
    try:
        with store_setup(base / "work", podman, make_podman, images) as env:
            image = publish(env)
            yield Scene(env, base, image.layer, victim, target, fifo)
    finally:
        for point in mounts_below(base):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)
        assert user


def _plant(s: Scene) -> None:
    """The user gets write access (as a careless site gives it) and plants symlinks."""
    store = s.env.store
    cli(store.root, "umount", "--all", env=s.env.env)
    for path in (store.overlay, store.overlay / s.layer, store.meta, store.squash_dir):
        os.chown(path, pwd.getpwnam(EVIL).pw_uid, -1)
    lid = s.layer
    as_evil("mv", str(store.overlay / lid / "diff"), str(store.overlay / lid / "diff.old"))
    as_evil("ln", "-s", str(s.target), str(store.overlay / lid / "diff"))
    as_evil("ln", "-s", str(s.victim), str(store.overlay / "evil"))
    as_evil("mv", str(store.squash_file(lid)), str(store.squash_dir / "moved"))
    as_evil("ln", "-s", str(s.fifo), str(store.squash_file(lid)))
    as_evil("ln", "-s", str(s.fifo), str(store.meta / "format-version.evil"))


def _one_line_refusal(proc: subprocess.CompletedProcess[str], prefix: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr
    assert "refusing" in lines[0], proc.stderr


def test_root_never_acts_outside_a_store_others_can_write(scene: Scene) -> None:
    s = scene
    store = s.env.store
    _plant(s)
    before = s.outside()
    commands = [["mount", IMAGE], ["umount", IMAGE], ["umount", "--all"], ["gc"],
                ["rmi", "--force", IMAGE], ["verify"], ["cleanup", "--grace", "0"],
                ["migrate", IMAGE], ["images"]]
    for args in commands:
        proc = cli(store.root, *args, env=s.env.env, check=False)
        if args[0] in ("umount", "cleanup") and proc.returncode == 0:
            # Nothing recorded to act on: fine, as long as nothing outside changed.
            assert "unmounted" not in proc.stdout, (args, proc.stdout)
        else:
            _one_line_refusal(proc, "squashstore: ")
        assert s.outside() == before, args
    # The mount program, as rootful podman calls it for a container of the image.
    program = write_wrapper(s.base / "program", {k: v for k, v in s.env.env.items()
                                                 if k.startswith("SQUASHSTORE_")})
    upper, work, merged = (s.base / n for n in ("ovl-upper", "ovl-work", "ovl-merged"))
    for d in (upper, work, merged):
        d.mkdir()
    short = store.links / link_name(s.layer)
    for lower in (short, store.overlay / "evil" / "diff", store.overlay / s.layer / "diff"):
        proc = subprocess.run([str(program), "-o", f"lowerdir={lower},upperdir={upper},"
                               f"workdir={work}", str(merged)], capture_output=True,
                              text=True, timeout=60, env=s.env.env, check=False)
        assert proc.returncode != 0, (lower, proc.stderr)
        assert not host.is_mountpoint(merged), lower
        assert s.outside() == before, lower
    # Everything outside is as it was; the planted links are still only links.
    assert (s.victim / "diff" / "precious").read_bytes() == b"unrelated data\n"
    assert not host.is_mountpoint(s.target)
    assert sorted(os.listdir(s.target)) == ["passwd"]
    assert (store.overlay / "evil").is_symlink()


def test_guards_below_the_rule(scene: Scene) -> None:
    """Even on a store that passes the rule, the registry mounts only on a real directory
    reached without symlinks and unmounts only squash mounts reached that way."""
    s = scene
    store = s.env.store
    registry = Registry(s.env.store.root.parent / "run")
    image = store.resolve(IMAGE)
    link = s.base / "link-to-victim"
    link.symlink_to(s.victim)
    before = s.outside()
    with pytest.raises(trust.UnsafeStore, match="symlink"):
        registry.umount(link / "diff")
    with pytest.raises(trust.UnsafeStore, match="tmpfs file system, not a squash mount"):
        registry.umount(s.victim / "diff")
    with pytest.raises(trust.UnsafeStore, match="symlink"):
        registry.ensure_mounted(image.id, image.layer, image.squash, link / "diff")
    with pytest.raises(trust.UnsafeStore, match="refusing to use it"):
        registry.ensure_mounted(image.id, image.layer, s.fifo, s.target)
    assert s.outside() == before
    # umount reports success only when the mount is gone.
    assert registry.umount(image.diff)
    assert not host.is_mountpoint(image.diff)


def test_the_rule(tmp_path: Path) -> None:
    """What `trust.check_tree` refuses, as root: group/other-writable entries, entries of
    another owner, symlinks outside overlay/l, a non-sticky world-writable ancestor."""
    root = tmp_path / "s"
    (root / "overlay" / "l").mkdir(parents=True)
    (root / "overlay" / "l" / "X").symlink_to("../abc/diff")
    (root / "squashstore").mkdir()
    trust.check_tree(root)
    os.chmod(root / "squashstore", 0o775)
    with pytest.raises(trust.UnsafeStore, match="writable by group or others"):
        trust.check_tree(root)
    os.chmod(root / "squashstore", 0o755)
    (root / "squashstore" / "f").write_text("")
    os.chown(root / "squashstore" / "f", 1, 1)
    with pytest.raises(trust.UnsafeStore, match="owned by uid 1"):
        trust.check_tree(root)
    os.unlink(root / "squashstore" / "f")
    (root / "overlay" / "x").symlink_to("/etc")
    with pytest.raises(trust.UnsafeStore, match="is a symlink"):
        trust.check_tree(root)
    os.unlink(root / "overlay" / "x")
    os.chmod(tmp_path, 0o777)
    with pytest.raises(trust.UnsafeStore, match="not root's alone"):
        trust.check_tree(root)
    os.chmod(tmp_path, 0o1777)
    trust.check_tree(root)
