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

import threading
import time
from collections.abc import Mapping
from pathlib import Path

import requests

from squashstore.lazy.image import Remote
from squashstore.lazy.source import RangeSource
from squashstore.registry.client import Client, RegistryError, RegistryOptions

BACKOFF_CAP = 0.2
"""Longest wait between two attempts of one range request."""


def remote_for(client: Client, repository: str, digest: str, size: int, reference: str,
               options: RegistryOptions) -> Remote:
    """The `Remote` recorded for a blob pulled through `client`."""
    return Remote(client.host, repository, digest, size, reference, client.verify,
                  str(options.cert_dir) if options.cert_dir else None,
                  str(options.authfile) if options.authfile else None)


def client_source(client: Client, remote: Remote) -> RangeSource:
    """A `RangeSource` over an open registry client."""
    path = f"/v2/{remote.repository}/blobs/{remote.digest}"
    serial = threading.Lock()
    warm = threading.Event()

    def send(headers: Mapping[str, str]) -> requests.Response:
        return client.request("GET", path, remote.repository, headers=headers, stream=True)

    def get(headers: Mapping[str, str]) -> requests.Response:
        # The client fetches a bearer token on a 401, but two threads hitting the 401 at
        # once make the second take its token as refused. So the first request (which
        # gets the token) goes alone, and a refusal is tried once more alone, when the
        # token another thread fetched meanwhile is there.
        if not warm.is_set():
            with serial:
                response = send(headers)
                warm.set()
                return response
        try:
            return send(headers)
        except RegistryError:
            with serial:
                return send(headers)

    return RangeSource(get, remote.size, remote.describe(), retries=1)


def open_source(remote: Remote) -> RangeSource:
    """A `RangeSource` for a lazy image's marker (a client of its own)."""
    options = RegistryOptions(
        tls_verify=remote.tls_verify,
        cert_dir=Path(remote.cert_dir) if remote.cert_dir else None,
        authfile=Path(remote.authfile) if remote.authfile else None)
    client = Client(remote.registry, options,
                    sleep=lambda seconds: time.sleep(min(seconds, BACKOFF_CAP)))
    return client_source(client, remote)
