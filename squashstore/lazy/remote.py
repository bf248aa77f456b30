"""The registry side of a lazy image: a `RangeSource` for a `Remote`.

This module owns how a lazy image's FUSE server (or a completing `pull`) reaches the
registry its squash file lives in. Until the registry client lands here it speaks plain
``requests`` to ``https://HOST`` (``http://`` when `Remote.tls_verify` is False),
anonymously.
"""

from __future__ import annotations

import requests

from squashstore.lazy.image import Remote
from squashstore.lazy.source import RangeSource, session_get


def open_source(remote: Remote) -> RangeSource:
    scheme = "http" if remote.tls_verify is False else "https"
    url = f"{scheme}://{remote.registry}/v2/{remote.repository}/blobs/{remote.digest}"
    return RangeSource(session_get(requests.Session(), url), remote.size, remote.describe())
