"""``squashstore migrate`` end to end with the native writer: fixture images from the
session podman into a store, then run, exported, built FROM and saved/loaded in a consumer
podman whose only image source is the store (configured from ``squashstore config``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_store import cli, podman_images, store_env, store_snapshot, unmount_below, write_wrapper

from squashstore import host, podmanstore
from squashstore.image import SourceError
from squashstore.migrate import options_json, squashed_config
from squashstore.mounts import Registry
from squashstore.podmanstore import big_data_name
from squashstore.store import Store, atomic_write_json
from support.listing import canonical_from_tar, diff_listings, normalise_podman_export
from support.podman import Podman

MIGRATED = ("base", "whiteouts", "hardlinks", "special", "big")


class Migration:
    """A store, the environment squashstore runs with, and a consumer podman."""

    def __init__(self, base: Path, producer: Podman, make_podman: Any) -> None:
        self.store = Store(base / "store")
        self.runtime_dir = base / "run"
        squash_env = store_env(self.runtime_dir)
        self.env = {**producer.env, **squash_env}
        cli(self.store.root, "init", env=self.env)
        lines = tomllib.loads(cli(self.store.root, "config", env=self.env).stdout)
        options = lines["storage"]["options"]
        program = write_wrapper(base / "mount-program", squash_env)
        self.consumer = make_podman(additional_stores=options["additionalimagestores"],
                                    mount_program=str(program))

    def migrate(self, *args: str, check: bool = True) -> Any:
        return cli(self.store.root, "migrate", *args, env=self.env, check=check)


@pytest.fixture
def mig(tmp_path: Path, podman: Podman, make_podman: Any) -> Iterator[Migration]:
    m = Migration(tmp_path, podman, make_podman)
    try:
        yield m
    finally:
        m.consumer.close()
        Registry(m.runtime_dir).umount_all(lazy=True)
        unmount_below(tmp_path)


def test_squashed_config_keeps_run_settings_and_history() -> None:
    source = {"architecture": "amd64", "os": "linux", "created": "2024-01-02T03:04:05Z",
              "config": {"Env": ["A=1"], "Entrypoint": ["/e"], "Cmd": ["c"],
                         "WorkingDir": "/w", "User": "1:2", "Labels": {"l": "v"},
                         "ExposedPorts": {"80/tcp": {}}, "Volumes": {"/v": {}},
                         "Hostname": "dropped"},
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64,
                                                       "sha256:" + "2" * 64]},
              "history": [{"created_by": "one"}, {"created_by": "two"}]}
    config = json.loads(squashed_config(source, "sha256:" + "f" * 64))
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + "f" * 64]}
    assert config["config"] == {k: v for k, v in source["config"].items() if k != "Hostname"}
    assert [h["created_by"] for h in config["history"]][:2] == ["one", "two"]
    assert [h.get("empty_layer", False) for h in config["history"]] == [True, True, False]
    assert config["created"] == source["created"]
    assert squashed_config(source, "sha256:" + "f" * 64) == squashed_config(
        json.loads(json.dumps(source)), "sha256:" + "f" * 64)


@pytest.mark.parametrize("created", [{"x": 1}, "yesterday", "2024-01-02", 5,
                                     "2024-13-45T99:99:99Z"])
def test_squashed_config_drops_a_time_podman_cannot_parse(created: object) -> None:
    """One bad `created` copied into images.json would break podman for the whole store."""
    config = json.loads(squashed_config({"created": created, "config": {}}, "sha256:" + "f" * 64))
    assert "created" not in config
    assert all("created" not in h for h in config["history"])


def test_squashed_config_keeps_a_valid_time_and_refuses_bad_shapes() -> None:
    good = "2026-11-30T05:02:13.795017705Z"
    assert json.loads(squashed_config({"created": good}, "sha256:" + "f" * 64))["created"] == good
    for bad in ({"config": [1]}, {"rootfs": "x"}):
        with pytest.raises(SourceError, match="not a JSON object"):
            squashed_config(bad, "sha256:" + "f" * 64)


def test_options_json_ignores_jobs() -> None:
    from squashstore.squashfs.writer import SquashOptions

    assert options_json(SquashOptions(jobs=1)) == options_json(SquashOptions(jobs=2))
    assert options_json(SquashOptions(level=1)) != options_json(SquashOptions(level=2))


def test_migrate_runs_exports_builds_and_saves(mig: Migration, podman: Podman,
                                               fixture_images: dict[str, str],
                                               tmp_path: Path) -> None:
    refs = [fixture_images[name] for name in MIGRATED]
    out = mig.migrate(*refs, "--compression", "lz4", "--block-size", "64K")
    assert len(out.stdout.strip().splitlines()) == len(refs)
    listed = {n: i for i in podman_images(mig.consumer) for n in i["Names"]}
    for ref in refs:
        image = mig.store.resolve(ref)
        assert host.is_mountpoint(image.diff), "migrate leaves the image mounted"
        assert image.metadata["squash"]["options"]["compression"] == "lz4"
        assert image.metadata["squash"]["options"]["block_size"] == 64 * 1024
        assert listed[ref]["Id"] == image.id
        original = podman.inspect(ref)
        squashed = mig.consumer.inspect(ref)
        for key in ("Entrypoint", "Cmd", "Env", "WorkingDir", "User", "Labels", "ExposedPorts"):
            assert squashed["Config"].get(key) == original["Config"].get(key), key  # type: ignore[union-attr]
        assert squashed["Created"] == original["Created"]
        assert mig.consumer.text("run", "--rm", "--pull=never", ref) == \
            podman.text("run", "--rm", "--pull=never", ref)
        want = normalise_podman_export(canonical_from_tar(podman.export(ref, tmp_path / "a.tar")))
        got = normalise_podman_export(canonical_from_tar(
            mig.consumer.export(ref, tmp_path / "b.tar")))
        assert diff_listings(want, got) == []
    assert mig.store.verify_structure() == []
    assert f"ok: {len(refs)} image(s)" in cli(mig.store.root, "verify", env=mig.env).stdout

    # podman build FROM the squashed image reuses the store's layer.
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(f"FROM {refs[0]}\nRUN echo built > /built\n")
    mig.consumer.build(ctx, "localhost/sqs-derived:1")
    derived = mig.consumer.inspect("localhost/sqs-derived:1")
    base_image = mig.store.resolve(refs[0])
    assert derived["RootFS"]["Layers"][0] == f"sha256:{base_image.layer}"  # type: ignore[index]
    assert not (mig.consumer.graphroot / "overlay" / base_image.layer).exists()
    # ... and rmi refuses while that derived image uses it.
    refused = cli(mig.store.root, "rmi", refs[0], env={**mig.env, **mig.consumer.env},
                  check=False)
    assert refused.returncode == 1 and "in use" in refused.stderr

    # podman save of the squashed image, and of the image built FROM it, loads into a fresh
    # podman and runs (the layer tar is rebuilt from the mount through the tar-split).
    archive = tmp_path / "saved.tar"
    mig.consumer.run("save", "--format", "oci-archive", "-o", str(archive), refs[1])
    derived_archive = tmp_path / "derived.tar"
    mig.consumer.run("save", "--format", "docker-archive", "-o", str(derived_archive),
                     "localhost/sqs-derived:1")
    fresh = Podman(tmp_path / "fresh")
    try:
        fresh.run("load", "-i", str(archive))
        assert fresh.text("run", "--rm", "--pull=never", refs[1]) == \
            podman.text("run", "--rm", "--pull=never", refs[1])
        fresh.run("load", "-i", str(derived_archive))
        assert fresh.text("run", "--rm", "--pull=never", "--entrypoint", "/bin/cat",
                          "localhost/sqs-derived:1", "/built") == "built"
    finally:
        fresh.close()


def test_migrate_again_only_adds_names_and_rm_source(mig: Migration, podman: Podman,
                                                     fixture_images: dict[str, str]) -> None:
    ref = fixture_images["base"]
    first = json.loads(json.dumps(mig.migrate(ref).stdout))
    image = mig.store.resolve(ref)
    squash_stat = image.squash.stat()
    extra = "localhost/sqs-migrate-extra:1"
    podman.run("tag", ref, extra)
    mig.migrate(extra, "--rm-source")
    again = mig.store.resolve(extra)
    assert again.id == image.id and set(again.names) >= {ref, extra}
    assert image.squash.stat().st_ino == squash_stat.st_ino
    assert podman.run("image", "exists", extra, check=False).returncode == 1
    assert podman.run("image", "exists", ref, check=False).returncode == 0
    assert first


def test_migrate_with_other_options_keeps_the_layer_in_place(
        mig: Migration, fixture_images: dict[str, str]) -> None:
    """The layer's squash file may be mounted on other hosts of a shared store: migrating
    the same content with other options keeps it (review finding) and says so."""
    ref = fixture_images["base"]
    mig.migrate(ref, "--compression", "lz4")
    image = mig.store.resolve(ref)
    before = image.squash.stat()
    again = mig.migrate(ref, "--compression", "gzip")
    assert "kept as it was written (lz4" in again.stderr
    after = mig.store.resolve(ref)
    assert after.id == image.id
    assert (after.squash.stat().st_ino, after.squash.stat().st_mtime_ns) == (
        before.st_ino, before.st_mtime_ns)
    assert after.metadata["squash"]["options"]["compression"] == "lz4"
    assert mig.consumer.text("run", "--rm", "--pull=never", ref, "cat", "/etc/config") == \
        "base config"
    assert os.listdir(mig.store.tmp_dir) == []


def test_migrate_bad_source_leaves_the_store_unchanged(mig: Migration,
                                                       fixture_images: dict[str, str]) -> None:
    mig.migrate(fixture_images["base"])
    before = store_snapshot(mig.store)
    for args in (["localhost/no-such-image:1"], ["oci-archive:/nonexistent.tar"],
                 [fixture_images["base"], "--compression", "nope"],
                 [fixture_images["base"], "--block-size", "3K"]):
        proc = mig.migrate(*args, check=False)
        assert proc.returncode != 0, args
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("squashstore: "), proc.stderr
        assert "Traceback" not in proc.stderr
    assert store_snapshot(mig.store) == before
    assert os.listdir(mig.store.tmp_dir) == []


# --------------------------------------------------------------------------- issue 10

def oci_layout(root: Path, config_extra: dict[str, Any], ref_name: str = "1",
               raw_config: bytes | None = None) -> Path:
    """A one-layer OCI layout whose config is a valid one updated with `config_extra` (or
    `raw_config` verbatim); its index names the image `ref_name`."""
    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "blobs" / "sha256" / digest).write_bytes(data)
        return "sha256:" + digest

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("bin/busybox", Path("/bin/busybox").read_bytes()),
                           ("bin/hello", b"hello\n"), ("etc/config", b"layout config\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    layer = buf.getvalue()
    layer_digest = blob(layer)
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/hello"]},
              "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}
    config.update(config_extra)
    config_bytes = raw_config if raw_config is not None else json.dumps(config).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": blob(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": len(layer)}]}).encode()
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": blob(manifest),
         "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": ref_name}}]}))
    return root


# Configs podman 4.3.1 cannot read (each refused by `podman pull`), and the rule migrate
# follows for each: "refuse" (the field changes how the image runs), "drop" (metadata) or
# "ignore" (a field migrate does not carry).
BAD_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("refuse", {"config": {"Cmd": "x"}}),
    ("refuse", {"config": {"Env": 5}}),
    ("refuse", {"config": {"Labels": [1]}}),
    ("refuse", {"config": {"Labels": {"a": 1}}}),
    ("refuse", {"config": {"ExposedPorts": ["80/tcp"]}}),
    ("refuse", {"config": {"ExposedPorts": {"80/tcp": 1}}}),
    ("refuse", {"config": {"Volumes": {"/v": "x"}}}),
    ("refuse", {"config": {"Entrypoint": [1]}}),
    ("refuse", {"config": {"User": 0}}),
    ("refuse", {"config": {"WorkingDir": ["/"]}}),
    ("refuse", {"config": {"StopSignal": 9}}),
    ("refuse", {"config": {"cmd": "x"}}),  # Go matches keys case-insensitively
    ("refuse", {"architecture": 5}),
    ("refuse", {"OS": ["linux"]}),
    ("drop", {"created": "yesterday"}),
    ("drop", {"created": 5}),
    ("drop", {"author": {"a": 1}}),
    ("drop", {"os.features": "x"}),
    ("drop", {"variant": 7}),
    ("drop", {"history": [{"created_by": 5}]}),
    ("drop", {"history": [{"Created": "2024-01-02"}]}),
    ("ignore", {"history": [{"empty_layer": "yes"}]}),  # migrate sets its own
    ("ignore", {"config": {"Healthcheck": 5}}),  # Docker's type: podman reads it too
    ("ignore", {"container_config": {"Env": "x"}}),
    ("drop", {"history": "x"}),
]
# Odd configs podman reads fine: migrate keeps what it can and stores a readable config.
GOOD_CONFIGS: list[dict[str, Any]] = [
    {"config": {"Cmd": None, "Env": ["A=1", None], "Labels": {"a": None}}},
    {"config": {"ExposedPorts": {"80/tcp": {"x": 1}}}, "unknown": [1, {"x": "y"}],
     "container_config": {"Cmd": "/bin/sh -c x"}},  # Docker's Cmd may be one string
    {"config": {"cmd": ["/bin/hello"]}, "Architecture": "amd64"},
    {"created": "2024-01-02T03:04:05.123456789+02:00", "history": [None, {"x": 1}]},
]


def _layout_config(layout: Path) -> Any:
    """The config of a one-image OCI layout (through its index and manifest)."""
    blobs = layout / "blobs" / "sha256"
    top = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((blobs / top.removeprefix("sha256:")).read_bytes())
    return json.loads((blobs / manifest["config"]["digest"].removeprefix("sha256:"))
                      .read_bytes())


def test_config_checker_agrees_with_podman(tmp_path: Path, make_podman: Any) -> None:
    """The oracle: podman pulls exactly the configs `imageconfig` finds readable."""
    from squashstore.imageconfig import config_problems

    puller = make_podman()
    for i, (_rule, extra) in enumerate(BAD_CONFIGS):
        layout = oci_layout(tmp_path / f"bad{i}", extra)
        config = _layout_config(layout)
        assert config_problems(config), extra
        proc = puller.run("pull", f"oci:{layout}", check=False)
        assert proc.returncode != 0, extra
        assert b"cannot unmarshal" in proc.stderr or b"parsing time" in proc.stderr, \
            proc.stderr
    for i, extra in enumerate(GOOD_CONFIGS):
        layout = oci_layout(tmp_path / f"good{i}", extra)
        config = _layout_config(layout)
        assert config_problems(config) == [], extra
        puller.run("pull", f"oci:{layout}")


def test_migrate_refuses_or_drops_what_podman_cannot_read(mig: Migration,
                                                         tmp_path: Path) -> None:
    """Issue 10 #1: one bad image never breaks `podman images` for the whole store."""
    mig.migrate(f"oci:{oci_layout(tmp_path / 'ok', {})}")
    for i, (rule, extra) in enumerate(BAD_CONFIGS):
        before = store_snapshot(mig.store)
        proc = mig.migrate(f"oci:{oci_layout(tmp_path / f'bad{i}', extra)}", "--no-mount",
                           check=False)
        assert "Traceback" not in proc.stderr
        if rule == "refuse":
            assert proc.returncode == 1, (extra, proc.stderr)
            assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
                "squashstore: ") and "podman expects" in proc.stderr, proc.stderr
            assert store_snapshot(mig.store) == before, extra
        else:
            assert proc.returncode == 0, (extra, proc.stderr)
            assert rule == "ignore" or (
                "squashstore: warning: " in proc.stderr and "dropped" in proc.stderr), proc.stderr
        podman_images(mig.consumer)  # podman still reads the whole store
    ids = {i["Id"] for i in podman_images(mig.consumer)}
    assert ids == {i.id for i in mig.store.images()} and len(ids) > 1
    for i, extra in enumerate(GOOD_CONFIGS):
        mig.migrate(f"oci:{oci_layout(tmp_path / f'good{i}', extra)}", "--no-mount")
    assert mig.consumer.inspect(f"localhost{tmp_path}/good2:latest")["Config"]["Cmd"] == [
        "/bin/hello"]  # type: ignore[index]
    assert mig.consumer.inspect(f"localhost{tmp_path}/good0:latest")["Config"]["Env"] == [
        "A=1", ""]  # type: ignore[index]
    assert "ok: " in cli(mig.store.root, "verify", env=mig.env).stdout


def _rewrite_config(store: Store, iid: str, change: Any) -> None:
    """Change an image's stored config in place and re-record its digest (as a buggy older
    squashstore could have written it)."""
    from squashstore.store import atomic_write

    path = store.images_dir / iid / big_data_name("sha256:" + iid)
    config = json.loads(path.read_bytes())
    change(config)
    data = json.dumps(config).encode()
    atomic_write(path, data)
    records = podmanstore.load_records(store.images_json)
    for record in records:
        if record["id"] == iid:
            record["big-data-digests"]["sha256:" + iid] = "sha256:" + hashlib.sha256(
                data).hexdigest()
            record["big-data-sizes"]["sha256:" + iid] = len(data)
    atomic_write_json(store.images_json, records)


def test_verify_reads_configs_and_records_as_podman_does(mig: Migration,
                                                         tmp_path: Path) -> None:
    mig.migrate(f"oci:{oci_layout(tmp_path / 'ok', {})}", "--no-mount")
    image = mig.store.images()[0]
    good_images = mig.store.images_json.read_bytes()
    config_path = mig.store.images_dir / image.id / big_data_name("sha256:" + image.id)
    good_config = config_path.read_bytes()
    damages = [
        ("config", lambda c: c["config"].update(Cmd="x")),
        ("config", lambda c: c.update(architecture=5)),
        ("config", lambda c: c["history"].append({"created": "2024"})),
        ("record", lambda r: r.update(names="x")),
        ("record", lambda r: r.update(created="yesterday")),
        ("record", lambda r: r["big-data-sizes"].update(x="1")),
    ]
    for where, change in damages:
        if where == "config":
            _rewrite_config(mig.store, image.id, change)
        else:
            records = podmanstore.load_records(mig.store.images_json)
            change(records[0])
            atomic_write_json(mig.store.images_json, records)
        # The oracle: podman cannot list the store (or loses the image) ...
        listing = mig.consumer.run("images", "--format", "json", check=False)
        assert listing.returncode != 0 or image.id not in listing.stdout.decode(), where
        # ... and verify says why.
        proc = cli(mig.store.root, "verify", env=mig.env, check=False)
        assert proc.returncode == 1 and "podman cannot read" in proc.stdout, proc.stdout
        config_path.write_bytes(good_config)
        mig.store.images_json.write_bytes(good_images)
        assert mig.consumer.run("images", check=False).returncode == 0
    assert "ok: 1 image(s)" in cli(mig.store.root, "verify", env=mig.env).stdout


def test_deeply_nested_config_is_one_line(mig: Migration, tmp_path: Path) -> None:
    """Issue 10 #6: no RecursionError traceback."""
    deep = b'{"rootfs": {"type": "layers", "diff_ids": []}, "x": ' + b"[" * 100000 + \
        b"]" * 100000 + b"}"
    layout = oci_layout(tmp_path / "deep", {}, raw_config=deep)
    for args in (["migrate", f"oci:{layout}"],
                 ["export", f"oci:{layout}", "-o", str(tmp_path / "x.tar")],
                 ["squash", f"oci:{layout}", str(tmp_path / "x.sqfs")]):
        proc = cli(mig.store.root, *args, env=mig.env, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "nested too deeply" in proc.stderr, proc.stderr
    assert not (tmp_path / "x.tar").exists() and not (tmp_path / "x.sqfs").exists()


def test_migrate_oci_dir_names_it_as_podman_does_and_gc_keeps_it(
        mig: Migration, tmp_path: Path, make_podman: Any) -> None:
    """Issue 10 #7: podman 4.3.1 names `oci:DIR:TAG` `localhost/DIR:latest` (the tag and
    the index's ref name are not used); the image is never left for gc."""
    layout = oci_layout(tmp_path / "lay" / "tool", {"config": {"Cmd": ["/bin/hello"]}},
                        ref_name="v7")
    puller = make_podman()
    puller.run("pull", f"oci:{layout}:v7")
    (want,) = {n for i in podman_images(puller) for n in i["Names"]}
    out = mig.migrate(f"oci:{layout}:v7", "--no-mount").stdout
    assert want in out and mig.store.resolve(want).names == (want,)
    # An oci: dir podman cannot name (upper case) stays unnamed, and gc keeps it too.
    upper = oci_layout(tmp_path / "Upper", {"config": {"Cmd": ["/bin/hello", "x"]}})
    mig.migrate(f"oci:{upper}:1", "--no-mount")
    assert [i.names for i in mig.store.images()].count(()) == 1
    cli(mig.store.root, "gc", env=mig.env)
    assert len(mig.store.images()) == 2
    assert mig.consumer.text("run", "--rm", "--pull=never", "--entrypoint", "/bin/busybox",
                             want, "cat", "/etc/config") == "layout config"


def test_migrate_what_podman_resolves_to_the_store_itself(
        mig: Migration, podman: Podman, fixture_images: dict[str, str],
        tmp_path: Path) -> None:
    """Issue 10 #8: the README's setup (store in storage.conf, source removed): migrating
    the name again says so and succeeds; reading a squash store's layer reads its squash
    file, mounted or not (another store re-squashes it with other options)."""
    ref = fixture_images["base"]
    extra = "localhost/sqs-migrate-own:1"
    podman.run("tag", ref, extra)
    mig.migrate(extra, "--rm-source", "--compression", "lz4")
    image = mig.store.resolve(extra)
    cli(mig.store.root, "umount", "--all", env=mig.env)
    as_user = {**mig.consumer.env, **store_env(mig.runtime_dir)}
    again = cli(mig.store.root, "migrate", extra, "--rm-source", env=as_user)
    assert "already in the store" in again.stderr and image.id[:12] in again.stdout
    assert mig.store.resolve(extra).id == image.id
    cli(mig.store.root, "umount", "--all", env=mig.env)
    # Another store, fed from the first through storage.conf, with other options.
    other = Store(tmp_path / "other")
    cli(other.root, "migrate", extra, "--compression", "gzip", "--no-mount", env=as_user)
    copied = other.resolve(extra)
    assert copied.layer == image.layer
    assert copied.metadata["squash"]["options"]["compression"] == "gzip"
    assert not host.is_mountpoint(image.diff)
    want = canonical_from_tar(podman.export(ref, tmp_path / "a.tar"))
    cli(other.root, "export", f"containers-storage:{extra}", "-o", str(tmp_path / "b.tar"),
        env=as_user)
    got = canonical_from_tar(tmp_path / "b.tar")
    assert diff_listings(normalise_podman_export(want), normalise_podman_export(got)) == []
