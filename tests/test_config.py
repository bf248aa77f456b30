"""The project configuration: one typed parse, its checks, and reading the files once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from squashstore import config, host, mounts, trust
from squashstore.config import (
    CleanupSettings,
    Config,
    ConfigError,
    MountSettings,
    PodmanStore,
    RegistrySettings,
)


def test_defaults_and_a_full_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.toml"
    monkeypatch.setenv("SQUASHSTORE_CONFIG", str(path))
    assert config.load() == Config()
    path.write_text('[mount]\nbackend = "kernel"\noverlay = "fuse-overlayfs"\n'
                    '[cleanup]\ngrace = 30\nmin_age = 0.5\n'
                    'podman_stores = ["/a", {graphroot = "/b", runroot = "/r"}, 7, {x = 1}]\n')
    assert config.load() == Config(
        MountSettings("kernel", "fuse-overlayfs"),
        CleanupSettings(30.0, 0.5, (PodmanStore("/a"), PodmanStore("/b", "/r"))))
    path.write_text("[registry]\nstall = 2.5\ntimeout = 300\n")
    os.utime(path, ns=(3, 3))
    assert config.load().registry == RegistrySettings(2.5, 300.0)


@pytest.mark.parametrize(("text", "message"), [
    ('[mount]\nbackend = "nfs"\n', "config [mount] backend = 'nfs': expected one of fuse, "
     "kernel, squashfuse"),
    ('[mount]\noverlay = 1\n', "config [mount] overlay = 1: expected one of auto"),
    ("[cleanup]\ngrace = -1\n", "config [cleanup] grace = -1: expected seconds >= 0"),
    ("[cleanup]\nmin_age = true\n", "config [cleanup] min_age = True: expected seconds"),
    ("[registry]\nstall = 0\n", "config [registry] stall = 0: expected seconds > 0"),
    ("[registry]\nstall = 1e308\n",
     "config [registry] stall = 1e+308: expected seconds > 0, at most 31536000"),
    ("[registry]\ntimeout = inf\n", "config [registry] timeout = inf: expected seconds"),
    ("[registry]\ntimeout = nan\n", "config [registry] timeout = nan: expected seconds"),
    ('[registry]\ntimeout = "5m"\n', "config [registry] timeout = '5m': expected seconds"),
    ('mount = "x"\n', "'mount' must be a table"),
    ("[mount\n", "config.toml: "),
])
def test_bad_values_are_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    monkeypatch.setenv("SQUASHSTORE_CONFIG", str(path))
    with pytest.raises(ConfigError) as info:
        config.load()
    assert message in str(info.value)


def test_system_file_overlaid_by_the_users(tmp_path: Path) -> None:
    system, user = tmp_path / "system.toml", tmp_path / "user.toml"
    system.write_text('[mount]\nbackend = "kernel"\noverlay = "kernel"\n')
    user.write_text('[mount]\nbackend = "squashfuse"\n')
    parsed = config.parse(config.read_tables([system, user, tmp_path / "missing.toml"]))
    assert parsed.mount == MountSettings("squashfuse", "kernel")


def test_read_once_until_a_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[cleanup]\ngrace = 1\n")
    monkeypatch.setenv("SQUASHSTORE_CONFIG", str(path))
    first = config.load()
    assert config.load() is first  # not parsed again
    path.write_text("[cleanup]\ngrace = 22\n")
    os.utime(path, ns=(1, 1))
    assert config.load().cleanup.grace == 22.0


def test_every_configurable_backend_is_a_mounter() -> None:
    assert tuple(mounts.BACKENDS) == config.MOUNT_BACKENDS


def test_the_mount_programs_cache_stands_for_the_files_while_they_stay_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`load(cache)` keeps the merged tables as JSON (the mount program then needs no
    tomllib); a changed file is read again; a cache others can write is refused as root."""
    path, cache = tmp_path / "config.toml", tmp_path / "config.json"
    path.write_text('[mount]\noverlay = "kernel"\n')
    monkeypatch.setenv("SQUASHSTORE_CONFIG", str(path))
    assert config.load(cache).mount.overlay == "kernel"
    data = json.loads(cache.read_text())
    assert data["tables"] == {"mount": {"overlay": "kernel"}}
    data["tables"]["mount"]["overlay"] = "fuse-overlayfs"  # only the cache says so
    cache.write_text(json.dumps(data))
    cache.chmod(0o644)
    config._loaded.clear()  # a new process
    assert config.load(cache).mount.overlay == "fuse-overlayfs"
    path.write_text('[mount]\noverlay = "auto"\n')
    os.utime(path, ns=(2, 2))
    assert config.load(cache).mount.overlay == "auto"
    assert json.loads(cache.read_text())["tables"] == {"mount": {"overlay": "auto"}}
    if host.is_real_root():
        cache.chmod(0o666)
        config._loaded.clear()
        with pytest.raises(trust.UnsafeStore, match="writable by group or others"):
            config.load(cache)


def test_tables_json_cannot_hold_are_not_cached(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path, cache = tmp_path / "config.toml", tmp_path / "config.json"
    path.write_text('[mount]\nbackend = "kernel"\n[site]\nsince = 2026-01-01\n')
    monkeypatch.setenv("SQUASHSTORE_CONFIG", str(path))
    assert config.load(cache).mount.backend == "kernel"
    assert not cache.exists()
