"""squashstore end to end for an ordinary user with rootless podman.

The module fixture makes the user (``sqsuser``, reused when it exists) with subordinate id
ranges, a venv readable by that user with a non-editable install of this checkout (Debian's
``/usr/bin/python3``: the project venv's interpreter is not readable by other users; the venv
with the dependencies is cached under ``/tmp/sqs-rootless`` per pyproject.toml, only the
package is reinstalled each session), ``/dev/fuse`` usable by the user, a hermetic home
and podman configuration in a temp dir the user owns, and a fresh ``/run/user/UID`` (the
runtime directory: the poststop hook finds the registry only there). Everything
else runs as that user (``runuser``): build a multi-layer image in the user's rootless
podman (one layer holds a directory and a file owned by a container uid, mode 0700/0600, so
outside podman's user namespace the user cannot read them), ``migrate`` it, write
``squashstore config``'s lines into a consumer storage.conf, ``podman run`` it through the
mount program (the project's FUSE server under fuse-overlayfs, inside podman's namespace),
then ``mounts``, ``cleanup --grace 0`` and the poststop hook. Teardown removes the
containers, unmounts, ends the user's podman pause process (by its pid file) and deletes
the temp dir. Needs root and the packages of scripts/install; it fails, never skips, when
something is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
USER = "sqsuser"
CACHE = Path("/tmp/sqs-rootless")
SYSTEM_PYTHON = "/usr/bin/python3"
SUBID_COUNT = 65536
IMAGE = "localhost/sqsrootless:1"
SOURCE_PARTS = ("pyproject.toml", "README.md", "squashstore", "fuse", "cli")
TOOLS = ("podman", "runuser", "newuidmap", "newgidmap", "fuse-overlayfs", "fusermount3",
         "busybox", "useradd")

pytestmark = [pytest.mark.podman, pytest.mark.root, pytest.mark.slow]


def _require(condition: bool, message: str) -> None:
    if not condition:
        pytest.fail(f"rootless test cannot run: {message}", pytrace=False)


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    assert isinstance(proc, subprocess.CompletedProcess)
    return proc


def _ok(argv: list[str], **kwargs: object) -> str:
    proc = _run(argv, **kwargs)
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}):\n{proc.stderr}"
    return str(proc.stdout)


# ---- the user and the machine -------------------------------------------------------------

def _subid_ranges(path: Path) -> list[tuple[str, int, int]]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def _ensure_subids(name: str, uid: int) -> None:
    """A range of ``SUBID_COUNT`` ids in /etc/subuid and /etc/subgid (kept when present)."""
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        ranges = _subid_ranges(path)
        if any(owner in (name, str(uid)) and count >= SUBID_COUNT
               for owner, _, count in ranges):
            continue
        start = max([100000, *(s + c for _, s, c in ranges)])
        with path.open("a") as f:
            f.write(f"{name}:{start}:{SUBID_COUNT}\n")


def _ensure_user() -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        _ok(["useradd", "--create-home", "--shell", "/bin/sh", USER])
        entry = pwd.getpwnam(USER)
    _ensure_subids(USER, entry.pw_uid)
    return entry


@pytest.fixture(scope="module")
def fuse_device() -> Iterator[None]:
    """/dev/fuse usable by the user (it is 0600 on some machines); the mode is restored."""
    dev = Path("/dev/fuse")
    _require(dev.exists(), "/dev/fuse is missing")
    mode = dev.stat().st_mode & 0o777
    dev.chmod(0o666)
    try:
        yield
    finally:
        dev.chmod(mode)


# ---- the user's venv ----------------------------------------------------------------------

def _copy_source(dest: Path) -> None:
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for part in SOURCE_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=ignore)
        else:
            shutil.copy2(src, dest / part)


def _pip(venv: Path, *args: str) -> None:
    proc = _run([str(venv / "bin/python"), "-m", "pip", "install", "-q", *args])
    assert proc.returncode == 0, f"pip install {' '.join(args)} failed:\n{proc.stderr[-3000:]}"


def _user_venv(build: Path) -> Path:
    """A venv the user can run, with this checkout installed (not editable).

    The venv with the dependencies (pyfuse3 builds from source) is cached per
    pyproject.toml; the package itself is reinstalled from a copy of the checkout."""
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    CACHE.mkdir(mode=0o755, exist_ok=True)
    CACHE.chmod(0o755)
    venv = CACHE / f"venv-{key}"
    _copy_source(build / "src")
    with (CACHE / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".deps-installed").exists():
            shutil.rmtree(venv, ignore_errors=True)
            _ok([SYSTEM_PYTHON, "-m", "venv", str(venv)])
            _pip(venv, str(build / "src"))
            (venv / ".deps-installed").touch()
        _pip(venv, "--no-deps", "--force-reinstall", str(build / "src"))
        # The mount program as a wheel install's operator sets it up: the launcher
        # (python -I -S) over the console script (squashstore/launcher.py).
        _ok([str(venv / "bin/python"), "-I", "-m", "squashstore.launcher"])
    _ok(["chmod", "-R", "a+rX", str(venv)])
    return venv


# ---- the user's session -------------------------------------------------------------------

@dataclass
class UserSession:
    """Runs commands as the user with a hermetic environment in ``base``."""

    base: Path
    venv: Path
    uid: int
    runtime: Path

    @property
    def store(self) -> Path:
        return self.base / "store"

    def env(self, storage_conf: str = "storage.conf", **extra: str) -> dict[str, str]:
        home = self.base / "home"
        env = {
            "HOME": str(home), "USER": USER, "LOGNAME": USER,
            "PATH": f"{self.venv}/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "XDG_RUNTIME_DIR": str(self.runtime),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local/share"),
            "CONTAINERS_CONF": str(self.base / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.base / storage_conf),
            "LANG": "C.UTF-8",
        }
        return {**env, **extra}

    def run(self, *argv: str, env: Mapping[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = self.env() if env is None else env
        pairs = [f"{k}={v}" for k, v in env.items()]
        return _run(["runuser", "-u", USER, "--", "env", "-i", *pairs, *argv],
                    cwd=str(self.base), timeout=timeout)

    def ok(self, *argv: str, env: Mapping[str, str] | None = None) -> str:
        proc = self.run(*argv, env=env)
        assert proc.returncode == 0, \
            f"as {USER}: {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}"
        return proc.stdout

    def write(self, name: str, text: str) -> Path:
        path = self.base / name
        path.write_text(text)
        os.chown(path, self.uid, self.uid)
        return path


CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{base}/tmp"
"""

# Rootless podman 4.3.1 ignores graphroot/runroot in a $CONTAINERS_STORAGE_CONF file: the
# store is $XDG_DATA_HOME/containers/storage, the run root $XDG_RUNTIME_DIR/containers.
STORAGE_CONF = """\
[storage]
driver = "overlay"
[storage.options.overlay]
mount_program = "/usr/bin/fuse-overlayfs"
"""


def _make_dirs(base: Path, runtime: Path, uid: int, gid: int) -> None:
    for name in ("home", "tmp", "ctx"):
        (base / name).mkdir()
    # The hook (empty environment) finds the registry in /run/user/UID only: the user's
    # runtime dir must be that one. sqsuser exists for this test alone; a runtime dir left
    # by an interrupted session is stale.
    shutil.rmtree(runtime, ignore_errors=True)
    runtime.mkdir(mode=0o700, parents=True)
    for path in (base, runtime, *base.iterdir()):
        os.chown(path, uid, gid)


def _pause_pid(session: UserSession) -> int | None:
    """The pause process of this session's podman (its pid file is in the engine tmp_dir)."""
    for path in (session.base / "tmp/pause.pid", session.runtime / "libpod/tmp/pause.pid"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def _teardown(session: UserSession) -> None:
    consumer = session.env("consumer.conf") if (session.base / "consumer.conf").exists() \
        else session.env()
    session.run("podman", "rm", "--all", "--force", env=consumer, timeout=120)
    session.run("squashstore", "--store", str(session.store), "umount", "--all",
                timeout=120)
    pid = _pause_pid(session)
    if pid is not None:
        # Only the pause process this session's podman started (its own runtime dir).
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
    shutil.rmtree(session.base, ignore_errors=True)
    shutil.rmtree(session.runtime, ignore_errors=True)


@pytest.fixture(scope="module")
def session(fuse_device: None) -> Iterator[UserSession]:
    _require(os.geteuid() == 0, "needs root (it creates a user and runs as that user)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    _require(not missing, f"missing tools: {', '.join(missing)} (run scripts/install)")
    _require(Path(SYSTEM_PYTHON).exists(), f"{SYSTEM_PYTHON} is missing")
    user = _ensure_user()
    build = Path(tempfile.mkdtemp(prefix="sqs-build-"))
    try:
        venv = _user_venv(build)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    with (CACHE / "session.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # one session at a time uses sqsuser
        # Short: long paths below podman's tmp/run dirs stall it (conmon timeouts).
        base = Path(tempfile.mkdtemp(prefix="sqsu-", dir="/tmp"))
        runtime = Path(f"/run/user/{user.pw_uid}")
        _make_dirs(base, runtime, user.pw_uid, user.pw_gid)
        s = UserSession(base, venv, user.pw_uid, runtime)
        s.write("containers.conf", CONTAINERS_CONF.format(base=base))
        s.write("storage.conf", STORAGE_CONF)
        try:
            version = s.ok("squashstore", "--version")
            assert version.startswith("squashstore "), version
            yield s
        finally:
            _teardown(s)


# ---- the image ----------------------------------------------------------------------------

CONTAINERFILE = """\
FROM localhost/sqsrootless-base:1
COPY new.txt /data/new.txt
RUN ["/bin/busybox", "rm", "/data/old"]
RUN ["/bin/busybox", "sh", "-c", "mkdir /data/priv && echo secret > /data/priv/secret && \
chmod 600 /data/priv/secret && chmod 700 /data/priv && chown -R 1000:1000 /data/priv"]
"""


@pytest.fixture(scope="module")
def image(session: UserSession) -> str:
    """A four-layer image in the user's rootless podman (import + COPY + RUN rm + RUN)."""
    return _build(session)


def _build(session: UserSession) -> str:
    """Builds the fixture image in the user's podman (again, after a test removed it)."""
    ctx = session.base / "ctx"
    shutil.rmtree(ctx, ignore_errors=True)
    rootfs = ctx / "rootfs"
    for d in ("bin", "etc", "data"):
        (rootfs / d).mkdir(parents=True)
    shutil.copy2(str(shutil.which("busybox")), rootfs / "bin/busybox")
    (rootfs / "bin/sh").symlink_to("busybox")
    (rootfs / "etc/greeting").write_text("hello\n")
    (rootfs / "data/old").write_text("gone\n")
    (ctx / "new.txt").write_text("layer2\n")
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    _ok(["tar", "-C", str(rootfs), "--owner=0", "--group=0", "-cf", str(ctx / "base.tar"),
         "."])
    _ok(["chown", "-R", f"{session.uid}:{session.uid}", str(ctx)])
    session.ok("podman", "import", str(ctx / "base.tar"), "localhost/sqsrootless-base:1")
    session.ok("podman", "build", "--pull=never", "--network", "none", "-t", IMAGE, str(ctx))
    return IMAGE


# ---- the tests ----------------------------------------------------------------------------

def test_storage_conf_of_a_rootless_user_follows_podman(session: UserSession) -> None:
    """squashstore finds the same primary store rootless podman uses (not graphroot)."""
    graphroot = session.ok("podman", "info", "--format", "{{.Store.GraphRoot}}").strip()
    assert graphroot == str(session.base / "home/.local/share/containers/storage")
    code = ("from squashstore.podmanconf import load_storage_config as l; "
            "print(l().graphroot)")
    assert session.ok("python", "-c", code).strip() == graphroot
    # inside podman's namespace (uid 0 there) it is still the user's store
    assert session.ok("podman", "unshare", "python", "-c", code).strip() == graphroot


def test_layers_owned_by_subordinate_ids_are_unreadable_outside_podmans_namespace(
        session: UserSession, image: str) -> None:
    """Why squashstore runs itself under ``podman unshare``: without it migrate fails."""
    proc = session.run("squashstore", "--store", str(session.base / "other-store"),
                       "migrate", image, env=session.env(SQUASHSTORE_UNSHARE="0"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("squashstore: ") and "Permission denied" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_export_as_a_user_reads_every_layer(session: UserSession, image: str) -> None:
    """export (run inside podman's namespace) reads the files of container uid 1000."""
    session.ok("squashstore", "export", image, "-o", "rootfs.tar")  # relative to the cwd
    out = session.base / "rootfs.tar"
    assert out.stat().st_uid == session.uid
    with tarfile.open(out) as tar:
        secret = tar.getmember("data/priv/secret")
        assert (secret.uid, secret.gid, secret.mode) == (1000, 1000, 0o600)
        reader = tar.extractfile(secret)
        assert reader is not None and reader.read() == b"secret\n"
        names = tar.getnames()
    assert "data/new.txt" in names and "data/old" not in names


def test_migrate_run_mounts_cleanup_as_a_user(session: UserSession, image: str) -> None:
    store = str(session.store)
    out = session.ok("squashstore", "--store", store, "migrate", "--rm-source", image)
    assert image in out
    assert session.base.joinpath("store").stat().st_uid == session.uid
    # the mount migrate left lives in podman's namespace, where `mounts` looks
    listed = json.loads(session.ok("squashstore", "--store", store, "mounts",
                                   "--format", "json"))
    assert [m["backend"] for m in listed] == ["fuse"]

    config = session.ok("squashstore", "--store", store, "config")
    assert f'additionalimagestores = ["{store}"]' in config
    assert f"{session.venv}/bin/squashstore-mount-program" in config
    session.write("consumer.conf", '[storage]\ndriver = "overlay"\n' + config)
    consumer = session.env("consumer.conf")

    images = json.loads(session.ok("podman", "images", "--format", "json", env=consumer))
    ours = [i for i in images if f"{image}" in (i.get("Names") or [])]
    assert len(ours) == 1 and ours[0]["ReadOnly"] is True, images

    script = ("cat /etc/greeting /data/new.txt /data/priv/secret; "
              "stat -c '%u:%g %a %n' /data/priv /data/priv/secret; "
              "test -e /data/old || echo old-is-gone")
    run = session.ok("podman", "run", "--rm", "--pull=never", image,
                     "/bin/busybox", "sh", "-c", script, env=consumer)
    assert run.splitlines() == ["hello", "layer2", "secret", "1000:1000 700 /data/priv",
                                "1000:1000 600 /data/priv/secret", "old-is-gone"]
    # a container user other than root, writing (copy-up of /etc through fuse-overlayfs)
    run = session.ok("podman", "run", "--rm", "--pull=never", "--user", "1000:1000", image,
                     "/bin/busybox", "sh", "-c",
                     "cat /data/priv/secret; id -u; touch /data/priv/mine && echo wrote",
                     env=consumer)
    last_start = time.time()
    assert run.splitlines() == ["secret", "1000", "wrote"]

    listed = json.loads(session.ok("squashstore", "--store", store, "mounts",
                                   "--format", "json"))
    assert len(listed) == 1 and len(listed[0]["users"]) >= 2, listed
    assert Path(listed[0]["mountpoint"]).parent.parent.parent == session.store
    # cleanup never touches a mount younger than its minimum age (5 s), counted from the
    # last container start, which was the second run's, after the mount itself
    time.sleep(max(0.0, last_start + 6 - time.time()))
    out = session.ok("squashstore", "--store", store, "cleanup", "--grace", "0")
    assert "unmounted" in out, out
    assert json.loads(session.ok("squashstore", "--store", store, "mounts",
                                 "--format", "json")) == []
    # the next container start mounts it again, by itself
    run = session.ok("podman", "run", "--rm", "--pull=never", image, "/bin/busybox", "cat",
                     "/data/new.txt", env=consumer)
    assert run == "layer2\n"


def _migrated(session: UserSession, image: str) -> Path:
    """The consumer storage.conf (base + ``squashstore config``), migrating if needed."""
    store = str(session.store)
    listed = session.run("squashstore", "--store", store, "images", "--format", "json")
    if listed.returncode != 0 or image not in listed.stdout:
        if session.run("podman", "image", "exists", image).returncode != 0:
            _build(session)  # an earlier test migrated it with --rm-source, then rmi'd it
        session.ok("squashstore", "--store", store, "migrate", "--rm-source", image)
    config = session.ok("squashstore", "--store", store, "config")
    return session.write("consumer.conf", '[storage]\ndriver = "overlay"\n' + config)


def test_poststop_hook_unmounts_as_a_user(session: UserSession, image: str) -> None:
    """podman runs the hook inside its namespace with an empty environment; it finds the
    user's registry and unmounts the image once its last container stops."""
    store = str(session.store)
    _migrated(session, image)
    hooks = session.base / "hooks"
    hooks.mkdir(exist_ok=True)
    os.chown(hooks, session.uid, session.uid)
    session.write("hooks/squashstore.json",
                  session.ok("squashstore", "--store", store, "config", "--hooks"))
    session.write("containers-hooks.conf", CONTAINERS_CONF.format(base=session.base)
                  .replace("[engine]\n", f'[engine]\nhooks_dir = ["{hooks}"]\n'))
    env = session.env("consumer.conf", CONTAINERS_CONF=str(session.base /
                                                           "containers-hooks.conf"))
    session.ok("squashstore", "--store", store, "umount", "--all")
    cid = session.ok("podman", "run", "-d", "--pull=never", image, "/bin/busybox", "sleep",
                     "60", env=env).strip()
    try:
        listed = json.loads(session.ok("squashstore", "--store", store, "mounts",
                                       "--format", "json"))
        assert len(listed) == 1, listed
    finally:
        session.ok("podman", "stop", "-t", "0", cid, env=env)
    assert json.loads(session.ok("squashstore", "--store", store, "mounts",
                                 "--format", "json")) == []
    session.ok("podman", "rm", cid, env=env)


def test_mount_and_rmi_as_a_user(session: UserSession, image: str) -> None:
    """mount, then rmi of the mounted image: unmounted and gone from podman's view."""
    store = str(session.store)
    consumer = session.env(_migrated(session, image).name)
    session.ok("squashstore", "--store", store, "mount", image)
    listed = json.loads(session.ok("squashstore", "--store", store, "mounts",
                                   "--format", "json"))
    assert len(listed) == 1, listed
    assert "deleted" in session.ok("squashstore", "--store", store, "rmi", image)
    assert json.loads(session.ok("squashstore", "--store", store, "mounts",
                                 "--format", "json")) == []
    names = session.ok("podman", "images", "--format", "{{.Repository}}:{{.Tag}}",
                       env=consumer)
    assert image not in names.split(), names


def test_record_push_pull_lazy_and_run_as_a_user(
        session: UserSession, image: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The lazy path as an ordinary user: record a start's prefetch list, push, `pull
    --lazy` into a second store of the user's, and `podman run` from it: the FUSE server
    (in podman's namespace, as the user) fetches from the registry what the list lacks."""
    from support.registry import RegistryServer, make_pki

    pki = make_pki(tmp_path_factory.mktemp("rootless-pki"))
    server = RegistryServer(tmp_path_factory.mktemp("rootless-registry"), pki, "none")
    certs = session.base / "certs"
    certs.mkdir(exist_ok=True)
    shutil.copy(pki.certs / "ca.crt", certs / "ca.crt")
    for path in (certs, certs / "ca.crt"):
        os.chown(path, session.uid, session.uid)
    store, lazy_store = str(session.store), str(session.base / "lazy-store")
    try:
        consumer = session.env(_migrated(session, image).name)
        out = session.ok("squashstore", "--store", store, "record", "--format", "json", image,
                         "--", "podman", "run", "--rm", "--pull=never", image,
                         "/bin/busybox", "cat", "/data/new.txt", env=consumer)
        assert json.loads(out)["bytes"] > 0
        ref = f"{server.host}/rootless/lazy:1"
        session.ok("squashstore", "--store", store, "push", "--cert-dir", str(certs), image,
                   ref)
        out = session.ok("squashstore", "--store", lazy_store, "pull", "--lazy", "--format",
                         "json", "--cert-dir", str(certs), ref)
        assert json.loads(out)["lazy"] is True
        config = session.ok("squashstore", "--store", lazy_store, "config")
        env = session.env(session.write("lazy-consumer.conf",
                                        '[storage]\ndriver = "overlay"\n' + config).name)
        run = session.ok("podman", "run", "--rm", "--pull=never", ref, "/bin/busybox", "sh",
                         "-c", "cat /data/new.txt /data/priv/secret /etc/greeting", env=env)
        assert run.splitlines() == ["layer2", "secret", "hello"]
        listed = json.loads(session.ok("squashstore", "--store", lazy_store, "images",
                                       "--format", "json"))
        status = listed[0]["lazy_status"]
        assert status is not None and 0 < status["present"] <= status["size"], listed
        verified = session.ok("squashstore", "--store", lazy_store, "verify")
        # (an image whose every chunk came already is completed by verify, digest checked)
        assert ("incomplete (lazy)" in verified) == (status["present"] < status["size"])
        # A plain pull completes it, as the user.
        session.ok("squashstore", "--store", lazy_store, "pull", "--cert-dir", str(certs),
                   "--no-mount", ref)
        listed = json.loads(session.ok("squashstore", "--store", lazy_store, "images",
                                       "--format", "json"))
        assert listed[0]["lazy_status"] is None
    finally:
        session.run("podman", "rm", "--all", "--force", env=session.env("lazy-consumer.conf"))
        session.run("squashstore", "--store", lazy_store, "umount", "--all")
        server.close()
