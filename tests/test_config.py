"""The project configuration: one typed parse, its checks, and reading the files once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from squashstore import config, mounts
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
