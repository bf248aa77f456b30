"""Cleanup: the tracker, `squashstore cleanup` and the poststop hook against a real podman.

A consumer podman is configured with `squashstore config`'s lines (the real
``squashstore-mount-program`` console script) over a store holding three images; containers are
run, stopped, paused, removed, and started from an image built FROM a store image, and cleanup
must unmount exactly the mounts nobody runs on, leave running containers working, recover dead
FUSE mounts and lost registry state, and never take a mount from under a starting container.
The decision itself is also checked as a pure function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_store import SqLayer, make_squash, store_image_source

from squashstore import cleanup, hook, host, tracker
from squashstore.config import Config
from squashstore.host import answers
from squashstore.image import Image
from squashstore.migrate import migrate_image
from squashstore.mounts import MountRecord, RecordedUse, Registry
from squashstore.store import Store, StoreImage
from squashstore.tracker import User
from support.fixture_trees import write_base_tar
from support.podman import Podman, make_podman

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
BASE = "localhost/sqs-cleanup-base:1"
NAMES = ("localhost/cl-a:1", "localhost/cl-b:1", "localhost/cl-c:1")
A, B, C = NAMES
DERIVED = "localhost/cl-derived:1"


# --------------------------------------------------------------------------- the decision

def _user(layer: str) -> User:
    return User("/g", "ctr-layer", "/g/overlay/ctr-layer/merged", "c" * 64, "n",
                store_layers=frozenset({layer}))


states = st.builds(
    cleanup.MountState,
    mountpoint=st.text("abc/", min_size=1, max_size=8),
    layer=st.sampled_from(["l1", "l2"]),
    fstype=st.sampled_from([None, "squashfs", "fuse.squashfuse_ll"]),
    alive=st.booleans(),
    hung=st.booleans(),
    since=st.one_of(st.none(), st.floats(0, 2000)),
    recorded=st.booleans(),
    users=st.lists(st.sampled_from(["l1", "l2"]).map(_user), max_size=2).map(tuple),
)


@given(st.lists(states, max_size=6), st.floats(0, 1000), st.floats(0, 30))
def test_decide_never_unmounts_a_used_young_or_graced_live_mount(
        mounts: list[cleanup.MountState], grace: float, min_age: float) -> None:
    now = 2000.0
    decisions = cleanup.decide(mounts, now, grace, min_age)
    assert [d.mount for d in decisions] == mounts
    for d in decisions:
        m = d.mount
        if m.fstype is None:
            assert d.action == cleanup.FORGET
        elif not m.alive and m.hung and m.users:
            assert d.action == cleanup.KEEP, "a slow server that containers use stays"
        elif not m.alive:
            assert d.action == cleanup.UNMOUNT_DEAD
        elif m.users or (m.since is not None and now - m.since < max(grace, min_age)):
            assert d.action == cleanup.KEEP, d
        else:
            assert d.action == cleanup.UNMOUNT


def test_decide_examples() -> None:
    old = cleanup.MountState("/m", "l1", fstype="squashfs", since=0.0)
    [d] = cleanup.decide([old], 1000.0, 600.0)
    assert (d.action, d.reason) == (cleanup.UNMOUNT, "unused, 1000s old")
    [d] = cleanup.decide([dataclasses.replace(old, since=999.0)], 1000.0, 0.0)
    assert d.action == cleanup.KEEP and "being set up" in d.reason
    [d] = cleanup.decide([dataclasses.replace(old, users=(_user("l1"),))], 1000.0, 0.0)
    assert d.action == cleanup.KEEP and d.reason == f"in use by container {'c' * 12} (n)"
    hung = dataclasses.replace(old, alive=False, hung=True, users=(_user("l1"),))
    [d] = cleanup.decide([hung], 1000.0, 0.0)
    assert d.action == cleanup.KEEP and d.reason.endswith("its server does not answer")
    [d] = cleanup.decide([dataclasses.replace(hung, users=())], 1000.0, 0.0)
    assert (d.action, d.reason) == (cleanup.UNMOUNT_DEAD, "hung, unused")
    [d] = cleanup.decide([dataclasses.replace(hung, hung=False)], 1000.0, 0.0)
    assert (d.action, d.reason) == (cleanup.UNMOUNT_DEAD, "dead (server gone)")


def test_hook_state_is_parsed_from_podmans_bundle() -> None:
    state = {"ociVersion": "1.0.2-dev", "id": "abc", "status": "stopped",
             "bundle": "/var/lib/containers/storage/overlay-containers/abc/userdata"}
    parsed = hook.StoppingContainer.parse(json.dumps(state))
    assert parsed == hook.StoppingContainer("abc", "/var/lib/containers/storage")
    with pytest.raises(hook.HookError):
        hook.StoppingContainer.parse("not json")
    with pytest.raises(hook.HookError, match="nested too deeply"):
        hook.StoppingContainer.parse("[" * 100_000)


# --------------------------------------------------------------------------- real podman

@pytest.fixture(scope="module")
def base_image(podman: Podman, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Image, SqLayer]:
    """One podman image and its squash file; store images are made from it with distinct
    layer digests (podman does not check them), so they are distinct layers and mounts."""
    work = tmp_path_factory.mktemp("cleanup-image")
    podman.import_tar(write_base_tar(work / "base.tar"), BASE, 'CMD ["/bin/sh"]',
                      "ENV PATH=/bin")
    return store_image_source(podman, BASE), make_squash(podman, BASE, work / "base.sqfs")


@dataclasses.dataclass
class Setup:
    store: Store
    run_dir: Path
    env: dict[str, str]
    consumer: Podman
    images: dict[str, StoreImage]

    @property
    def registry(self) -> Registry:
        return Registry(self.run_dir)

    def cli(self, *args: str, stdin: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(BIN / "squashstore"), "--store", str(self.store.root),
                               *args], capture_output=True, text=True, env=self.env,
                              input=stdin, check=False, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"squashstore {' '.join(args)}: {proc.stderr}")
        return proc

    def cleanup(self, *args: str) -> list[dict[str, Any]]:
        """``cleanup --format json ARGS`` (must succeed)."""
        data = json.loads(self.cli("cleanup", "--format", "json", *args).stdout)
        assert isinstance(data, list)
        return data

    def podman(self, *args: str) -> str:
        return self.consumer.text(*args)

    def mounted(self) -> set[str]:
        """The store images whose squash file is mounted now."""
        return {name for name, image in self.images.items()
                if host.is_mountpoint(image.diff)}


def _squasher(layer: SqLayer, digest: str) -> Any:
    def squash(image: Image, dest: Path, options: Any, tar_split: Path) -> SqLayer:
        shutil.copyfile(layer.path, dest)
        return SqLayer(dest, digest, layer.diff_size)
    return squash


def _config_line(text: str, key: str) -> str:
    line = next(x for x in text.splitlines() if x.startswith(key))
    return str(json.loads(line.partition("=")[2].strip()))


@contextlib.contextmanager
def setup_store(base: Path, base_image: tuple[Image, SqLayer], backend: str = "kernel",
                hooks: bool = False, min_age: float = 1.0,
                overlay: str = "auto") -> Iterator[Setup]:
    source, layer = base_image
    store = Store(base / "store")
    store.init()
    run_dir = base / "run"
    config = base / "config.toml"
    config.write_text(f'[mount]\nbackend = "{backend}"\noverlay = "{overlay}"\n'
                      f'[cleanup]\nmin_age = {min_age}\n')
    env = {**os.environ, "SQUASHSTORE_RUNTIME_DIR": str(run_dir),
           "SQUASHSTORE_CONFIG": str(config)}
    images = {}
    for i, name in enumerate(NAMES):
        digest = "sha256:" + f"{i + 1:x}" * 64
        images[name] = migrate_image(store, dataclasses.replace(source, names=(name,)),
                                     {"cleanup-test": name}, mount=False,
                                     registry=Registry(run_dir),
                                     squasher=_squasher(layer, digest))
    lines = subprocess.run([str(BIN / "squashstore"), "--store", str(store.root), "config"],
                           capture_output=True, text=True, env=env, check=True).stdout
    assert _config_line(lines, "additionalimagestores") == str([str(store.root)])
    # A short runroot: podman 4.3's exit command (`podman container cleanup`, which unmounts a
    # container that exits by itself) fails on runroots longer than 50 characters.
    short = Path(tempfile.mkdtemp(prefix="sqcl-", dir="/tmp"))
    consumer = make_podman(short, [store.root], _config_line(lines, "mount_program"))
    consumer.env.update({k: env[k] for k in ("SQUASHSTORE_RUNTIME_DIR", "SQUASHSTORE_CONFIG")})
    if hooks:
        _install_hook(base, store, env, consumer)
    setup = Setup(store, run_dir, {**consumer.env, **env}, consumer, images)
    try:
        yield setup
    finally:
        consumer.close()
        shutil.rmtree(short, ignore_errors=True)
        Registry(run_dir).umount_all(lazy=True)
        for point in sorted(host.mount_table(), key=len, reverse=True):
            if point.startswith(str(base) + "/"):
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def _install_hook(base: Path, store: Store, env: dict[str, str], consumer: Podman) -> None:
    """The hook JSON `config --hooks` prints, plus our private runtime dir and config (podman
    runs hooks with an empty environment)."""
    out = subprocess.run([str(BIN / "squashstore"), "--store", str(store.root), "config",
                          "--hooks"], capture_output=True, text=True, env=env, check=True)
    spec = json.loads(out.stdout)
    assert spec["stages"] == ["poststop"] and spec["when"] == {"always": True}
    # The hook's launcher scripts/install writes (python -I -S; squashstore/launcher.py).
    assert spec["hook"]["args"] == [str(BIN / "squashstore-hook"), "poststop"]
    assert spec["hook"]["path"] == str(BIN / "squashstore-hook")
    spec["hook"]["env"] = [f"{k}={env[k]}" for k in ("SQUASHSTORE_RUNTIME_DIR",
                                                    "SQUASHSTORE_CONFIG")]
    hooks_dir = base / "hooks.d"
    hooks_dir.mkdir()
    (hooks_dir / "squashstore.json").write_text(json.dumps(spec))
    with open(consumer.containers_conf, "a") as conf:
        conf.write(f'hooks_dir = ["{hooks_dir}"]\n')


@pytest.fixture
def kernel_setup(tmp_path: Path, base_image: tuple[Image, SqLayer]) -> Iterator[Setup]:
    with setup_store(tmp_path, base_image) as s:
        yield s


def _acted(report: list[dict[str, Any]], action: str) -> set[str]:
    return {r["mountpoint"] for r in report if r["action"] == action}


def _diffs(s: Setup, *names: str) -> set[str]:
    return {host.real_path(s.images[n].diff) for n in names}


def _run(s: Setup, *args: str) -> str:
    return s.podman("run", "--pull=never", *args)


def test_cleanup_unmounts_exactly_the_mounts_nobody_runs_on(kernel_setup: Setup,
                                                           tmp_path: Path) -> None:
    s = kernel_setup
    a1 = _run(s, "-d", A, "sleep", "1000")
    _run(s, A, "true")                                 # a stopped container of A
    b1 = _run(s, "-d", B, "sleep", "1000")
    s.podman("pause", b1)
    assert _run(s, "--rm", B, "cat", "/etc/config") == "base config"
    c1 = s.podman("create", "--pull=never", C, "echo", "hi from c1")
    s.podman("create", "--pull=never", C, "true")      # created, never started
    c3 = _run(s, "-d", C, "true")
    s.podman("wait", c3)
    s.podman("rm", c3)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "note").write_text("derived\n")
    (ctx / "Containerfile").write_text(f"FROM {C}\nCOPY note /note\n")
    # With a mount_program podman diffs naively: committing the COPY mounts the store layer
    # at S/overlay/<LID>/merged over lowerdir=diff:empty, directories the store lacks.
    for sub in ("merged", "empty"):
        (s.store.overlay / s.images[C].layer / sub).mkdir(exist_ok=True)
    s.consumer.build(ctx, DERIVED)
    assert s.mounted() == {A, B, C}
    time.sleep(1.1)                                    # older than the configured min_age

    dry = s.cleanup("--dry-run", "--grace", "0")
    assert _acted(dry, cleanup.UNMOUNT) == _diffs(s, C)
    assert not any(r["done"] for r in dry)
    assert s.mounted() == {A, B, C}
    text = s.cli("cleanup", "--dry-run", "--grace", "0").stdout
    assert text.startswith(f"would unmount {host.real_path(s.images[C].diff)} image ")
    graced = s.cleanup()                               # default grace: 600 s
    assert _acted(graced, cleanup.UNMOUNT) == set() and s.mounted() == {A, B, C}

    report = s.cleanup("--grace", "0")
    assert _acted(report, cleanup.UNMOUNT) == _diffs(s, C)
    assert all(r["done"] and not r["error"] for r in report)
    users = {r["mountpoint"]: {u["container"] for u in r["users"]} for r in report}
    assert users[host.real_path(s.images[A].diff)] == {a1}
    assert users[host.real_path(s.images[B].diff)] == {b1}
    assert s.mounted() == {A, B}
    assert {r.layer for r in s.registry.records()} == {s.images[A].layer, s.images[B].layer}
    # Running and paused containers keep working; a stopped one starts and remounts.
    assert s.podman("exec", a1, "cat", "/etc/config") == "base config"
    s.podman("unpause", b1)
    assert s.podman("exec", b1, "cat", "/etc/config") == "base config"
    assert s.podman("start", "-a", c1) == "hi from c1"
    assert s.mounted() == {A, B, C}

    # A running container of an image built FROM C keeps C's mount.
    d1 = _run(s, "-d", DERIVED, "sleep", "1000")
    time.sleep(1.1)
    report = s.cleanup("--grace", "0")
    assert _acted(report, cleanup.UNMOUNT) == set()
    kept_c = next(r for r in report if r["layer"] == s.images[C].layer)
    assert [u["container"] for u in kept_c["users"]] == [d1]
    assert s.podman("exec", d1, "cat", "/note") == "derived"

    s.podman("stop", "-t", "0", a1, b1, d1)
    report = s.cleanup("--grace", "0")
    assert _acted(report, cleanup.UNMOUNT) == _diffs(s, A, B, C)
    assert s.mounted() == set() and s.registry.records() == []
    assert s.cleanup("--grace", "0") == []
    assert s.cli("cleanup", "--grace", "0").stdout == ""


def _gone(pid: int | None) -> bool:
    """The process has exited (a zombie our process has not reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def _wait_until(condition: Any, timeout: float = 10.0) -> float:
    """Seconds until ``condition()`` held (AssertionError after ``timeout``)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met after {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.parametrize("backend, overlay", [("fuse", "auto"), ("kernel", "auto"),
                                             ("squashfuse", "fuse-overlayfs")])
def test_poststop_hook_unmounts_after_the_last_container_stops(
        tmp_path: Path, base_image: tuple[Image, SqLayer], backend: str, overlay: str) -> None:
    with setup_store(tmp_path, base_image, backend, hooks=True, overlay=overlay) as s:
        x1 = _run(s, "-d", A, "sleep", "1000")
        x2 = _run(s, "-d", A, "sleep", "1000")
        y1 = _run(s, "-d", B, "sleep", "1000")
        s.podman("stop", "-t", "0", x1)
        time.sleep(1.0)
        assert s.mounted() == {A, B}
        assert s.podman("exec", x2, "cat", "/etc/config") == "base config"
        s.podman("stop", "-t", "0", x2)
        # No cleanup runs here: only the hook can unmount A (bounded by _wait_until's 10 s;
        # how fast is measured in bench/, not asserted).
        _wait_until(lambda: s.mounted() == {B})
        assert {r.layer for r in s.registry.records()} == {s.images[B].layer}
        assert s.podman("exec", y1, "cat", "/etc/config") == "base config"
        # --rm: gone right after the run returns; a restart of a stopped container remounts.
        assert _run(s, "--rm", C, "cat", "/etc/config") == "base config"
        _wait_until(lambda: s.mounted() == {B})
        z = s.podman("create", "--pull=never", A, "cat", "/etc/config")
        assert s.podman("start", "-a", z) == "base config"
        _wait_until(lambda: s.mounted() == {B})
        s.podman("rm", "-f", "-t", "0", y1)
        _wait_until(lambda: s.mounted() == set())
        assert s.registry.records() == []


def test_hook_with_bad_input_fails_in_one_line(kernel_setup: Setup) -> None:
    proc = kernel_setup.cli("hook", "poststop", stdin="{", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("squashstore: hook: not an OCI container state")
    assert len(proc.stderr.splitlines()) == 1
    # A container podman does not know (removed meanwhile): nothing to do, success.
    state = {"id": "f" * 64, "bundle": str(kernel_setup.consumer.graphroot
                                           / "overlay-containers" / ("f" * 64) / "userdata")}
    assert kernel_setup.cli("hook", "poststop", stdin=json.dumps(state)).stdout == ""


@pytest.mark.parametrize("backend", ["fuse", "squashfuse"])
def test_dead_fuse_mount_is_unmounted_and_forgotten(
        tmp_path: Path, base_image: tuple[Image, SqLayer], backend: str) -> None:
    """SIGKILLed and hung servers of the project's FUSE server (whose dead root the kernel
    still answers stat for, from its cache) and of squashfuse_ll."""
    with setup_store(tmp_path, base_image, backend) as s:
        b1 = _run(s, "-d", B, "sleep", "1000")
        assert _run(s, "--rm", A, "cat", "/etc/config") == "base config"
        record = s.registry.record(s.images[A].diff)
        assert record is not None and record.backend == backend and record.pid
        os.kill(record.pid, signal.SIGKILL)
        _wait_until(lambda: not answers(s.images[A].diff))
        report = s.cleanup()                           # default grace: dead ones regardless
        assert _acted(report, cleanup.UNMOUNT_DEAD) == _diffs(s, A)
        assert [r["lazy"] for r in report if r["action"] == cleanup.UNMOUNT_DEAD] == [True]
        assert _acted(report, cleanup.KEEP) == _diffs(s, B)
        assert s.mounted() == {B}
        assert s.registry.record(s.images[A].diff) is None
        assert _run(s, "--rm", A, "cat", "/etc/config") == "base config"
        assert s.podman("exec", b1, "cat", "/etc/config") == "base config"
        # A hung server (stopped): counted dead after a few seconds, unmounted, killed.
        s.cli("mount", C)
        hung = s.registry.record(s.images[C].diff)
        assert hung is not None and hung.pid
        os.kill(hung.pid, signal.SIGSTOP)
        try:
            report = s.cleanup()
        finally:
            with contextlib.suppress(OSError):
                os.kill(hung.pid, signal.SIGCONT)
        dead = [r for r in report if r["action"] == cleanup.UNMOUNT_DEAD]
        assert [(r["layer"], r["done"]) for r in dead] == [(s.images[C].layer, True)]
        assert f"hung server {hung.pid} killed" in dead[0]["notes"]
        _wait_until(lambda: _gone(hung.pid), 5.0)
        assert s.mounted() == {A, B}
        # An unused live FUSE mount: unmounted, and its server is gone.
        time.sleep(1.1)
        server = s.registry.record(s.images[A].diff)
        assert server is not None and server.pid
        report = s.cleanup("--grace", "0")
        assert _acted(report, cleanup.UNMOUNT) == _diffs(s, A)
        _wait_until(lambda: _gone(server.pid), 5.0)
        assert s.mounted() == {B}


@pytest.mark.parametrize("backend, overlay", [("kernel", "auto"),
                                             ("squashfuse", "fuse-overlayfs")])
def test_lost_registry_state_is_adopted(tmp_path: Path, base_image: tuple[Image, SqLayer],
                                        backend: str, overlay: str) -> None:
    with setup_store(tmp_path, base_image, backend, overlay=overlay) as s:
        lost_registry_state_is_adopted(s)


def lost_registry_state_is_adopted(s: Setup) -> None:
    a1 = _run(s, "-d", A, "sleep", "1000")
    assert _run(s, "--rm", B, "true") == ""
    s.cli("mount", C)
    assert s.mounted() == {A, B, C}
    shutil.rmtree(s.run_dir / "mounts")
    time.sleep(1.1)                  # adopted FUSE mounts are as old as their servers
    report = s.cleanup("--grace", "0")
    assert {r["mountpoint"] for r in report if r["adopted"]} == _diffs(s, A, B, C)
    assert _acted(report, cleanup.UNMOUNT) == _diffs(s, B, C)
    assert _acted(report, cleanup.KEEP) == _diffs(s, A)
    assert [u["container"] for r in report for u in r["users"]] == [a1]
    assert s.mounted() == {A}
    assert [(r.layer, r.squash, r.image) for r in s.registry.records()] == [
        (s.images[A].layer, str(s.images[A].squash), s.images[A].id)]
    assert s.podman("exec", a1, "cat", "/etc/config") == "base config"
    # Without any record the user's exact squash mounts come from its overlay: the kernel's
    # mount options, or fuse-overlayfs's command line.
    users = tracker.observe_users([], Config(), host.read_mountinfo())
    assert [u.mounts for u in users if u.container == a1] == [frozenset(_diffs(s, A))]
    s.podman("stop", "-t", "0", a1)
    time.sleep(1.1)
    report = s.cleanup("--grace", "0")
    assert _acted(report, cleanup.UNMOUNT) == _diffs(s, A)
    assert s.mounted() == set() and s.registry.records() == []


@pytest.mark.parametrize("hooks", [False, True], ids=["cron", "cron+hook"])
def test_cleanups_during_a_burst_of_starts_never_break_a_container(
        tmp_path: Path, base_image: tuple[Image, SqLayer], hooks: bool) -> None:
    with setup_store(tmp_path, base_image, hooks=hooks, min_age=0.0) as s:
        keeper = _run(s, "-d", A, "sleep", "1000")
        stop = time.monotonic() + 600

        def cleanups() -> list[subprocess.CompletedProcess[str]]:
            done = []
            while time.monotonic() < stop:
                done.append(s.cli("cleanup", "--grace", "0", check=False))
            return done

        def start(i: int) -> subprocess.CompletedProcess[bytes]:
            return s.consumer.run("run", "--rm", "--pull=never", NAMES[i % 3], "cat",
                                  "/etc/config", check=False)

        with ThreadPoolExecutor(18) as pool:
            cleaners = [pool.submit(cleanups) for _ in range(2)]
            time.sleep(0.5)
            runs = list(pool.map(start, range(16)))
            stop = time.monotonic()
            cleaned = [p for c in cleaners for p in c.result()]
        for proc in runs:
            assert (proc.returncode, proc.stdout.decode().strip()) == (0, "base config"), \
                proc.stderr.decode()
        assert len(cleaned) >= 4, [(p.returncode, p.stdout, p.stderr) for p in cleaned]
        if not hooks:                  # they raced the starts (with hooks, the hooks did)
            assert any("unmounted" in p.stdout for p in cleaned)
        for proc in cleaned:
            assert proc.returncode == 0 and proc.stderr == "", (proc.stdout, proc.stderr)
        assert s.podman("exec", keeper, "cat", "/etc/config") == "base config"
        assert A in s.mounted()
        s.cli("cleanup", "--grace", "0")
        assert s.mounted() == {A}


def test_busy_unused_mount_is_unmounted_lazily(kernel_setup: Setup) -> None:
    s = kernel_setup
    s.cli("mount", C)
    time.sleep(1.1)
    with open(s.images[C].diff / "etc" / "config") as held:
        report = s.cleanup("--grace", "0")
        assert [(r["action"], r["lazy"], r["done"]) for r in report] == [
            (cleanup.UNMOUNT, True, True)]
        assert s.mounted() == set() and s.registry.records() == []
        assert held.read() == "base config\n"          # the open file still reads


def test_rootless_hook_finds_the_users_registry_from_the_uid_map() -> None:
    # A real user namespace of an ordinary user (nobody), as rootless podman makes one.
    uid_map = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              "unshare", "-r", "cat", "/proc/self/uid_map"],
                             capture_output=True, text=True, check=True).stdout
    assert host.outside_uid(uid_map) == 65534
    assert host.outside_uid(Path("/proc/self/uid_map").read_text()) == 0
    assert host.outside_uid("") is None


def test_grace_runs_from_the_last_recorded_container_start() -> None:
    """Review finding: a mount made hours ago and used a second ago is not stale."""
    record = MountRecord("i", "l1", "/s.sqfs", "/m", "fuse", None, 0.0,
                         users=[RecordedUse("/a", since=100.0), RecordedUse("/b", since=990.0)])
    state = cleanup._record_state(record, {}, [], {})
    assert state.since == 990.0
    mounted = dataclasses.replace(state, fstype="fuse.squashstore", alive=True)
    [d] = cleanup.decide([mounted], 1000.0, 600.0)
    assert d.action == cleanup.KEEP and "unused, 10s old" in d.reason


def test_damaged_mount_records_are_skipped_by_every_command(tmp_path: Path) -> None:
    """Records that are not records (nested 100,000 deep, a list, an int for a path, a pid
    of 10**30, a time no clock shows, a NUL in a path) made cleanup, mounts and umount
    --all fail with a traceback (RecursionError, AttributeError, OverflowError); they are
    skipped, and the one good record is still listed."""
    from test_store import cli

    run = tmp_path / "run"
    records = run / "mounts"
    records.mkdir(parents=True)
    good = {"image": "i", "layer": "l", "squash": "/s", "mountpoint": str(tmp_path / "m"),
            "backend": "fuse", "pid": None, "since": 0}
    bad: list[object] = [
        {**good, "mountpoint": 5}, {**good, "pid": 10**30}, {**good, "since": 1e308},
        {**good, "mountpoint": "relative/m"}, {**good, "squash": "/s\0x"}, [1, 2],
        {**good, "users": "x"}, {**good, "pid": True}, {**good, "since": "x"}]
    for i, value in enumerate(bad):
        (records / f"bad{i}.json").write_text(json.dumps(value))
    (records / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (records / "binary.json").write_bytes(b"\xff\xfe\x00")
    (records / "good.json").write_text(json.dumps(good))
    env = {**os.environ, "SQUASHSTORE_RUNTIME_DIR": str(run),
           "SQUASHSTORE_CONFIG": str(tmp_path / "none.toml")}
    for command in (["cleanup", "--grace", "0", "--dry-run"], ["mounts"]):
        proc = cli(tmp_path / "store", *command, env=env, check=False)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    listed = cli(tmp_path / "store", "mounts", "--format", "json", env=env)
    assert [r["mountpoint"] for r in json.loads(listed.stdout)] == [good["mountpoint"]]
    umount = cli(tmp_path / "store", "umount", "--all", env=env, check=False)
    assert umount.returncode == 0 and "Traceback" not in umount.stderr, umount.stderr
    (records / "good.json").write_text(json.dumps(good))
    proc = cli(tmp_path / "store", "cleanup", env=env, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    # Cleanup removed the files that are no records; the stray good one was renamed to its
    # key, then forgotten with its mount (gone).
    assert sorted(records.iterdir()) == []


def _record_json(mountpoint: str) -> dict[str, object]:
    return {"image": "i" * 64, "layer": "l" * 64, "squash": "/s", "mountpoint": mountpoint,
            "backend": "fuse", "pid": None, "since": 0}


def test_umount_all_goes_on_past_a_refused_record(tmp_path: Path) -> None:
    """`umount --all` stopped at the first record it refused (one naming /proc): the records
    after it were never unmounted. Every record is tried; each refusal is named in the one
    error line, and the exit is non-zero."""
    from test_store import cli

    run = tmp_path / "run"
    registry = Registry(run)
    proc_key = registry._key(Path("/proc"))
    gone = []
    for i in range(100):
        point = tmp_path / f"gone{i}"
        if registry._key(point) > proc_key:  # sorted after the refused one
            gone.append(point)
        if len(gone) == 2:
            break
    with registry.locked():
        for point in (Path("/proc"), *gone):
            registry.write(MountRecord("i" * 64, "l" * 64, "/s", str(point),
                                       "fuse", None, 0.0))
    env = {**os.environ, "SQUASHSTORE_RUNTIME_DIR": str(run),
           "SQUASHSTORE_CONFIG": str(tmp_path / "none.toml")}
    proc = cli(tmp_path / "store", "umount", "--all", env=env, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("squashstore: 1 mount(s) not unmounted: "
                                                   "/proc (a proc file system"), lines
    assert [r.mountpoint for r in registry.records()] == ["/proc"]
    assert sorted(proc.stdout.split()[2::3]) == sorted(map(str, gone))


def test_cleanup_renames_or_removes_stray_records_and_nothing_else(tmp_path: Path) -> None:
    """A record file not named by its mount point's key was never removed (`forget` unlinks
    by key). `tidy` (cleanup) renames a stray to its key when that has no record, removes it
    otherwise, and removes files that are no record; it never touches a symlink, its target,
    a FIFO, a directory or another user's file, and never blocks on a FIFO."""
    registry = Registry(tmp_path / "run")
    records = registry.records_dir
    records.mkdir(parents=True)
    keyed, lone, dup = (str(tmp_path / n) for n in ("keyed", "lone", "dup"))
    registry.write(MountRecord("i", "l", "/s", dup, "fuse", None, 0.0))
    (records / "stray-lone.json").write_text(json.dumps(_record_json(lone)))
    (records / "stray-dup.json").write_text(json.dumps(_record_json(dup)))
    (records / "damaged.json").write_text("{")
    registry.write(MountRecord("i", "l", "/s", keyed, "fuse", None, 0.0))
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(_record_json(str(tmp_path / "o"))))
    (records / "link.json").symlink_to(outside)
    os.mkfifo(records / "fifo.json")
    (records / "dir.json").mkdir()
    theirs = records / "theirs.json"
    theirs.write_text("{")
    os.chown(theirs, 65534, 65534)
    expected = {registry._record_path(Path(p)).name for p in (keyed, lone, dup)}
    with registry.locked():
        done = registry.tidy()
    assert len(done) == 3, done
    names = {p.name for p in records.iterdir()}
    assert names == expected | {"link.json", "fifo.json", "dir.json", "theirs.json"}
    assert outside.is_file() and theirs.read_text() == "{"
    assert sorted(r.mountpoint for r in registry.records()) == sorted([keyed, lone, dup])
    record = registry.record(Path(lone))
    assert record is not None and record.image == "i" * 64
