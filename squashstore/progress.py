"""A one-line progress display on stderr, for terminals only (cli.md's convention).

`Progress` redraws one line (layers done, files, bytes, throughput) at most ten times a
second and erases it when done, so a long migrate or squash shows that it moves without
filling logs: callers create it only when stderr is a terminal. `Transfer` does the same
for one download or upload (bytes done of the total, throughput).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human(size: float) -> str:
    """``123.4 MB`` style sizes (powers of 1000, as podman prints them)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


class _Line:
    """One status line redrawn in place at most every `interval` seconds, erased by
    `done`: what `Progress` and `Transfer` share."""

    def __init__(self, label: str, stream: TextIO, interval: float) -> None:
        self.label, self.stream, self.interval = label, stream, interval
        self.started = time.monotonic()
        self._next = self.started
        self._width = 0

    def _due(self, force: bool = False) -> float | None:
        """The time now when a redraw is due (or `force`d), else None."""
        now = time.monotonic()
        if now < self._next and not force:
            return None
        self._next = now + self.interval
        return now

    def _rate(self, size: int, now: float) -> str:
        return human(size / max(now - self.started, 1e-3))

    def _draw(self, text: str) -> None:
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def done(self) -> None:
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class Progress(_Line):
    """``label: layer 2/7, 1234 files, 120.3 MB (45.0 MB/s)`` redrawn in place."""

    def __init__(self, label: str, layers: int, stream: TextIO = sys.stderr,
                 interval: float = 0.1) -> None:
        super().__init__(label, stream, interval)
        self.layers = layers

    def update(self, layers_done: int, files: int, size: int) -> None:
        now = self._due()
        if now is None:
            return
        layer = min(layers_done + 1, self.layers)
        self._draw(f"{self.label}: layer {layer}/{self.layers}, {files} files, {human(size)} "
                   f"({self._rate(size, now)}/s)")


class Transfer(_Line):
    """``label: 120.3 MB / 2.0 GB (45.0 MB/s)`` redrawn in place, for one download or
    upload of `total` bytes (-1: unknown)."""

    def __init__(self, label: str, total: int, stream: TextIO = sys.stderr,
                 interval: float = 0.1) -> None:
        super().__init__(label, stream, interval)
        self.total = total

    def update(self, done: int) -> None:
        now = self._due(force=done == self.total)
        if now is None:
            return
        of = f" / {human(self.total)}" if self.total >= 0 else ""
        self._draw(f"{self.label}: {human(done)}{of} ({self._rate(done, now)}/s)")
