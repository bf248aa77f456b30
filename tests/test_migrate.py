"""``squashstore migrate`` end to end with the native writer: fixture images from the
session podman into a store, then run, exported, built FROM and saved/loaded in a consumer
podman whose only image source is the store (configured from ``squashstore config``).
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_store import cli, podman_images, store_env, store_snapshot, unmount_below, write_wrapper

from squashstore import host
from squashstore.image import SourceError
from squashstore.migrate import options_json, squashed_config
from squashstore.mounts import Registry
from squashstore.store import Store
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
