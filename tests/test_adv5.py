"""Adversarial checks of the mount program's fast path (session 5, helper adv5).

Each test here failed against the fast path as merged (main 09e3742) and names what it
holds: the str-path, `_thread` and `os.lockf` rewrites must keep the old semantics.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_fast
from test_store import Env, SqLayer, images, publish, store_setup

from squashstore import host, launcher, locking
from squashstore.mounts import Registry
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
