"""The squash store as podman 4.3 reads it: init, publish, names, rmi, gc, verify, crash
safety and concurrency, checked with a real hermetic podman whose only image source is the
store. Squash files here come from a test-only squasher (``podman export`` piped into
``sqfstar``), so the store is tested independently of the native writer.

Also holds the helpers test_mounts.py and test_migrate.py import (`store_image_source`,
`make_squash`, `publish_test_image`, `consumer`, `store_env`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from squashstore import host, locking, podmanstore
from squashstore.image import Image
from squashstore.migrate import migrate_image
from squashstore.mounts import Registry
from squashstore.store import (
    NameError_,
    Publication,
    Store,
    StoreError,
    atomic_write_json,
    normalize_name,
)
from support.fixture_trees import write_base_tar
from support.podman import Podman

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
IMAGE = "localhost/sqs-store-test:1"
IMAGE2 = "localhost/sqs-store-test2:1"
CHANGES = ("ENV SQS_STORE=yes", "ENV PATH=/bin", 'ENTRYPOINT ["/bin/sh", "-c"]',
           'CMD ["echo default-cmd"]', "WORKDIR /opt/app", "USER 1234:5678",
           'LABEL org.example.store="yes"')


# --------------------------------------------------------------------------- helpers

@dataclass(frozen=True)
class SqLayer:
    """What the test squasher returns (the fields migrate_image reads)."""

    path: Path
    diff_digest: str
    diff_size: int
    tar_split: Path | None = None


def store_image_source(podman: Podman, name: str) -> Image:
    """An `Image` for a podman image, read straight from podman's store (no layers)."""
    info = podman.inspect(name)
    iid = str(info["Id"])
    records = json.loads((podman.graphroot / "overlay-images" / "images.json").read_text())
    record = next(r for r in records if r["id"] == iid)
    folder = podman.graphroot / "overlay-images" / iid
    manifest = (folder / "manifest").read_bytes()
    config_digest = json.loads(manifest)["config"]["digest"]
    config = (folder / podmanstore.big_data_name(config_digest)).read_bytes()
    return Image(reference=f"containers-storage:{name}", names=tuple(record["names"]),
                 manifest=manifest, manifest_digest="sha256:" + hashlib.sha256(manifest)
                 .hexdigest(), config=config, config_digest=config_digest, layers=(),
                 source_id=iid)


def make_squash(podman: Podman, name: str, dest: Path, comp: str = "gzip") -> SqLayer:
    """The image's merged rootfs (``podman export``) as a squash file; digest of that tar."""
    tar = dest.with_suffix(".tar")
    podman.export(name, tar)
    digest = hashlib.sha256(tar.read_bytes()).hexdigest()
    with open(tar, "rb") as stdin:
        subprocess.run(["sqfstar", "-quiet", "-no-progress", "-comp", comp, "-force",
                        str(dest)], stdin=stdin, check=True, capture_output=True)
    size = tar.stat().st_size
    tar.unlink()
    return SqLayer(dest, "sha256:" + digest, size)


class CopySquasher:
    """A squasher that copies a prepared squash file (and may sleep, to be killed)."""

    def __init__(self, layer: SqLayer, delay: float = 0.0) -> None:
        self.layer = layer
        self.delay = delay

    def __call__(self, image: Image, dest: Path, options: Any, tar_split: Path) -> SqLayer:
        shutil.copyfile(self.layer.path, dest)
        time.sleep(self.delay)
        return SqLayer(dest, self.layer.diff_digest, self.layer.diff_size)


def store_env(runtime_dir: Path, backend: str = "kernel",
              overlay: str = "auto") -> dict[str, str]:
    """Environment for squashstore processes: private runtime dir and config."""
    config = runtime_dir.parent / f"config-{backend}.toml"
    config.write_text(f'[mount]\nbackend = "{backend}"\noverlay = "{overlay}"\n')
    return {"SQUASHSTORE_RUNTIME_DIR": str(runtime_dir), "SQUASHSTORE_CONFIG": str(config)}


MOUNT_PROGRAM = PYTHON.parent / "squashstore-mount-program"
"""The installed mount program: `squashstore.launcher`'s ``python -I -S`` script, which
scripts/install writes over the console script."""


def write_wrapper(path: Path, env: dict[str, str]) -> Path:
    """The installed mount program as podman calls it, with `env` exported."""
    exports = "".join(f"export {k}='{v}'\n" for k, v in env.items())
    path.write_text(f"#!/bin/sh\n{exports}exec {MOUNT_PROGRAM} \"$@\"\n")
    path.chmod(0o755)
    return path


def cli(store: Path, *args: str, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(PYTHON), "-m", "squashstore.cli.main", "--store", str(store),
                           *args], capture_output=True, text=True, env=env, check=False,
                          stdin=subprocess.DEVNULL, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"squashstore {' '.join(args)}: {proc.stderr}")
    return proc


def unmount_below(path: Path) -> None:
    for point in sorted(host.mount_table(), key=len, reverse=True):
        if point.startswith(str(path.resolve()) + "/"):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


@dataclass
class Env:
    store: Store
    runtime_dir: Path
    env: dict[str, str]
    consumer: Podman
    producer: Podman
    squash: SqLayer
    squash2: SqLayer


@pytest.fixture(scope="module")
def images(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> dict[str, SqLayer]:
    """Two test images in the session podman, and their prepared squash files."""
    work = tmp_path_factory.mktemp("store-images")
    tar = write_base_tar(work / "base.tar")
    podman.import_tar(tar, IMAGE, *CHANGES)
    podman.import_tar(tar, IMAGE2, "ENV SECOND=2", 'CMD ["/bin/sh"]', "ENV PATH=/bin")
    # Second image gets different content: one extra file on top.
    ctx = work / "ctx"
    ctx.mkdir()
    (ctx / "extra").write_text("second image\n")
    (ctx / "Containerfile").write_text(f"FROM {IMAGE2}\nCOPY extra /extra\n")
    podman.build(ctx, IMAGE2)
    return {IMAGE: make_squash(podman, IMAGE, work / "one.sqfs"),
            IMAGE2: make_squash(podman, IMAGE2, work / "two.sqfs")}


@contextlib.contextmanager
def store_setup(base: Path, podman: Podman, make_podman: Any, images: dict[str, SqLayer],
                backend: str = "kernel", overlay: str = "auto") -> Iterator[Env]:
    base.mkdir(parents=True, exist_ok=True)
    store = Store(base / "store")
    store.init()
    run_dir = base / "run"
    env = store_env(run_dir, backend, overlay)
    wrapper = write_wrapper(base / "mount-program", env)
    consumer = make_podman(additional_stores=[store.root], mount_program=str(wrapper))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield Env(store, run_dir, {**consumer.env, **env}, consumer, podman,
                  images[IMAGE], images[IMAGE2])
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        consumer.close()
        Registry(run_dir).umount_all(lazy=True)
        unmount_below(base)


@pytest.fixture
def env(tmp_path: Path, podman: Podman, make_podman: Any,
        images: dict[str, SqLayer]) -> Iterator[Env]:
    with store_setup(tmp_path, podman, make_podman, images) as e:
        yield e


def publish(e: Env, name: str = IMAGE, delay: float = 0.0, mount: bool = True) -> Any:
    layer = e.squash if name == IMAGE else e.squash2
    return migrate_image(e.store, store_image_source(e.producer, name), {"test": True},
                         mount=mount, registry=Registry(e.runtime_dir),
                         squasher=CopySquasher(layer, delay))


def store_snapshot(store: Store) -> dict[str, bytes]:
    """Every regular file and symlink of the store (for "store unchanged" checks)."""
    out = {}
    mounted = host.mount_table()
    for root, dirs, files in os.walk(store.root):
        dirs[:] = [d for d in dirs if host.real_path(Path(root) / d) not in mounted]
        for name in [*files, *dirs]:
            path = Path(root) / name
            key = str(path.relative_to(store.root))
            if path.is_symlink():
                out[key] = os.readlink(path).encode()
            elif path.is_file() and not name.endswith(".lock"):
                out[key] = path.read_bytes()
            elif path.is_dir():
                out[key] = b"<dir>"
    return out


def podman_images(p: Podman) -> list[dict[str, Any]]:
    data = json.loads(p.text("images", "--format", "json"))
    assert isinstance(data, list)
    return data


# --------------------------------------------------------------------------- pure parts

@given(st.from_regex(r"[a-z][a-z0-9]{0,8}(/[a-z][a-z0-9]{0,8}){0,2}(:[a-z0-9]{1,5})?",
                     fullmatch=True))
def test_normalize_name_is_idempotent_and_qualified(name: str) -> None:
    full = normalize_name(name)
    assert normalize_name(full) == full
    domain, _, rest = full.partition("/")
    assert domain in ("localhost", "docker.io") or "." in domain or ":" in domain
    assert ":" in rest.rsplit("/", 1)[-1]


def test_normalize_name_examples() -> None:
    assert normalize_name("alpine") == "localhost/alpine:latest"
    assert normalize_name("docker.io/alpine") == "docker.io/library/alpine:latest"
    assert normalize_name("quay.io/a/b:1.0") == "quay.io/a/b:1.0"
    assert normalize_name("localhost:5000/x") == "localhost:5000/x:latest"
    for bad in ("", "UPPER", "a b", "sha256:" + "0" * 64, "x::y"):
        with pytest.raises(NameError_):
            normalize_name(bad)


def test_lock_token_changes_and_lock_excludes(tmp_path: Path) -> None:
    lock = tmp_path / "layers.lock"
    with locking.exclusive(lock) as fd:
        locking.touch_token(fd)
    first = locking.read_token(lock)
    assert len(first) == 64 and all(c in b"0123456789abcdef" for c in first)
    with locking.exclusive(lock) as fd:
        locking.touch_token(fd)
    assert locking.read_token(lock) != first
    # Another process cannot take the lock while we hold it (fcntl record lock).
    probe = ("import fcntl,sys; f=open(sys.argv[1],'r+');\n"
             "try:\n fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB); print('got')\n"
             "except OSError: print('busy')")
    with locking.exclusive(lock):
        out = subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert out == "busy"
    out = subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "got"


def test_init_layout_and_modes(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        store = Store(tmp_path / "s")
        store.init()
        store.init()
    finally:
        os.umask(old)
    assert (store.meta / "format-version").read_text() == "1\n"
    assert json.loads(store.layers_json.read_text()) == []
    assert json.loads(store.images_json.read_text()) == []
    assert store.layers_lock.is_file() and store.images_lock.is_file()
    assert store.verify_structure() == []
    for path in [store.root, *store.root.rglob("*")]:
        mode = path.stat().st_mode
        if store.is_private_lock(path):  # the writers' own (test_adv5: another user's read
            assert stat.S_IMODE(mode) == 0o600, path  # lock on it would hang them)
        else:
            assert mode & (0o005 if path.is_dir() else 0o004), path


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.init()
    store.format_file.write_text("99\n")
    with pytest.raises(StoreError, match="format"):
        store.images()
    assert not Store(tmp_path / "nothing").is_store(tmp_path / "nothing")


# --------------------------------------------------------------------------- with podman

def test_empty_store_works_in_podman_also_read_only(env: Env, tmp_path: Path) -> None:
    assert podman_images(env.consumer) == []
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(env.store.root), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")
        reader = Podman(tmp_path / "ro-podman", additional_stores=[ro])
        try:
            assert podman_images(reader) == []
        finally:
            reader.close()
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_published_image_lists_runs_and_inspects(env: Env) -> None:
    image = publish(env)
    listed = podman_images(env.consumer)
    assert len(listed) == 1
    assert listed[0]["Id"] == image.id
    assert listed[0]["Names"] == [IMAGE]
    assert listed[0]["Digest"] == image.digest
    source_created = env.producer.inspect(IMAGE)["Created"]
    info = env.consumer.inspect(IMAGE)
    assert info["Created"] == source_created
    assert info["RootFS"] == {"Type": "layers", "Layers": [f"sha256:{image.layer}"]}
    config = info["Config"]
    assert isinstance(config, dict)
    assert config["Entrypoint"] == ["/bin/sh", "-c"]
    assert config["WorkingDir"] == "/opt/app"
    assert config["User"] == "1234:5678"
    assert "SQS_STORE=yes" in config["Env"]
    assert config["Labels"]["org.example.store"] == "yes"
    out = env.consumer.text("run", "--rm", "--pull=never", IMAGE,
                            "echo $SQS_STORE; pwd; id -u; id -g; cat /etc/config")
    assert out.splitlines()[:4] == ["yes", "/opt/app", "1234", "5678"]
    assert env.consumer.text("run", "--rm", "--pull=never", IMAGE) == "default-cmd"
    history = json.loads(env.consumer.text("history", "--format", "json", IMAGE))
    assert "squashstore" in history[0]["CreatedBy"] and history[0]["id"] == image.id
    assert history[0]["size"] == image.size
    source_history = json.loads(env.producer.text("history", "--format", "json", IMAGE))
    assert [h["CreatedBy"] for h in history[1:]] == [h["CreatedBy"] for h in source_history]
    assert env.store.verify_structure() == []
    # podman sees the layer's diff mounted, and the token of its lock files was rewritten.
    assert host.is_mountpoint(image.diff)
    assert len(locking.read_token(env.store.images_lock)) == 64


def test_republish_same_source_only_adds_names(env: Env) -> None:
    first = publish(env)
    squash_mtime = first.squash.stat().st_mtime_ns
    env.producer.run("tag", IMAGE, "localhost/sqs-extra-name:2")
    try:
        again = publish(env)
    finally:
        env.producer.run("untag", IMAGE, "localhost/sqs-extra-name:2")
    assert again.id == first.id
    assert set(again.names) == {IMAGE, "localhost/sqs-extra-name:2"}
    assert again.squash.stat().st_mtime_ns == squash_mtime
    assert len(env.store.images()) == 1


def test_names_move_and_are_never_on_two_images(env: Env) -> None:
    one = publish(env)
    two = publish(env, IMAGE2)
    cli(env.store.root, "tag", IMAGE2, "shared:tag", env=env.env)
    cli(env.store.root, "tag", one.id[:12], "shared:tag", env=env.env)
    by_id = {i.id: i for i in env.store.images()}
    assert "localhost/shared:tag" in by_id[one.id].names
    assert "localhost/shared:tag" not in by_id[two.id].names
    assert env.store.verify_structure() == []
    assert {i["Id"]: sorted(i["Names"]) for i in podman_images(env.consumer)} == {
        one.id: sorted([IMAGE, "localhost/shared:tag"]), two.id: [IMAGE2]}
    cli(env.store.root, "untag", IMAGE2, IMAGE2, env=env.env)
    # A dangling image stays until gc.
    assert env.store.resolve(two.id).names == ()
    assert {i["Id"] for i in podman_images(env.consumer)} == {one.id, two.id}
    gone = cli(env.store.root, "gc", env=env.env).stdout
    assert f"image {two.id}" in gone
    assert [i.id for i in env.store.images()] == [one.id]
    assert not two.squash.exists() or two.layer == one.layer
    assert env.store.verify_structure() == []
    podman_images(env.consumer)


def test_rewrites_keep_every_field_podman_or_a_later_version_wrote(env: Env) -> None:
    """Fields the typed records do not model (podman's ``names-history``, a future key)
    survive every rewrite of images.json and layers.json, in their place."""
    one = publish(env)
    extra = {"names-history": [IMAGE], "future-field": {"nested": [1, 2]}}
    images = podmanstore.load_records(env.store.images_json)
    layers = podmanstore.load_records(env.store.layers_json)
    images[0].update(extra)
    layers[0].update(extra)
    atomic_write_json(env.store.images_json, images)
    atomic_write_json(env.store.layers_json, layers)
    before_image = list(images[0])
    two = publish(env, IMAGE2)  # rewrites both files
    env.store.add_names(one.id, ("again:1",))  # one's record changes
    env.store.add_names(two.id, ("again:1",))  # ... and again: the name moves to two
    env.store.remove_image(two.id)  # rewrites images.json and layers.json
    assert env.store.resolve(one.id).names == (IMAGE,)
    for path, keys in ((env.store.images_json, before_image), (env.store.layers_json, None)):
        record = next(r for r in podmanstore.load_records(path) if r["id"] in (one.id,
                                                                                 one.layer))
        assert {k: record[k] for k in extra} == extra, path
        if keys is not None:
            assert list(record) == keys, path
    assert env.store.verify_structure() == []
    podman_images(env.consumer)


def test_rmi_refuses_while_used_and_unmounts(env: Env) -> None:
    image = publish(env)
    cli(env.store.root, "tag", IMAGE, "second:name", env=env.env)
    out = cli(env.store.root, "rmi", "second:name", env=env.env).stdout
    assert "untagged localhost/second:name" in out
    cid = env.consumer.text("create", "--pull=never", IMAGE, "true")
    refused = cli(env.store.root, "rmi", IMAGE, env=env.env, check=False)
    assert refused.returncode == 1
    assert refused.stderr.startswith("squashstore: ") and "in use" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert env.store.resolve(image.id).names == (IMAGE,)
    env.consumer.run("rm", cid)
    cli(env.store.root, "rmi", IMAGE, env=env.env)
    assert env.store.images() == []
    assert not host.is_mountpoint(image.diff)
    assert not image.squash.exists()
    assert not (env.store.overlay / image.layer).exists()
    assert sorted(os.listdir(env.store.links)) == []
    assert podman_images(env.consumer) == []
    assert env.store.verify_structure() == []


def test_rmi_force_removes_a_used_image(env: Env) -> None:
    image = publish(env)
    env.consumer.text("create", "--pull=never", IMAGE, "true")
    cli(env.store.root, "rmi", "--force", image.id[:12], env=env.env)
    assert env.store.images() == []
    assert podman_images(env.consumer) == []


def test_gc_removes_dead_writers_leftovers_but_not_live_ones(env: Env) -> None:
    image = publish(env, mount=False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    dead_tag = host.ProcessId(host.hostname(), dead.pid, 1).tag()
    leftovers = [env.store.tmp_dir / f"{dead_tag}.abc", env.store.squash_dir /
                 f".x.sqfs.{dead_tag}.1234{'.sqtmp'}", env.store.overlay / ("f" * 64),
                 env.store.images_dir / ("e" * 64), env.store.squash_dir / f"{'d' * 64}.sqfs"]
    for path in leftovers:
        if path.suffix in (".sqfs", ".sqtmp"):
            path.write_bytes(b"x")
        else:
            path.mkdir()
    live = env.store.tmp_dir / f"{host.me().tag()}.live"
    live.mkdir()
    orphan = {"id": "c" * 64, "diff-digest": "sha256:" + "c" * 64}
    atomic_write_json(env.store.layers_json,
                      [*(r.to_json() for r in env.store.layer_records()), orphan])
    removed = cli(env.store.root, "gc", env=env.env).stdout
    assert "c" * 64 in removed
    for path in leftovers:
        assert not path.exists(), path
    assert live.exists()
    live.rmdir()
    assert [i.id for i in env.store.images()] == [image.id]
    assert [r.id for r in env.store.layer_records()] == [image.layer]
    assert env.store.verify_structure() == []


def test_bad_input_is_one_line_and_leaves_the_store_unchanged(env: Env, tmp_path: Path) -> None:
    publish(env)
    before = store_snapshot(env.store)
    for args in (["rmi", "no-such-image"], ["tag", "no-such", "x"], ["inspect", "nothing"],
                 ["tag", IMAGE, "Bad Name"], ["untag", IMAGE, "not-a-name-it-has"],
                 ["mount", "missing:1"]):
        proc = cli(env.store.root, *args, env=env.env, check=False)
        assert proc.returncode != 0, args
        assert proc.stderr.startswith("squashstore: "), (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
    assert store_snapshot(env.store) == before
    missing = cli(tmp_path / "not-a-store", "images", env=env.env, check=False)
    assert missing.returncode == 1 and "not a squash store" in missing.stderr


def test_unwritable_store_is_refused_cleanly(env: Env, tmp_path: Path) -> None:
    image = publish(env)
    before = store_snapshot(env.store)
    subprocess.run(["mount", "--bind", str(env.store.root), str(env.store.root)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(env.store.root)], check=True)
        proc = cli(env.store.root, "tag", IMAGE, "other:1", env=env.env, check=False)
        assert proc.returncode == 1
        assert proc.stderr.startswith("squashstore: ") and len(proc.stderr.splitlines()) == 1
        assert "read-only" in proc.stderr.lower()
        with pytest.raises(OSError):
            publish(env, IMAGE2, mount=False)
        # podman still reads it.
        assert [i["Id"] for i in podman_images(env.consumer)] == [image.id]
    finally:
        subprocess.run(["umount", "-l", str(env.store.root)], check=True)
    assert store_snapshot(env.store) == before


def test_full_store_filesystem(tmp_path: Path, podman: Podman, make_podman: Any,
                               images: dict[str, SqLayer]) -> None:
    base = tmp_path / "small"
    base.mkdir()
    size = images[IMAGE].path.stat().st_size + 200_000
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(base)],
                   check=True)
    try:
        with store_setup(base, podman, make_podman, images) as e:
            first = publish(e)
            before = store_snapshot(e.store)
            with pytest.raises(OSError) as info:
                publish(e, IMAGE2, mount=False)
            assert info.value.errno == 28
            assert store_snapshot(e.store) == before
            assert [i["Id"] for i in podman_images(e.consumer)] == [first.id]
            assert list(e.store.tmp_dir.iterdir()) == []
    finally:
        unmount_below(base)
        subprocess.run(["umount", "-l", str(base)], check=False)


# --------------------------------------------------------------------------- crash and races

CHILD = """
import json, shutil, sys, time
from dataclasses import dataclass
from pathlib import Path
from squashstore.image import Image
from squashstore.migrate import migrate_image
from squashstore.mounts import Registry
from squashstore.store import Store
spec = json.loads(Path(sys.argv[2]).read_text())
@dataclass
class Layer:
    path: Path
    diff_digest: str
    diff_size: int
    tar_split: None = None
def squasher(image, dest, options, tar_split):
    shutil.copyfile(spec["squash"], dest)
    time.sleep(spec["delay"])
    return Layer(dest, spec["diff_digest"], spec["diff_size"])
image = Image(reference=spec["reference"], names=tuple(spec["names"]),
              manifest=spec["manifest"].encode(), manifest_digest=spec["manifest_digest"],
              config=spec["config"].encode(), config_digest=spec["config_digest"], layers=(),
              source_id=spec["source_id"])
print("started", flush=True)
migrate_image(Store(Path(sys.argv[1])), image, {"test": True}, mount=False,
              registry=Registry(), squasher=squasher)
print("done", flush=True)
"""


def spawn_publisher(e: Env, name: str, delay: float,
                    extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    image = store_image_source(e.producer, name)
    layer = e.squash if name == IMAGE else e.squash2
    spec = e.store.root.parent / f"spec-{hashlib.sha256(name.encode()).hexdigest()[:8]}.json"
    spec.write_text(json.dumps({
        "reference": image.reference, "names": image.names,
        "manifest": image.manifest.decode(), "manifest_digest": image.manifest_digest,
        "config": image.config.decode(), "config_digest": image.config_digest,
        "source_id": image.source_id, "squash": str(layer.path),
        "diff_digest": layer.diff_digest, "diff_size": layer.diff_size, "delay": delay}))
    code = CHILD
    return subprocess.Popen([str(PYTHON), "-c", code, str(e.store.root), str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **e.env, **(extra_env or {})}, cwd=REPO)


@pytest.mark.slow
def test_sigkill_at_random_points_leaves_a_valid_store(env: Env) -> None:
    rng = random.Random(4)
    complete = publish(env, IMAGE)
    outcomes = {"killed": 0, "done": 0}
    for trial in range(20):
        child = spawn_publisher(env, IMAGE2, 0.0)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "started"
        time.sleep(rng.uniform(0.0, 0.15))
        child.send_signal(signal.SIGKILL)
        child.wait()
        done = child.returncode == 0
        outcomes["done" if done else "killed"] += 1
        staged = any(env.store.tmp_dir.iterdir())
        published = any(r.names == (IMAGE2,) for r in env.store.image_records())
        outcomes["staged" if staged else "published" if published else "other"] = (
            outcomes.get("staged" if staged else "published" if published else "other", 0) + 1)
        listed = {i["Id"]: i for i in podman_images(env.consumer)}
        assert complete.id in listed, trial
        # Every image podman lists is complete: its squash file and layer are in place.
        for record in env.store.image_records():
            lid = record.layer
            assert env.store.squash_file(lid).is_file(), trial
            assert any(r.id == lid for r in env.store.layer_records()), trial
        if trial % 10 == 0:
            assert "default-cmd" in env.consumer.text("run", "--rm", "--pull=never", IMAGE)
        if trial % 2 == 0:
            env.store.gc(lambda image: False)
            assert env.store.verify_structure() == []
            assert list(env.store.tmp_dir.iterdir()) == []
            if len(env.store.images()) == 2:
                env.store.remove_image(env.store.resolve(IMAGE2).id)
    print(outcomes)
    assert outcomes["killed"] > 0
    publish(env, IMAGE2)
    assert {i["Names"][0] for i in podman_images(env.consumer)} == {IMAGE, IMAGE2}
    assert "second image" in env.consumer.text("run", "--rm", "--pull=never", IMAGE2,
                                               "cat", "/extra")
    cli(env.store.root, "gc", env=env.env)
    assert env.store.verify_structure() == []


def test_sigkill_inside_publish_at_every_step(env: Env) -> None:
    """Kills timed to land inside publish itself (test hook `publish_hook`): after each, podman
    lists the store, verify is ok, gc removes the leftovers, and publishing again works."""
    from squashstore.store import PUBLISH_HOOK, PUBLISH_STEPS

    complete = publish(env, IMAGE)
    for step in PUBLISH_STEPS:
        hook = env.store.root.parent / f"hook-{step}"
        hook.mkdir()
        for earlier in PUBLISH_STEPS[:PUBLISH_STEPS.index(step)]:
            (hook / f"{earlier}.go").touch()
        child = spawn_publisher(env, IMAGE2, 0.0, {PUBLISH_HOOK: str(hook)})
        deadline = time.monotonic() + 120
        while not (hook / f"{step}.reached").exists():
            assert child.poll() is None and time.monotonic() < deadline, child.stderr
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
        listed = {i["Id"] for i in podman_images(env.consumer)}
        assert complete.id in listed, step
        for record in env.store.image_records():
            assert env.store.squash_file(record.layer).is_file(), step
        assert env.store.verify_structure() == [], step
        assert "ok: " in cli(env.store.root, "verify", env=env.env).stdout, step
        cli(env.store.root, "gc", env=env.env)
        assert list(env.store.tmp_dir.iterdir()) == [], step
        assert env.store.verify_structure() == [], step
        if step == "image-record":
            assert {n for i in podman_images(env.consumer) for n in i["Names"]} == {
                IMAGE, IMAGE2}
            env.store.remove_image(env.store.resolve(IMAGE2).id)
        else:  # not yet visible: gc took every piece of it
            assert len(env.store.images()) == 1 and len(env.store.layer_records()) == 1, step
            assert sorted(os.listdir(env.store.squash_dir)) == [f"{complete.layer}.sqfs"]
    publish(env, IMAGE2)
    assert "second image" in env.consumer.text("run", "--rm", "--pull=never", IMAGE2,
                                               "cat", "/extra")


@pytest.mark.slow
def test_concurrent_publishes_while_podman_lists(env: Env) -> None:
    lister = subprocess.Popen(
        ["sh", "-c", "while [ ! -e stop ]; do podman images --format json >/dev/null "
         "|| { echo FAIL; exit 1; }; echo ok; done"],
        cwd=env.store.root.parent, env=env.consumer.env, stdout=subprocess.PIPE, text=True)
    try:
        publishers = [spawn_publisher(env, name, 0.2)
                      for name in (IMAGE, IMAGE2, IMAGE, IMAGE2)]
        for proc in publishers:
            _out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
    finally:
        (env.store.root.parent / "stop").write_text("")
        out, _ = lister.communicate(timeout=120)
    assert lister.returncode == 0 and "FAIL" not in out and "ok" in out
    listed = podman_images(env.consumer)
    assert sorted(n for i in listed for n in i["Names"]) == sorted([IMAGE, IMAGE2])
    assert env.store.verify_structure() == []


def test_inspect_and_verify_detect_damage(env: Env) -> None:
    image = publish(env)
    data = json.loads(cli(env.store.root, "inspect", IMAGE, env=env.env).stdout)
    assert data["id"] == image.id and data["names"] == [IMAGE]
    assert data["config"]["config"]["User"] == "1234:5678"
    assert data["source"]["digest"] == store_image_source(env.producer, IMAGE).manifest_digest
    assert data["squash"]["options"] == {"test": True}
    assert data["mounted"] is True and data["mount"]["backend"] == "kernel"
    assert "ok: 1 image(s)" in cli(env.store.root, "verify", env=env.env).stdout
    # A damaged config and a truncated squash file are both reported.
    config = env.store.images_dir / image.id / podmanstore.big_data_name("sha256:" + image.id)
    config.write_bytes(config.read_bytes() + b" ")
    cli(env.store.root, "umount", "--all", env=env.env)
    with open(image.squash, "r+b") as file:
        file.truncate(image.squash.stat().st_size // 2)
    proc = cli(env.store.root, "verify", env=env.env, check=False)
    assert proc.returncode == 1
    assert "digest" in proc.stdout and str(image.squash) in proc.stdout
    assert proc.stderr.startswith("squashstore: ") and "problem" in proc.stderr


def test_remove_tree_never_descends_into_a_mount(env: Env) -> None:
    image = publish(env)
    from squashstore.store import remove_tree

    with pytest.raises(StoreError, match="still mounted"):
        remove_tree(env.store.overlay / image.layer)
    assert (image.diff / "bin" / "busybox").is_file()


def test_init_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    proc = cli(tmp_path / "home", "init", check=False)
    assert proc.returncode == 1 and "not empty and not a squash store" in proc.stderr
    assert os.listdir(tmp_path / "home") == ["notes.txt"]


OPS = st.lists(st.tuples(st.sampled_from(["publish", "tag", "untag", "rmi", "gc"]),
                         st.integers(0, 2), st.sampled_from(["a:1", "b:1", "c:2"])),
               max_size=12)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_store_invariants_hold_under_any_operation_sequence(
        tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, str]]) -> None:
    """A model of names: after every operation the store verifies, no name is on two
    images, and the names are exactly the model's."""
    store = Store(tmp_path_factory.mktemp("model") / "s")
    store.init()
    model: dict[str, set[str]] = {}
    ids: dict[int, str] = {}
    for op, which, name in ops:
        full = normalize_name(name)
        if op == "publish":
            with store.staging() as stage:
                (stage / "layer.sqfs").write_bytes(b"squash %d" % which)
                config = json.dumps({"n": which}).encode()
                image = store.publish(Publication(
                    stage / "layer.sqfs", "sha256:" + f"{which:x}" * 64, 10 + which, config,
                    b"{}", (name,), "2024-01-01T00:00:00Z"))
            ids[which] = image.id
            for names in model.values():
                names.discard(full)
            model.setdefault(image.id, set()).add(full)
        elif which in ids and ids[which] in model:
            iid = ids[which]
            if op == "tag":
                store.add_names(iid, (name,))
                for names in model.values():
                    names.discard(full)
                model[iid].add(full)
            elif op == "untag":
                if full in model[iid]:
                    store.remove_name(iid, name)
                    model[iid].discard(full)
                else:
                    with pytest.raises(StoreError):
                        store.remove_name(iid, name)
            elif op == "rmi":
                store.remove_image(iid)
                del model[iid]
        if op == "gc":
            store.gc(lambda image: False)
            model = {iid: names for iid, names in model.items() if names}
        assert store.verify_structure() == []
        assert {i.id: set(i.names) for i in store.images()} == model
        live = {i.layer for i in store.images()}
        assert {p.name.removesuffix(".sqfs") for p in store.squash_dir.iterdir()} == live
        assert {e for e in os.listdir(store.overlay) if e != "l"} == live
        assert len(os.listdir(store.links)) == len(live)
