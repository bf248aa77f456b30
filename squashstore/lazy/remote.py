"""The registry side of a lazy image: a `RangeSource` for a `Remote`.

This module owns how a lazy image's FUSE server (or a completing `pull`) reaches the
registry its squash file lives in: through the registry client (`squashstore.registry`),
so TLS, certs.d, credentials from podman's auth file, the bearer-token handshake (a token
that expired is fetched again on the 401) and redirects to blob storage are what `pull`
does. The client's own retries wait at most `BACKOFF_CAP` seconds each here: a read that
cannot be served should fail with EIO within a second or two, not after the long backoff
a whole-image download can afford.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import requests

from squashstore.lazy.image import Remote
from squashstore.lazy.source import RangeSource
from squashstore.registry.client import Client, RegistryOptions

BACKOFF_CAP = 0.2
"""Longest wait between two attempts of one range request."""
READ_STALL = 10.0
"""Seconds a range request may receive nothing before it is given up (``[registry] stall``,
30 s by default, is for whole downloads; a FUSE read waiting on it holds a process)."""
READ_BUDGET = 20.0
"""Seconds one range of a FUSE read may take, its retry included (a registry that drips a
byte now and then never stalls): the read then fails with EIO, a later one tries again."""


def remote_for(client: Client, repository: str, digest: str, size: int, reference: str,
               options: RegistryOptions) -> Remote:
    """The `Remote` recorded for a blob pulled through `client`."""
    return Remote(client.host, repository, digest, size, reference, client.verify,
                  str(options.cert_dir) if options.cert_dir else None,
                  str(options.authfile) if options.authfile else None)


def client_source(client: Client, remote: Remote, budget: float | None = None
                  ) -> RangeSource:
    """A `RangeSource` over an open registry client (safe for concurrent first requests:
    the client answers 401s under its lock, so threads share one token); each range ends
    by the client's deadline, and within `budget` seconds."""
    path = f"/v2/{remote.repository}/blobs/{remote.digest}"

    def get(headers: Mapping[str, str]) -> requests.Response:
        return client.request("GET", path, remote.repository, headers=headers, stream=True)

    return RangeSource(get, remote.size, remote.describe(), retries=1, budget=budget,
                       deadline=client.deadline)


def open_source(remote: Remote, command: RegistryOptions | None = None) -> RangeSource:
    """A `RangeSource` for a lazy image's marker (a client of its own): for a FUSE server's
    reads (`READ_STALL`, `READ_BUDGET`), or with `command`, the options of a command
    completing the image (``pull``: its ``--timeout`` and ``[registry] stall``, no budget
    per range). TLS and credentials are the marker's."""
    options = RegistryOptions(
        tls_verify=remote.tls_verify,
        cert_dir=Path(remote.cert_dir) if remote.cert_dir else None,
        authfile=Path(remote.authfile) if remote.authfile else None,
        stall=READ_STALL if command is None else command.stall,
        deadline=None if command is None else command.deadline)
    client = Client(remote.registry, options,
                    sleep=lambda seconds: time.sleep(min(seconds, BACKOFF_CAP)))
    return client_source(client, remote, READ_BUDGET if command is None else None)
