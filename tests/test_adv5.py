"""Adversarial checks of the mount program's fast path (session 5, helper adv5).

Each test here failed against the fast path as merged (main 09e3742) and names what it
holds: the str-path, `_thread` and `os.lockf` rewrites must keep the old semantics.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_fast
import test_store
from test_store import Env, SqLayer, images, publish, store_setup

from squashstore import config, host, launcher, locking
from squashstore.mountrecords import RecordRegistry
from squashstore.mounts import Registry
from squashstore.store import Store
from support.podman import Podman

__all__ = ["images"]  # the module-scoped fixture, shared with test_store


def _wait_for_lock_under_signals(path: Path, take: str) -> int:
    """Fork a child with a Python handler for SIGUSR1 that waits for `path`'s lock (held
    here) by `take` ("ours": `locking.exclusive`, "fcntl": ``fcntl.lockf``); signal it
    while it waits, then release. The child's exit status: 0 when it got the lock."""
    ready_r, ready_w = os.pipe()
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.lockf(holder, fcntl.LOCK_EX)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        status = 1
        try:
            os.close(ready_r)
            signal.signal(signal.SIGUSR1, lambda *_: None)
            os.write(ready_w, b"x")
            if take == "ours":
                with locking.exclusive(path):
                    status = 0
            else:
                fd = os.open(path, os.O_RDWR)
                fcntl.lockf(fd, fcntl.LOCK_EX)
                status = 0
        finally:
            os._exit(status)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        time.sleep(0.3)  # the child is in its lock call by now
        for _ in range(3):
            os.kill(pid, signal.SIGUSR1)
            time.sleep(0.1)
    finally:
        os.close(holder)
        os.close(ready_r)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_signal_does_not_break_a_wait_for_the_lock(tmp_path: Path) -> None:
    """`locking.exclusive` waits through a signal whose Python handler returns, as the
    ``fcntl.lockf`` it replaced did (PEP 475 retries EINTR there; ``os.lockf`` raised
    InterruptedError): a process with a signal handler (or a thread that happens to get a
    signal) must not fail to take the registry's or the store's lock."""
    assert _wait_for_lock_under_signals(tmp_path / "old", "fcntl") == 0  # the old behaviour
    assert _wait_for_lock_under_signals(tmp_path / "lock", "ours") == 0


def test_the_launcher_installs_in_a_path_with_a_blank(tmp_path: Path) -> None:
    """scripts/install in a checkout whose path has a blank (or is too long for a
    shebang) still gets a working, isolated launcher (before the launcher, pip's console
    script worked there; the launcher refused, failing the install's last step): the
    interpreter is then started through ``/bin/sh``, as pip does, still ``-I -S``."""
    real = Path(sys.executable).parent.parent  # this venv, reached by other paths:
    blank = tmp_path / "my venv"
    long = tmp_path / ("d" * 150) / ("e" * 100)
    long.parent.mkdir()
    planted = tmp_path / "planted"
    (planted / "squashstore").mkdir(parents=True)
    (planted / "squashstore" / "__init__.py").write_text("raise SystemExit('planted')\n")
    env = {**os.environ, "PYTHONPATH": str(planted)}
    for n, venv in enumerate((blank, long)):
        os.symlink(real, venv)
        python = venv / "bin" / "python"
        target = tmp_path / "bin" / f"program{n}"
        target.parent.mkdir(exist_ok=True)
        proc = subprocess.run([str(python), "-I", "-m", "squashstore.launcher", str(target)],
                              capture_output=True, text=True, check=False, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        text = target.read_text()
        assert text.startswith("#!/bin/sh\n") and f"'{python}' -IS \"$0\"" in text, text
        run = subprocess.run([str(target), "--version"], env=env, cwd=planted,
                             capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(f"{launcher.NAME} version "), run.stdout
    for bad in ("/a ' quote/python", "/a\nnewline/python", "relative/python",
                "/a\\x/python"):
        with pytest.raises(ValueError):
            launcher.script(bad, ["/x"])


def _bad_config(env: Env, case: str) -> Callable[[], None]:
    """Break the configuration the mount program reads as `case` says; returns the undo."""
    config = Path(env.env["SQUASHSTORE_CONFIG"])
    if case == "config cache another user's":
        cache = env.runtime_dir / "config.json"
        assert cache.exists()  # the setup's runs wrote it
        st = os.lstat(cache)
        os.lchown(cache, test_fast._evil_uid(), -1)
        return lambda: os.lchown(cache, st.st_uid, st.st_gid)
    assert case == "config file with a bad value"
    old = config.read_text()
    config.write_text(old.replace('overlay = "auto"', 'overlay = "bogus"'))
    return lambda: config.write_text(old)


def test_a_refused_configuration_mounts_and_records_nothing(
        tmp_path: Path, podman: Podman, make_podman: Any,
        images: dict[str, SqLayer]) -> None:
    """A 12th refusal for test_fast's list: the registry's config cache another user's
    (refused as root), or a config file with a bad value. The program refused them only
    after it had mounted the layer (slow path) or added the container to the record (fast
    path): a container that never starts left a mount and a recorded use behind. Now, as
    for the other refusals, nothing is mounted or recorded, in both states."""
    assert host.is_real_root()
    path = test_fast.stub_path(tmp_path)
    with store_setup(tmp_path / "w", podman, make_podman, images, "kernel", "auto") as env:
        image = publish(env, mount=False)
        registry = Registry(env.runtime_dir)
        merged = tmp_path / "c"
        for case in ("config cache another user's", "config file with a bad value"):
            for state in ("mounted", "unmounted"):
                if state == "mounted":
                    registry.ensure_mounted(image.id, image.layer, image.squash, image.diff)
                else:
                    registry.umount(image.diff)
                # a good run first: it writes the config cache for these config files
                proc = test_fast.run_program(env, image.layer, tmp_path / "ok", path)
                assert proc.returncode == 0, proc.stderr
                if state == "unmounted":
                    registry.umount(image.diff)
                before = registry.record(image.diff)
                undo = _bad_config(env, case)
                try:
                    proc = test_fast.run_program(env, image.layer, merged, path)
                finally:
                    undo()
                assert proc.returncode == 1, (case, state, proc.stderr)
                lines = proc.stderr.splitlines()
                assert len(lines) == 1, (case, state, lines)
                assert host.is_mountpoint(image.diff) == (state == "mounted"), (case, state)
                assert registry.record(image.diff) == before, (case, state)


def test_the_fast_path_takes_any_spelling_podman_may_pass(
        tmp_path: Path, podman: Podman, make_podman: Any,
        images: dict[str, SqLayer]) -> None:
    """The str-path rewrite against the pathlib code: a lowerdir spelled with ``//``, a
    trailing slash or ``.``, relative to the working directory (podman runs the program in
    its graph root), and a merged directory with non-UTF-8 bytes: each is the store layer,
    the fast path records the container under the normalised merged path."""
    path = test_fast.stub_path(tmp_path)
    with store_setup(tmp_path / "w", podman, make_podman, images, "kernel", "auto") as env:
        image = publish(env)
        registry = Registry(env.runtime_dir)
        links = env.store.links
        link = (env.store.overlay / image.layer / "link").read_text()
        spellings = [f"{links}//{link}/", f"{links}/./{link}", f"{links}/../l/{link}",
                     f"overlay/l/{link}", f"{env.store.root}//overlay/{image.layer}/diff/"]
        for n, lowerdir in enumerate(spellings):
            merged = tmp_path / f"c{n}-\udcff"
            proc = subprocess.run(
                [str(test_fast.VENV_PROGRAM), "-o",
                 f"lowerdir={lowerdir},upperdir={tmp_path}/u,workdir={tmp_path}/w", str(merged)],
                env={**env.env, "PATH": path}, cwd=env.store.root, capture_output=True,
                text=True, timeout=120, check=False)
            assert proc.returncode == 0, (lowerdir, proc.stderr)
            record = registry.record(image.diff)
            assert record is not None and record.users[-1].merged == str(merged), lowerdir


def _other_user_can_lock(path: str) -> bool:
    """Whether the hostile user of test_fast can take any lock on `path` (a read lock is
    enough to make root's write lock wait forever)."""
    uid = test_fast._evil_uid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        status = 1
        try:
            os.setgid(uid)
            os.setuid(uid)
            fd = os.open(path, os.O_RDONLY)
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            status = 0
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_another_user_cannot_hold_the_registry_lock() -> None:
    """As root, the mount registry's lock file was 0644 in a 0755 directory (/run/
    squashstore): any local user could open it read-only and hold a read lock, and every
    container start (the mount program waits for the write lock), cleanup and mount then
    hung until that user let go. The lock is root's alone (0600), also when an older
    version made it 0644."""
    assert host.is_real_root()
    top = tempfile.mkdtemp(dir="/run", prefix="adv5-")  # reachable by others, as /run is
    try:
        os.chmod(top, 0o755)
        registry = RecordRegistry(os.path.join(top, "squashstore"))
        with registry.locked():
            pass
        assert not _other_user_can_lock(registry.lock_path)
        os.chmod(registry.lock_path, 0o644)  # an older version's
        assert _other_user_can_lock(registry.lock_path)  # (the check can fail)
        with registry.locked():
            pass
        assert not _other_user_can_lock(registry.lock_path)
        assert stat.S_IMODE(os.stat(registry.lock_path).st_mode) == 0o600
    finally:
        shutil.rmtree(top)


def test_the_config_cache_sees_a_file_replaced_with_the_same_size_and_mtime(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mount program's config cache (and the in-process one) stood for the config
    files while their (path, mtime, size) stayed the same: a file replaced by one of the
    same size whose mtime was kept (``cp -p``, ``rsync -t``, ``install -p``, a package or
    an image unpacked with its times) kept the old settings for every container start.
    The stamp now also has the inode and the change time (which no one can set)."""
    path, cache = tmp_path / "config.toml", tmp_path / "config.json"
    path.write_text('[mount]\noverlay = "kernel"\n')
    monkeypatch.setenv("SQUASHSTORE_CONFIG", str(path))
    config._loaded.clear()
    assert config.load(cache).mount.overlay == "kernel"
    old = os.stat(path)
    new = tmp_path / "config.toml.new"
    new.write_text('[mount]\noverlay = "auto"  \n')
    assert new.stat().st_size == old.st_size
    os.utime(new, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(new, path)
    assert config.load(cache).mount.overlay == "auto"  # this process
    config._loaded.clear()  # a new one, with the cache
    assert config.load(cache).mount.overlay == "auto"


def test_a_refused_layer_leaves_the_other_layers_unrecorded(
        tmp_path: Path, podman: Podman, make_podman: Any,
        images: dict[str, SqLayer]) -> None:
    """A call whose lowerdirs lead to two store layers, the second one's squash file
    group-writable (refused as root): the first one was recorded (fast path) or mounted
    (slow path) before the second was refused. Every layer is checked before any is
    used now."""
    assert host.is_real_root()
    path = test_fast.stub_path(tmp_path)
    with store_setup(tmp_path / "w", podman, make_podman, images, "kernel", "auto") as env:
        first = publish(env, mount=False)
        second = publish(env, test_store.IMAGE2, mount=False)
        registry = Registry(env.runtime_dir)
        links = [env.store.links / (env.store.overlay / layer / "link").read_text()
                 for layer in (first.layer, second.layer)]
        call = ["-o", f"lowerdir={links[0]}:{links[1]},upperdir={tmp_path}/u,"
                f"workdir={tmp_path}/w", str(tmp_path / "c")]
        for state in ("mounted", "unmounted"):
            if state == "mounted":
                registry.ensure_mounted(first.id, first.layer, first.squash, first.diff)
            else:
                registry.umount(first.diff)
            before = registry.record(first.diff)
            os.chmod(second.squash, 0o664)
            try:
                proc = subprocess.run([str(test_fast.VENV_PROGRAM), *call],
                                      env={**env.env, "PATH": path}, capture_output=True,
                                      text=True, timeout=120, check=False)
            finally:
                os.chmod(second.squash, 0o644)
            assert proc.returncode == 1 and "refusing" in proc.stderr, (state, proc.stderr)
            assert host.is_mountpoint(first.diff) == (state == "mounted"), state
            assert registry.record(first.diff) == before, state
            assert not host.is_mountpoint(second.diff), state


def test_another_user_cannot_hold_the_stores_own_locks() -> None:
    """The store's project lock (``squashstore/lock``) and its pull locks were 0644 in a
    store every user may read (0755): any local user could hold a read lock and hang every
    migrate, pull, rmi and gc of root's store. They are the writers' alone (0600), also
    when an older version made them 0644. (podman's own ``layers.lock``/``images.lock``
    stay readable: podman's readers lock them.)"""
    assert host.is_real_root()
    top = tempfile.mkdtemp(dir="/run", prefix="adv5-")
    try:
        os.chmod(top, 0o755)
        store = Store(Path(top) / "store")
        store.init()
        lid = "ab" * 32
        with store.pull_locked(lid):
            pass
        locks = (str(store.lock_file), str(store.pull_lock(lid)))
        assert not any(_other_user_can_lock(path) for path in locks)
        for path in locks:
            os.chmod(path, 0o644)  # an older version's
        assert all(_other_user_can_lock(path) for path in locks)  # (the check can fail)
        with store.write_lock(), store.pull_locked(lid):
            pass
        assert not any(_other_user_can_lock(path) for path in locks)
        assert {stat.S_IMODE(os.stat(path).st_mode) for path in locks} == {0o600}
        assert _other_user_can_lock(str(store.layers_lock))  # podman's, for its readers
    finally:
        shutil.rmtree(top)
