"""The progress line: redrawn in place, throttled, erased when done; shown on terminals only."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

from squashstore.progress import Progress, human


def test_progress_redraws_one_line_and_erases_it() -> None:
    out = io.StringIO()
    bar = Progress("img", 3, stream=out, interval=0)
    bar.update(0, 10, 2_500_000)
    bar.update(2, 20, 5_000_000)
    bar.done()
    text = out.getvalue()
    assert "\n" not in text
    assert "img: layer 1/3, 10 files, 2.5 MB" in text
    assert "layer 3/3, 20 files, 5.0 MB" in text
    assert text.endswith("\r")


def test_progress_is_throttled() -> None:
    out = io.StringIO()
    bar = Progress("img", 1, stream=out, interval=3600)
    for i in range(1000):
        bar.update(0, i, i)
    assert out.getvalue().count("\r") == 1


def test_human_sizes() -> None:
    assert [human(n) for n in (999, 1000, 1_234_567, 5e12)] == [
        "999 B", "1.0 kB", "1.2 MB", "5.0 TB"]


def _squash(tmp_path: Path, tty: bool) -> bytes:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True, exist_ok=True)
    (root / "d" / "f").write_bytes(b"x" * 1000)
    tar = tmp_path / "t.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
    argv = [sys.executable, "-m", "squashstore.cli.main", "squash", f"tar:{tar}",
            str(tmp_path / ("tty.sqfs" if tty else "pipe.sqfs"))]
    if not tty:
        return subprocess.run(argv, capture_output=True, check=True).stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait() == 0
    os.close(leader)
    return b"".join(chunks)


def test_progress_only_on_a_terminal(tmp_path: Path) -> None:
    assert b"layer 1/1" in _squash(tmp_path, tty=True)
    assert _squash(tmp_path, tty=False) == b""
