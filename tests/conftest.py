"""Session-wide pytest fixtures: the private real podman (`podman`), the fixture images
built in it once per session (`fixture_images`), and a factory for further private podmans
(`make_podman`, e.g. a consumer whose storage.conf lists a squash store).

So that mounts are undone even when a run is stopped, SIGTERM is turned into
KeyboardInterrupt (pytest then still tears fixtures down), and mounts left below pytest's
``garbage-*`` dirs (directories of earlier, killed runs that pytest is deleting) are lazily
unmounted at session start, before pytest's own clean-up walks into them."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import HealthCheck, settings

from support.fixture_trees import build_fixture_images
from support.podman import Podman, mounts_below
from support.podman import make_podman as _make_podman

MakePodman = Callable[..., Podman]

# Hypothesis' default 200 ms deadline per example measures the machine, not the code: on a
# loaded 2-core CI machine one preempted example fails a property test ("Unreliable test
# timings"). Properties here are about bytes; no example has a time limit.
settings.register_profile("squashstore", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("squashstore")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _unmount_stale_garbage(basetemp_parent: Path) -> None:
    """Lazily unmount whatever is still mounted below ``<parent>/garbage-*``."""
    for garbage in basetemp_parent.glob("garbage-*"):
        for point in mounts_below(garbage):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def pytest_configure(config: pytest.Config) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="session", autouse=True)
def _stale_mounts(tmp_path_factory: pytest.TempPathFactory) -> None:
    _unmount_stale_garbage(tmp_path_factory.getbasetemp().parent)


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """A private real podman for the whole test session, torn down at its end."""
    p = _make_podman(tmp_path_factory.mktemp("podman"))
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="session")
def fixture_images(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Fixture name -> image reference in `podman` (built once per session; see
    support.fixture_trees for which image covers what)."""
    return build_fixture_images(podman, tmp_path_factory.mktemp("fixture-contexts"))


@pytest.fixture
def make_podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakePodman]:
    """``make_podman(additional_stores=[...], mount_program=None) -> Podman``: more private
    podmans, each closed (containers removed, mounts undone, dir deleted) after the test."""
    made: list[Podman] = []
    base = tmp_path_factory.mktemp("podmans")

    def factory(
        additional_stores: Sequence[Path] = (), mount_program: str | None = None
    ) -> Podman:
        p = _make_podman(base, additional_stores, mount_program)
        made.append(p)
        return p

    try:
        yield factory
    finally:
        for p in reversed(made):
            p.close()


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """mount(squash_file) -> mount point (kernel squashfs, read-only), undone afterwards."""
    points: list[Path] = []

    def mount(image: Path) -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro", str(image), str(point)],
                       check=True, capture_output=True)
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", "-l", str(point)], check=False)
