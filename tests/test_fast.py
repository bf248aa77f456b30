"""The mount program's launcher and fast path (issue 14, session 5, branch fast).

The launcher (`squashstore.launcher`) starts the mount program as ``python -I -S``: no site,
no editable finder, no ``PYTHON*`` variables, no working directory on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_store import Env, SqLayer, images, publish, store_setup

from squashstore import host, jsonfast, launcher, storelayout
from squashstore.mounts import Registry
from support.podman import Podman

__all__ = ["images"]  # the module-scoped fixture, shared with test_store

EVIL = "sqsevil"
"""The hostile user of tests/test_security.py (never ``sqsuser``, the rootless test's)."""

ROOT = Path(__file__).resolve().parent.parent
VENV_PROGRAM = ROOT / ".venv" / "bin" / launcher.NAME


def test_the_installed_mount_program_is_the_launcher() -> None:
    """scripts/install puts the launcher where the console script was, so storage.conf,
    the tests' podman harness, the demo and the benches all run the fast one."""
    first = VENV_PROGRAM.read_text().splitlines()[0]
    assert first.startswith("#!") and first.endswith(" -IS")
    version = subprocess.run([str(VENV_PROGRAM), "--version"], capture_output=True,
                             text=True, check=True)
    assert version.stdout.startswith(f"{launcher.NAME} version ")


def test_the_launcher_ignores_pythonpath_and_the_working_directory(tmp_path: Path) -> None:
    """Root runs the mount program with podman's environment: a planted ``squashstore``
    package on PYTHONPATH or in the working directory is never imported, and neither are
    site, the user's site directory or PYTHONSTARTUP."""
    target = tmp_path / "bin" / "program"
    target.parent.mkdir()
    assert launcher.main([str(target)]) == 0
    assert os.access(target, os.X_OK)
    planted = tmp_path / "planted"
    (planted / "squashstore").mkdir(parents=True)
    (planted / "squashstore" / "__init__.py").write_text("raise SystemExit('planted')\n")
    (planted / "sitecustomize.py").write_text("raise SystemExit('planted site')\n")
    env = {**os.environ, "PYTHONPATH": str(planted), "PYTHONSTARTUP": str(planted / "x.py"),
           "PYTHONUSERBASE": str(planted)}
    proc = subprocess.run([str(target), "--version"], env=env, cwd=planted,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{launcher.NAME} version ")
    text = target.read_text()
    assert text.startswith(f"#!{sys.executable} -IS\n")
    assert str(ROOT) in text


def test_the_launcher_refuses_a_shebang_it_cannot_write() -> None:
    """(A blank or a long path goes through /bin/sh: tests/test_adv5.py.)"""
    with pytest.raises(ValueError, match="launcher needs"):
        launcher.script("/path with 'quote/python", ["/x"])


# ---------------------------------------------------------------------------------------
# The fast path: what it imports, and that it refuses what a mount refuses.

FORBIDDEN = ("pathlib", "re", "fnmatch", "urllib", "urllib.parse", "ipaddress", "json",
             "json.decoder", "threading", "contextlib", "dataclasses", "typing",
             "collections", "enum", "functools", "tomllib", "hashlib", "socket",
             "squashstore.mounts", "squashstore.store", "squashstore.podmanstore")
"""Modules a container start on a mounted layer must not import (NOTES.md, branch fast:
pathlib with re, fnmatch and urllib.parse was ~20 ms of a ~60 ms run, json ~10 ms)."""


def stub_path(tmp_path: Path) -> str:
    """A PATH whose ``mount -t overlay`` and ``fuse-overlayfs`` do nothing: the program's
    exec of the overlay mount succeeds without mounting anything (other mounts, the kernel
    backend's squashfs, are made)."""
    stubs = tmp_path / "stub-bin"
    stubs.mkdir(exist_ok=True)
    mount = shutil.which("mount")
    assert mount is not None
    (stubs / "mount").write_text(f'#!/bin/sh\n[ "$2" = overlay ] && exit 0\nexec {mount} "$@"\n')
    (stubs / "mount").chmod(0o755)
    (stubs / "fuse-overlayfs").write_text("#!/bin/sh\nexit 0\n")
    (stubs / "fuse-overlayfs").chmod(0o755)
    return f"{stubs}:{os.environ.get('PATH', os.defpath)}"


def program_call(env: Env, layer: str, merged: Path) -> list[str]:
    link = (env.store.overlay / layer / "link").read_text()
    return ["-o", f"lowerdir={env.store.links / link},upperdir={merged}.up,"
            f"workdir={merged}.work", str(merged)]


def run_program(env: Env, layer: str, merged: Path, path: str, *python_flags: str
                ) -> subprocess.CompletedProcess[str]:
    """The installed mount program as podman runs it (through ``python`` with `python_flags`
    when given, e.g. ``-X importtime``), with the overlay mount stubbed."""
    argv = [str(VENV_PROGRAM)]
    if python_flags:
        argv = [sys.executable, "-I", "-S", *python_flags, str(VENV_PROGRAM)]
    return subprocess.run([*argv, *program_call(env, layer, merged)],
                          env={**env.env, "PATH": path}, capture_output=True, text=True,
                          timeout=120, check=False)


def imported(importtime: str) -> set[str]:
    """The module names of ``-X importtime`` output."""
    return {line.rpartition("|")[2].strip() for line in importtime.splitlines()
            if line.startswith("import time:") and "|" in line} - {"imported package"}


def test_the_fast_path_imports_no_heavy_module(tmp_path: Path, podman: Podman,
                                               make_podman: Any,
                                               images: dict[str, SqLayer]) -> None:
    """The real program (the launcher, ``-I -S``) on a mounted, recorded layer: it records
    the container and execs the overlay mount, importing none of `FORBIDDEN`; a start that
    must mount imports the mounters (the slow path), so the check can fail."""
    path = stub_path(tmp_path)
    with store_setup(tmp_path / "w", podman, make_podman, images, "kernel", "auto") as env:
        image = publish(env)
        registry = Registry(env.runtime_dir)
        for n in (1, 2):  # the first one may write the config cache
            proc = run_program(env, image.layer, tmp_path / f"c{n}", path, "-X", "importtime")
            assert proc.returncode == 0, proc.stderr
        modules = imported(proc.stderr)
        assert "squashstore.mountprogram" in modules and "squashstore.jsonfast" in modules
        assert not modules & set(FORBIDDEN), sorted(modules & set(FORBIDDEN))
        record = registry.record(image.diff)
        assert record is not None
        assert [u.merged for u in record.users][-2:] == [str(tmp_path / "c1"),
                                                         str(tmp_path / "c2")]
        # The slow path, for contrast: the same program after an unmount.
        assert registry.umount(image.diff)
        proc = run_program(env, image.layer, tmp_path / "c3", path, "-X", "importtime")
        assert proc.returncode == 0, proc.stderr
        assert {"squashstore.mounts", "pathlib"} <= imported(proc.stderr)
        assert host.is_mountpoint(image.diff)


def _evil_uid() -> int:
    try:
        return pwd.getpwnam(EVIL).pw_uid
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", EVIL],
                       check=True, capture_output=True)
        return pwd.getpwnam(EVIL).pw_uid


def _chown(path: Path) -> Callable[[], None]:
    st = os.lstat(path)
    os.lchown(path, _evil_uid(), -1)
    return lambda: os.lchown(path, st.st_uid, st.st_gid)


def _chmod(path: Path, mode: int) -> Callable[[], None]:
    old = stat.S_IMODE(os.lstat(path).st_mode)
    os.chmod(path, mode)
    return lambda: os.chmod(path, old)


def _hostile(env: Env, layer: str, case: str) -> Callable[[], None]:
    """Make the store or registry changeable by another user as `case` says; returns the
    undo."""
    store = env.store
    if case == "links dir another user's":
        return _chown(store.links)
    if case == "the link another user's":
        return _chown(store.links / (store.overlay / layer / "link").read_text())
    if case == "store's ancestor world-writable":
        return _chmod(store.root.parent, 0o777)
    if case == "store root group-writable":
        return _chmod(store.root, 0o775)
    if case == "format file another user's":
        return _chown(store.meta / "format-version")
    if case == "layer directory another user's":
        return _chown(store.overlay / layer)
    if case == "squash file another user's":
        return _chown(store.squash_file(layer))
    if case == "squash file group-writable":
        return _chmod(store.squash_file(layer), 0o664)
    if case == "registry another user's":
        return _chown(env.runtime_dir)
    if case == "registry records dir another user's":
        return _chown(env.runtime_dir / "mounts")
    assert case == "registry lock another user's"
    return _chown(env.runtime_dir / "lock")


HOSTILE = ("links dir another user's", "the link another user's",
           "store's ancestor world-writable", "store root group-writable",
           "format file another user's", "layer directory another user's",
           "squash file another user's", "squash file group-writable",
           "registry another user's", "registry records dir another user's",
           "registry lock another user's")


def test_the_fast_path_refuses_what_a_mount_refuses(tmp_path: Path, podman: Podman,
                                                    make_podman: Any,
                                                    images: dict[str, SqLayer]) -> None:
    """As root, for each way another user could change what the program uses, the program
    refuses in one line, both with the layer mounted (the fast path) and unmounted (the
    slow path): same refusal, nothing mounted, the record untouched. Without the change
    both states succeed (so the refusals are the changes' doing)."""
    assert host.is_real_root()
    path = stub_path(tmp_path)
    base = tmp_path / "w"
    with store_setup(base, podman, make_podman, images, "kernel", "auto") as env:
        image = publish(env, mount=False)
        registry = Registry(env.runtime_dir)
        merged = tmp_path / "c"
        refusals: dict[tuple[str, str], str] = {}
        for case in ("", *HOSTILE):
            for state in ("mounted", "unmounted"):
                if state == "mounted":
                    registry.ensure_mounted(image.id, image.layer, image.squash, image.diff)
                else:
                    registry.umount(image.diff)
                before = registry.record(image.diff)
                undo = _hostile(env, image.layer, case) if case else None
                try:
                    proc = run_program(env, image.layer, merged, path)
                finally:
                    if undo is not None:
                        undo()
                if not case:
                    assert proc.returncode == 0, (state, proc.stderr)
                    continue
                assert proc.returncode == 1, (case, state, proc.stderr)
                lines = proc.stderr.splitlines()
                assert len(lines) == 1 and "refusing" in lines[0], (case, state, lines)
                assert lines[0].startswith(f"{launcher.NAME}: "), lines
                refusals[case, state] = lines[0]
                assert host.is_mountpoint(image.diff) == (state == "mounted"), (case, state)
                assert registry.record(image.diff) == before, (case, state)
        for case in HOSTILE:
            assert refusals[case, "mounted"] == refusals[case, "unmounted"], case


# ---------------------------------------------------------------------------------------
# squashstore.jsonfast: json's own C scanner and encoder, called without importing json.

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_jsonfast_writes_and_reads_what_json_does(value: object) -> None:
    text = json.dumps(value)
    assert jsonfast.dumps(value) == text
    assert json.dumps(jsonfast.loads(text)) == text  # (NaN != NaN: compared as text)
    assert json.dumps(jsonfast.loads(f" \n{text}\t\r\n".encode())) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=' \t\n[]{}",:0123456789.eE+-truefalsnNIity\\u\x01é', max_size=30))
def test_jsonfast_refuses_what_json_refuses(text: str) -> None:
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            jsonfast.loads(text)
    else:
        got = jsonfast.loads(text)
        assert got == expected or json.dumps(got) == json.dumps(expected)  # NaN != NaN


def test_jsonfast_refuses_what_json_cannot_write() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        jsonfast.dumps({"a": object()})
    with pytest.raises(RecursionError):
        jsonfast.loads("[" * 100_000)


def test_string_path_checks_answer_as_pathlib_does(tmp_path: Path) -> None:
    """`storelayout.is_file` and `lowerdir_layer` on strings answer as the pathlib code they
    replace: absent, a file's child (ENOTDIR), a symlink loop (ELOOP) are "no"; the store
    layer a link or a diff path leads to is found, anything else is not."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "to-file").symlink_to("file")
    for name in ("file", "dir", "loop", "to-file", "missing", "file/child"):
        path = tmp_path / name
        assert storelayout.is_file(str(path)) == path.is_file(), name
    root = tmp_path / "store"
    lid = "a" * 64
    (root / "squashstore").mkdir(parents=True)
    (root / "squashstore" / "format-version").write_text("1\n")
    (root / "overlay" / "l").mkdir(parents=True)
    (root / "overlay" / "l" / "GOOD").symlink_to(f"../{lid}/diff")
    (root / "overlay" / "l" / "UPPER").symlink_to(f"../{lid.upper()}/diff")
    (root / "overlay" / "l" / "OUT").symlink_to(f"../../../{lid}/diff")
    (root / "overlay" / "l" / "FILE").write_text("")
    links = root / "overlay" / "l"
    assert storelayout.lowerdir_layer(str(links / "GOOD")) == (str(root), lid,
                                                               str(links / "GOOD"))
    assert storelayout.lowerdir_layer(f"{root}/overlay/{lid}/diff") == (str(root), lid, None)
    assert storelayout.lowerdir_layer(f"{root}/overlay/x/../{lid}/diff/") == (str(root), lid,
                                                                             None)
    for bad in ("UPPER", "OUT", "FILE", "MISSING"):
        assert storelayout.lowerdir_layer(str(links / bad)) is None, bad
    assert storelayout.lowerdir_layer(f"{tmp_path}/overlay/{lid}/diff") is None  # no store
    assert storelayout.link_target_layer(f"../{lid}/diff") == lid
    for target in (f"../{lid}/diff/", f"./{lid}/diff", f"../{lid[:-1]}/diff", "../diff"):
        assert storelayout.link_target_layer(target) is None, target
