"""The registry options a command gives the registry client, as plain data.

`RegistryOptions` (the options of cli.md: ``--tls-verify``, ``--authfile``, ``--cert-dir``,
``--creds``, ``--timeout``) and `Deadline` live here, apart from `squashstore.registry.client`,
so that commands which merely accept the options (and sources that pass them on) do not import
``requests``: that import alone costs about 0.2 s of CPU, which every `cleanup` and
every OCI hook call paid before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Deadline:
    """The time (``time.monotonic()``) a command's registry work must end by: `seconds`
    after the command began (``--timeout``)."""

    at: float
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    def remaining(self) -> float:
        return self.at - time.monotonic()


@dataclass(frozen=True)
class RegistryOptions:
    """The registry options of cli.md (``--tls-verify``, ``--authfile``, ``--cert-dir``,
    ``--creds``); None means podman's default. `deadline` ends all registry work of the
    command (``--timeout``); `stall` overrides ``[registry] stall``."""

    tls_verify: bool | None = None
    authfile: Path | None = None
    cert_dir: Path | None = None
    creds: str | None = None
    deadline: Deadline | None = None
    stall: float | None = None
