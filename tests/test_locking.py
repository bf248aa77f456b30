"""The re-entrant registry lock: nesting keeps it held; other threads and processes wait."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from squashstore import locking

PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except OSError:
    print("held")
"""


def held_by_someone(path: Path) -> bool:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True,
                         text=True, check=True).stdout.strip()
    return out == "held"


def test_nested_use_keeps_the_lock_held(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    with locking.reentrant(lock):
        with locking.reentrant(lock):
            assert held_by_someone(lock)
        # A plain record lock would have been released by the inner close.
        assert held_by_someone(lock)
    assert not held_by_someone(lock)


def test_other_threads_wait(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    order: list[str] = []

    def other() -> None:
        with locking.reentrant(lock):
            order.append("other")

    with locking.reentrant(lock):
        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.2)
        order.append("holder")
    thread.join(5)
    assert order == ["holder", "other"]
