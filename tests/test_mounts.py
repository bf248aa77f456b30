"""Mounts: the registry with both backends (kernel loop mount, squashfuse_ll), dead FUSE
mounts replaced, and the mount program as a real podman calls it (remount after
``umount --all``, 16 containers starting at once mount the image exactly once).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from test_store import (
    IMAGE,
    PYTHON,
    Env,
    SqLayer,
    cli,
    images,
    publish,
    store_setup,
)

from squashstore import host
from squashstore.host import answers
from squashstore.mountprogram import parse_call, store_layer
from squashstore.mounts import MountError, RecordedUse, Registry, default_backend
from squashstore.store import Store
from support.podman import Podman

__all__ = ["images"]  # the module-scoped fixture, shared with test_store

SETUPS = {"fuse": ("fuse", "auto"), "fuse+fuse-overlayfs": ("fuse", "fuse-overlayfs"),
          "kernel": ("kernel", "auto"), "squashfuse": ("squashfuse", "fuse-overlayfs")}


def mount_count(path: Path) -> int:
    """How many mounts are stacked on ``path`` (raw /proc/self/mountinfo lines)."""
    target = host.real_path(path)
    with open("/proc/self/mountinfo") as file:
        return sum(1 for line in file if line.split()[4] == target)


@pytest.fixture(params=sorted(SETUPS))
def benv(request: pytest.FixtureRequest, tmp_path: Path, podman: Podman, make_podman: Any,
         images: dict[str, SqLayer]) -> Iterator[Env]:
    backend, overlay = SETUPS[request.param]
    with store_setup(tmp_path, podman, make_podman, images, backend, overlay) as e:
        yield e


def test_registry_mounts_once_and_unmounts(benv: Env) -> None:
    image = publish(benv, mount=False)
    registry = Registry(benv.runtime_dir)
    first = registry.ensure_mounted(image.id, image.layer, image.squash, image.diff,
                                    user=RecordedUse("/x"))
    second = registry.ensure_mounted(image.id, image.layer, image.squash, image.diff,
                                     user=RecordedUse("/y"))
    assert mount_count(image.diff) == 1
    assert (image.diff / "bin" / "busybox").is_file()
    assert first.backend == second.backend == default_backend()
    assert [u.merged for u in second.users] == ["/x", "/y"]
    assert (first.pid is None) == (first.backend == "kernel")
    listed = json.loads(cli(benv.store.root, "mounts", "--format", "json",
                            env=benv.env).stdout)
    assert [(m["image"], m["mountpoint"]) for m in listed] == [
        (image.id, host.real_path(image.diff))]
    assert registry.umount(image.diff)
    assert mount_count(image.diff) == 0
    assert registry.records() == []


def test_dead_fuse_mount_is_replaced(benv: Env) -> None:
    image = publish(benv, mount=False)
    registry = Registry(benv.runtime_dir)
    record = registry.ensure_mounted(image.id, image.layer, image.squash, image.diff,
                                     backend="squashfuse")
    assert record.pid is not None
    os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while answers(image.diff) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not answers(image.diff)
    with pytest.raises(OSError):
        os.listdir(image.diff)
    again = registry.ensure_mounted(image.id, image.layer, image.squash, image.diff,
                                    backend="squashfuse")
    assert again.pid != record.pid
    assert (image.diff / "bin" / "busybox").is_file()
    assert mount_count(image.diff) == 1
    registry.umount(image.diff)


@pytest.mark.parametrize("setup", ["fuse", "fuse+fuse-overlayfs"])
def test_killed_server_next_container_start_works(setup: str, tmp_path: Path, podman: Podman,
                                                  make_podman: Any,
                                                  images: dict[str, SqLayer]) -> None:
    """The project's server killed with SIGKILL leaves a dead mount ("transport endpoint is
    not connected"); the mount program replaces it at the next container start. (With
    squashfuse_ll podman's own stat of `diff` fails before the mount program is called:
    only `cleanup` recovers those. squashstore's server keeps the root's attributes in the
    kernel's cache for its long timeout, so podman's stat passes.)"""
    backend, overlay = SETUPS[setup]
    with store_setup(tmp_path, podman, make_podman, images, backend, overlay) as env:
        image = publish(env)
        record = Registry(env.runtime_dir).record(image.diff)
        assert record is not None and record.pid is not None
        os.kill(record.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while answers(image.diff) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not answers(image.diff)
        out = env.consumer.text("run", "--rm", "--pull=never", IMAGE, "cat /etc/config")
        assert out == "base config"
        again = Registry(env.runtime_dir).record(image.diff)
        assert again is not None and again.pid not in (None, record.pid)
        assert mount_count(image.diff) == 1


def test_hung_server_is_replaced_not_waited_for(tmp_path: Path, podman: Podman,
                                                make_podman: Any,
                                                images: dict[str, SqLayer]) -> None:
    """A stopped (hung) server must not hang the next container start: the registry's
    probe gives up after a few seconds and the mount is replaced (review finding)."""
    backend, overlay = SETUPS["fuse"]
    with store_setup(tmp_path, podman, make_podman, images, backend, overlay) as env:
        image = publish(env)
        record = Registry(env.runtime_dir).record(image.diff)
        assert record is not None and record.pid is not None
        os.kill(record.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            again = Registry(env.runtime_dir).ensure_mounted(
                image.id, image.layer, image.squash, image.diff)
            assert time.monotonic() - started < 60
            assert again.pid not in (None, record.pid)
            out = env.consumer.text("run", "--rm", "--pull=never", IMAGE, "cat /etc/config")
            assert out == "base config"
        finally:
            os.kill(record.pid, signal.SIGKILL)


def test_kernel_backend_mount_failure_is_one_line(benv: Env, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.sqfs"
    bogus.write_bytes(b"not a squashfs" * 100)
    point = tmp_path / "point"
    point.mkdir()
    with pytest.raises(MountError) as info:
        Registry(benv.runtime_dir).ensure_mounted("x", "y", bogus, point)
    assert "\n" not in str(info.value)
    assert mount_count(point) == 0


def test_mount_program_parses_podmans_call(benv: Env) -> None:
    image = publish(benv, mount=False)
    link = (benv.store.overlay / image.layer / "link").read_text()
    call = parse_call(["-o", f"lowerdir={benv.store.links / link}:/nonstore/diff,upperdir=/u,"
                       "workdir=/w,,volatile", "/merged"])
    assert call.merged == "/merged" and call.option("upperdir") == "/u"
    assert call.lowerdirs() == [str(benv.store.links / link), "/nonstore/diff"]
    found = store_layer(call.lowerdirs()[0])
    assert found is not None and found.layer == image.layer
    assert found.root == str(benv.store.root)
    assert store_layer("/nonstore/diff") is None
    version = subprocess.run([str(PYTHON), "-m", "squashstore.mountprogram", "--version"],
                             capture_output=True, text=True, check=True)
    assert version.stdout.startswith("squashstore-mount-program")


_MOUNT_LAYERS = """
import json, sys
from squashstore import mountprogram
from squashstore.mountrecords import RecordRegistry
call, registry = mountprogram.parse_call(sys.argv[1:]), RecordRegistry()
mountprogram.mount_layers(call, registry)
mountprogram.overlay_argv(call, sys.argv[1:], registry.dir)
print(json.dumps(sorted(sys.modules)))
"""
HEAVY = ("dataclasses", "tomllib", "socket", "hashlib")
"""Modules a fast-path container start must not import (NOTES.md, issue 14: together more
than half of the mount program's instructions); tomllib only while the registry's config
cache is current."""


def mount_layers(env: Env, image: Any, merged: str) -> list[str]:
    """The mount program's work before the exec (`mount_layers`, `overlay_argv`), as a
    container start does it in its own process; returns the modules that process imported."""
    link = (env.store.overlay / image.layer / "link").read_text()
    call = ["-o", f"lowerdir={env.store.links / link},upperdir={merged}.up,workdir=/w", merged]
    proc = subprocess.run([str(PYTHON), "-c", _MOUNT_LAYERS, *call], env=env.env,
                          capture_output=True, text=True, check=True)
    modules: list[str] = json.loads(proc.stdout)
    return modules


@pytest.mark.parametrize("setup", ["kernel", "fuse"])
def test_mount_program_fast_path_records_the_container(setup: str, tmp_path: Path,
                                                       podman: Podman, make_podman: Any,
                                                       images: dict[str, SqLayer]) -> None:
    """A layer already mounted, live and recorded: the mount program only records the
    container (pruning nothing live), without importing the store or the mounters."""
    backend, overlay = SETUPS[setup]
    with store_setup(tmp_path, podman, make_podman, images, backend, overlay) as env:
        image = publish(env)
        registry = Registry(env.runtime_dir)
        before = registry.record(image.diff)
        assert before is not None
        first = mount_layers(env, image, "/c1/merged")
        second = mount_layers(env, image, "/c2/merged")
        for modules in (first, second):
            assert "squashstore.mountprogram" in modules
            assert "squashstore.mounts" not in modules and "squashstore.store" not in modules
            assert not set(HEAVY[:1] + HEAVY[2:]) & set(modules)
        assert not set(HEAVY) & set(second)  # the config as the first one cached it
        after = registry.record(image.diff)
        assert after is not None
        assert (after.pid, after.since, after.backend) == (before.pid, before.since,
                                                           before.backend)
        assert [u.merged for u in after.users][-2:] == ["/c1/merged", "/c2/merged"]
        assert after.users[-1].upperdir == "/c2/merged.up" and after.users[-1].pid
        assert mount_count(image.diff) == 1


def test_mount_program_replaces_a_dead_mount(tmp_path: Path, podman: Podman,
                                            make_podman: Any,
                                            images: dict[str, SqLayer]) -> None:
    """The fast path never uses a dead mount: the mount program replaces it (slow path) and
    records the container on the new mount; an unrecorded live mount is adopted."""
    with store_setup(tmp_path, podman, make_podman, images, "squashfuse",
                     "fuse-overlayfs") as env:
        image = publish(env)
        registry = Registry(env.runtime_dir)
        record = registry.record(image.diff)
        assert record is not None and record.pid is not None
        os.kill(record.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while answers(image.diff) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not answers(image.diff)
        modules = mount_layers(env, image, "/c3/merged")
        assert "squashstore.mounts" in modules  # the slow path ran
        again = registry.record(image.diff)
        assert again is not None and again.pid not in (None, record.pid)
        assert [u.merged for u in again.users] == ["/c3/merged"]
        assert answers(image.diff) and (image.diff / "bin" / "busybox").is_file()
        assert mount_count(image.diff) == 1
        # A live mount without a record (registry lost): adopted, not used blindly.
        with registry.locked():
            registry.forget(image.diff)
        assert "squashstore.mounts" in mount_layers(env, image, "/c4/merged")
        adopted = registry.record(image.diff)
        assert adopted is not None and [u.merged for u in adopted.users] == ["/c4/merged"]
        assert mount_count(image.diff) == 1


def test_podman_run_remounts_after_umount_all(benv: Env) -> None:
    image = publish(benv)
    assert mount_count(image.diff) == 1
    cli(benv.store.root, "umount", "--all", env=benv.env)
    assert mount_count(image.diff) == 0
    out = benv.consumer.text("run", "--rm", "--pull=never", IMAGE, "id -u; cat /etc/config")
    assert out.splitlines()[0] == "1234"
    assert mount_count(image.diff) == 1
    record = Registry(benv.runtime_dir).record(image.diff)
    assert record is not None and record.users
    assert record.backend == default_backend()
    assert record.users[-1].upperdir.startswith(str(benv.consumer.graphroot))
    # Unmount only that image by name, then an explicit mount through the CLI.
    cli(benv.store.root, "umount", IMAGE, env=benv.env)
    assert mount_count(image.diff) == 0
    cli(benv.store.root, "mount", IMAGE, env=benv.env)
    assert mount_count(image.diff) == 1
    images = json.loads(cli(benv.store.root, "images", "--format", "json",
                            env=benv.env).stdout)
    assert images[0]["mounted"] is True


def test_sixteen_concurrent_runs_mount_once(benv: Env) -> None:
    image = publish(benv, mount=False)
    assert mount_count(image.diff) == 0

    def run(i: int) -> subprocess.CompletedProcess[bytes]:
        return benv.consumer.run("run", "--rm", "--pull=never", IMAGE, f"echo run-{i}",
                                 check=False, timeout=600)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    failures = [r.stderr.decode() for r in results if r.returncode != 0]
    assert failures == []
    assert sorted(r.stdout.decode().strip() for r in results) == sorted(
        f"run-{i}" for i in range(16))
    assert mount_count(image.diff) == 1
    records = Registry(benv.runtime_dir).records()
    assert len(records) == 1 and len(records[0].users) == 16


def test_config_prints_storage_conf_lines(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    out = cli(store.root, "config").stdout
    parsed = tomllib.loads(out)
    assert parsed["storage"]["options"]["additionalimagestores"] == [str(store.root)]
    program = parsed["storage"]["options"]["overlay"]["mount_program"]
    assert program.endswith("squashstore-mount-program")
    hook = json.loads(cli(store.root, "config", "--hooks").stdout)
    assert hook["stages"] == ["poststop"] and hook["hook"]["args"][-1] == "poststop"
    # scripts/install wrote the hook's launcher: config --hooks names it (squashstore.hook)
    assert hook["hook"]["path"].endswith("squashstore-hook")
    assert os.access(hook["hook"]["path"], os.X_OK)


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    env = {**os.environ, "SQUASHSTORE_CONFIG": str(config),
           "SQUASHSTORE_RUNTIME_DIR": str(tmp_path / "run")}
    call = ["-o", "lowerdir=/nonexistent/diff,upperdir=/u,workdir=/w", str(tmp_path / "m")]
    for text, expected in (('[mount]\noverlay = "nfs"\n', "overlay = 'nfs'"),
                           ("[mount\n", str(config))):
        config.write_text(text)
        proc = subprocess.run([str(PYTHON), "-m", "squashstore.mountprogram", *call], env=env,
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 1
        assert proc.stderr.startswith("squashstore-mount-program: ")
        assert expected in proc.stderr and proc.stderr.count("\n") == 1


def test_records_written_before_typed_users_are_read(tmp_path: Path) -> None:
    """A registry record as earlier versions wrote it (users as plain JSON objects, some
    fields missing or odd) reads as typed uses, and is written back with the same keys."""
    registry = Registry(tmp_path)
    old = {"image": "i", "layer": "l", "squash": "/s", "mountpoint": str(tmp_path / "m"),
           "backend": "fuse", "pid": 7, "since": 1.0,
           "users": [{"merged": "/a", "upperdir": "/u", "pid": 9, "since": 2},
                     {"merged": "/b"}, {"since": "soon", "pid": True}, "junk"]}
    with registry.locked():
        pass
    (registry.records_dir / "x.json").write_text(json.dumps(old))
    [record] = registry.records()
    assert record.users == [RecordedUse("/a", "/u", 9, 2.0), RecordedUse("/b"), RecordedUse()]
    assert record.to_json()["users"][0] == {"merged": "/a", "upperdir": "/u", "pid": 9,
                                            "since": 2.0}


def _mounts_json(env: Env) -> list[dict[str, Any]]:
    data = json.loads(cli(env.store.root, "mounts", "--format", "json", env=env.env).stdout)
    assert isinstance(data, list)
    return data


def test_mounts_shows_each_mounts_state(tmp_path: Path, podman: Podman, make_podman: Any,
                                        images: dict[str, SqLayer]) -> None:
    """Issue 10 #9: a mount whose server is dead or hung is not shown as fine; the state is
    cleanup's probe's (alive, dead, hung)."""
    with store_setup(tmp_path, podman, make_podman, images, "fuse", "auto") as env:
        image = publish(env)
        record = Registry(env.runtime_dir).record(image.diff)
        assert record is not None and record.pid is not None
        assert [m["state"] for m in _mounts_json(env)] == ["alive"]
        table = cli(env.store.root, "mounts", env=env.env).stdout.splitlines()
        assert "state" in table[0].split() and "alive" in table[1].split()
        os.kill(record.pid, signal.SIGSTOP)
        try:
            assert [m["state"] for m in _mounts_json(env)] == ["hung"]
        finally:
            os.kill(record.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while answers(image.diff) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [m["state"] for m in _mounts_json(env)] == ["dead"]
        assert "dead" in cli(env.store.root, "mounts", env=env.env).stdout.splitlines()[1]
        # ... as cleanup sees it: it unmounts exactly that one as dead.
        out = cli(env.store.root, "cleanup", env=env.env).stdout
        assert out.startswith("unmounted dead") or "dead" in out, out


def test_mount_help_names_the_real_default_backend(tmp_path: Path) -> None:
    """Issue 10 #10: the default backend is fuse (or the config's), for root too."""
    out = cli(tmp_path / "store", "mount", "--help").stdout
    text = " ".join(out.split())
    assert "else fuse" in text and "kernel for root" not in text


def test_umount_says_unmounted_only_when_it_was(benv: Env) -> None:
    image = publish(benv)
    out = cli(benv.store.root, "umount", IMAGE, env=benv.env).stdout
    assert out.startswith("unmounted ") and not host.is_mountpoint(image.diff)
    out = cli(benv.store.root, "umount", IMAGE, env=benv.env).stdout
    assert out.startswith("not mounted: ")


def test_mount_program_fast_path_never_fsyncs(tmp_path: Path, podman: Podman,
                                              make_podman: Any,
                                              images: dict[str, SqLayer]) -> None:
    """A start on a mounted layer rewrites the layer's record atomically (a rename) but never
    fsyncs it: the record describes mounts and processes a reboot erases, and where the
    runtime dir is on a disk (here /run and /tmp are ext4) each fsync cost 10-140 ms, the
    largest piece of the start's gap (NOTES.md, branch start)."""
    backend, overlay = SETUPS["kernel"]
    with store_setup(tmp_path, podman, make_podman, images, backend, overlay) as env:
        image = publish(env)
        link = (env.store.overlay / image.layer / "link").read_text()
        merged = "/c1/merged"
        trace = tmp_path / "strace.txt"
        subprocess.run(["strace", "-f", "-qq", "-o", str(trace),
                        "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
                        str(PYTHON), "-c", _MOUNT_LAYERS, "-o",
                        f"lowerdir={env.store.links / link},upperdir={merged}.up,workdir=/w",
                        merged], env=env.env, capture_output=True, check=True)
        calls = trace.read_text()
        assert "rename" in calls  # the record was rewritten
        assert "fsync(" not in calls and "fdatasync(" not in calls
        record = Registry(env.runtime_dir).record(image.diff)
        assert record is not None and record.users[-1].merged == merged


def test_mount_program_first_start_mounts_without_the_store_module(
        tmp_path: Path, podman: Podman, make_podman: Any,
        images: dict[str, SqLayer]) -> None:
    """An unmounted layer: the mount program mounts it and records the image the store's
    images.json names for it, without importing `squashstore.store` (~60 M instructions,
    ~10 ms, on every first start)."""
    backend, overlay = SETUPS["kernel"]
    with store_setup(tmp_path, podman, make_podman, images, backend, overlay) as env:
        image = publish(env)
        registry = Registry(env.runtime_dir)
        registry.umount_all()
        assert registry.record(image.diff) is None and mount_count(image.diff) == 0
        modules = mount_layers(env, image, "/c1/merged")
        assert "squashstore.mounts" in modules and "squashstore.store" not in modules
        record = registry.record(image.diff)
        assert record is not None and record.image == image.id
        assert [u.merged for u in record.users] == ["/c1/merged"]
        assert mount_count(image.diff) == 1


FIRST_START_HEAVY = ("squashstore.fuse.daemon", "squashstore.fuse.server", "squashstore.image",
                     "pyfuse3", "trio", "argparse", "logging", "ctypes", "shutil",
                     "dataclasses")
"""Modules the mount program must not import when it starts a FUSE server (the server
imports what it serves with): the daemon's argparse, logging and ctypes, with typing and
shutil, were ~98 M instructions (~16 ms) of every first start, dataclasses (podmanstore's and
detach's records) ~41 M more (callgrind, branch first).
typing is not listed: tomllib imports it whenever the config is read afresh, as here."""


def test_mount_program_starts_a_fuse_server_without_the_servers_modules(
        tmp_path: Path, podman: Podman, make_podman: Any,
        images: dict[str, SqLayer]) -> None:
    """An unmounted layer on the FUSE backend: the mount program starts the server through
    `squashstore.fuse.spawn` alone and returns only once the mount answers."""
    backend, overlay = SETUPS["fuse"]
    with store_setup(tmp_path, podman, make_podman, images, backend, overlay) as env:
        image = publish(env)
        registry = Registry(env.runtime_dir)
        registry.umount_all()
        assert registry.record(image.diff) is None and mount_count(image.diff) == 0
        modules = mount_layers(env, image, "/c1/merged")
        assert "squashstore.fuse.spawn" in modules and "squashstore.mounts" in modules
        assert not set(modules) & set(FIRST_START_HEAVY), sorted(
            set(modules) & set(FIRST_START_HEAVY))
        record = registry.record(image.diff)
        assert record is not None and record.backend == "fuse" and record.pid is not None
        assert mount_count(image.diff) == 1 and answers(image.diff)
        assert os.listdir(image.diff)  # the image's root, not the empty directory below
