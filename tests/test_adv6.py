"""Adversarial checks of registries, Slurm and the store's own operations (session 6, adv6).

Each test here failed against main f2ef3da and names what it holds. Real parts: a real
other user (``sqsuser``) for what another user can write, the real registry
(``docker-registry``) for what a registry can send, the real CLI as users run it.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from pathlib import Path

from test_store import cli

OTHER_USER = "sqsuser"
"""A real unprivileged user of this machine (scripts/install creates it)."""


def _one_line(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("squashstore: ") and proc.stderr.count("\n") == 1, \
        proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def _tree(path: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry below `path` (and `path`): mode and content, lstat-ed."""
    out = {}
    for entry in [path, *sorted(path.rglob("*"))]:
        st = os.lstat(entry)
        data = entry.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        out[str(entry.relative_to(path))] = (st.st_mode, data)
    return out


def test_root_never_creates_a_store_through_another_users_directory(tmp_path: Path) -> None:
    """A careless root picks a store path in a world-writable directory (``/tmp/x``) that
    another user created first, with ``overlay-images`` a symlink to a private directory
    of root's. `init` (and every writer, which inits first) made that directory 0755 and
    wrote images.json and images.lock into it, before any trust check ran. It must
    refuse, touching nothing outside the store."""
    user = pwd.getpwnam(OTHER_USER)
    public = tmp_path / "tmp"
    public.mkdir()
    os.chmod(public, 0o1777)  # like /tmp
    victim = tmp_path / "private"
    victim.mkdir(mode=0o700)
    (victim / "secret").write_text("root's")
    before = _tree(victim)
    for planted in ("overlay-images", "squashstore"):
        store = public / f"store-{planted}"
        store.mkdir()
        (store / planted).symlink_to(victim)
        for path in (store, store / planted):
            os.lchown(path, user.pw_uid, user.pw_gid)
        proc = cli(store, "init", check=False)
        _one_line(proc, "refusing to act as root")
        assert _tree(victim) == before
    # below a directory the other user owns, even a store not yet there
    theirs = public / "theirs"
    theirs.mkdir()
    os.chown(theirs, user.pw_uid, user.pw_gid)
    _one_line(cli(theirs / "store", "init", check=False), "refusing to act as root")
    assert not (theirs / "store").exists()
