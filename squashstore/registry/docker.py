"""The ``docker://`` source: an image in a registry as an `Image` whose layers stream.

`parse_docker_reference` reads ``docker://HOST/REPO[:TAG|@DIGEST]`` (a short name resolves
as podman resolves it: `squashstore.names.registry_candidates`); `open_docker` fetches the
manifest (an index is resolved to this host's platform or ``--platform``) and the config,
checking every digest, and returns an `Image` whose layers are opened through
`squashstore.blobs.opener`, so each blob is verified (digest, diff_id, size) while it is
read. The merge reads the top layer first: that layer streams straight from the registry,
and when it is first opened the lower layers start downloading in parallel
(`PARALLEL_DOWNLOADS` at a time) into a private spool directory, so the network works
while the merge and the squash writer use the CPU; each lower layer is read from its spool
file once it is complete (see NOTES.md, "docker:// streaming").
"""

from __future__ import annotations

import atexit
import contextlib
import queue
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from squashstore import names, oci
from squashstore.blobs import Expect, opener
from squashstore.image import Image, Layer, SourceError
from squashstore.registry.client import (
    Client,
    NotFound,
    RegistryError,
    RegistryOptions,
    spool,
)

SCHEME = "docker://"
PARALLEL_DOWNLOADS = 3
"""Lower layers downloaded at once while the top layer streams."""
CONFIG_LIMIT = 8 << 20
"""The largest image config read."""


@dataclass(frozen=True)
class RemoteRef:
    """A resolved registry reference."""

    host: str
    repository: str
    reference: str
    """The tag or ``sha256:`` digest."""
    name: names.Name

    @property
    def text(self) -> str:
        return str(self.name)


def strip_scheme(text: str) -> str:
    for prefix in (SCHEME, "oras://"):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def parse_docker_reference(text: str, conf: names.RegistriesConf | None = None
                           ) -> list[RemoteRef]:
    """The references a pull of `text` tries, in order (several only for a short name
    with several search registries)."""
    body = strip_scheme(text)
    if not body:
        raise SourceError(f"{text}: no image name")
    if names.parse(body).is_short:
        conf = conf if conf is not None else names.load_registries_conf()
    candidates = names.registry_candidates(body, conf or names.RegistriesConf())
    return [RemoteRef(n.domain, n.path, n.reference, n) for n in candidates]


def client_for(ref: RemoteRef, options: RegistryOptions,
               conf: names.RegistriesConf | None = None) -> Client:
    """A client for `ref`'s registry, honouring an ``insecure``/``blocked`` registries.conf
    entry."""
    entry = conf.entry(ref.name.repository) if conf is not None else None
    if entry is not None and entry.blocked:
        raise RegistryError(f"{ref.host}: blocked in registries.conf")
    return Client(ref.host, options, insecure=bool(entry and entry.insecure))


def fetch_manifest(text: str, options: RegistryOptions
                   ) -> tuple[Client, RemoteRef, bytes, str, str]:
    """The first candidate of `text` that exists: its client, reference and top manifest
    ``(bytes, media type, digest)``."""
    body = strip_scheme(text)
    if not body:
        raise SourceError(f"{text}: no image name")
    conf = names.load_registries_conf() if names.parse(body).is_short else None
    refs = parse_docker_reference(text, conf)
    missing: list[str] = []
    for ref in refs:
        client = client_for(ref, options, conf)
        try:
            data, media_type, digest = client.get_manifest(ref.repository, ref.reference)
        except NotFound as exc:
            client.close()
            missing.append(str(exc))
            continue
        except BaseException:
            client.close()
            raise
        return client, ref, data, media_type, digest
    if len(missing) == 1:
        raise NotFound(f"{missing[0]} (image or tag does not exist)")
    raise NotFound(f"{text}: not found in any of {', '.join(r.text for r in refs)}")


def open_docker(text: str, platform: str | None = None,
                options: RegistryOptions | None = None) -> Image:
    """The image ``docker://...`` names; its layers stream from the registry."""
    options = options or RegistryOptions()
    client, ref, data, media_type, digest = fetch_manifest(text, options)
    wanted = oci.parse_platform(platform) if platform else None
    return image_from_manifest(client, ref, data, media_type, digest, wanted, text)


def image_from_manifest(client: Client, ref: RemoteRef, data: bytes, media_type: str,
                        digest: str, wanted: oci.Platform | None, text: str) -> Image:
    what = text if text.startswith(SCHEME) else SCHEME + text
    repository = ref.repository

    def fetch(descriptor: oci.Descriptor) -> bytes:
        if descriptor.digest == digest:
            return data
        manifest, _, _ = client.get_manifest(repository, descriptor.digest)
        return manifest

    top = oci.Descriptor(media_type, digest, len(data))
    manifest_bytes, manifest_desc = oci.resolve_manifest(fetch, top, wanted, what)
    from squashstore.registry.artifact import is_artifact  # imported when used: no cycle

    if is_artifact(manifest_bytes):
        raise SourceError(f"{what}: this is a squashstore artifact, not an image: use "
                          f"`squashstore pull {strip_scheme(text)}`")
    manifest = oci.parse_manifest(manifest_bytes, f"{what}: manifest")
    config = client.read_blob(repository, manifest.config, CONFIG_LIMIT)
    ids = oci.diff_ids(config, f"{what}: config")
    if len(ids) != len(manifest.layers):
        raise SourceError(f"{what}: the manifest has {len(manifest.layers)} layers but the "
                          f"config lists {len(ids)} diff_ids")
    for descriptor in (manifest.config, *manifest.layers):
        if descriptor.size < 0:  # unbounded: a lying registry could send without end
            raise SourceError(f"{what}: the manifest gives {descriptor.digest} no size")
    for descriptor in manifest.layers:
        if oci.layer_compression(descriptor.media_type) is None and \
                descriptor.media_type not in ("", oci.OCI_LAYER):
            raise SourceError(f"{what}: layer {descriptor.digest} has media type "
                              f"{descriptor.media_type!r}, not an image layer")
    downloads = _Downloads(client, repository, manifest.layers)
    layers = tuple(
        Layer(i, ids[i], d.digest, d.media_type, d.size,
              opener(downloads.opener(i), Expect(f"{what}: layer {i} ({d.digest[:19]})",
                                                 digest=d.digest, diff_id=ids[i],
                                                 size=d.size,
                                                 compression=oci.layer_compression(
                                                     d.media_type))))
        for i, d in enumerate(manifest.layers))
    name = ref.name if not ref.name.digest else None
    return Image(reference=what, names=(str(name),) if name is not None else (),
                 manifest=manifest_bytes, manifest_digest=manifest_desc.digest,
                 config=config, config_digest=manifest.config.digest, layers=layers)


class _Downloads:
    """The layers of one image: the top streams; the lower ones spool in parallel.

    The spooling threads are daemons, so a command that fails early exits at once instead
    of waiting for downloads nobody will read; the spool directory goes with the object
    (or at exit)."""

    def __init__(self, client: Client, repository: str,
                 layers: tuple[oci.Descriptor, ...]) -> None:
        self._client, self._repository, self._layers = client, repository, layers
        self._lock = threading.Lock()
        self._futures: dict[int, Future[Path]] = {}
        self._top_opened = False

    def opener(self, index: int) -> Callable[[], BinaryIO]:
        return lambda: self._open(index)

    def _open(self, index: int) -> BinaryIO:
        top = index == len(self._layers) - 1
        with self._lock:
            first_top = top and not self._top_opened
            if top:
                self._top_opened = True
            if first_top or (not top and not self._futures):
                self._start_prefetch(skip=index if first_top else -1)
            future = self._futures.get(index)
        if future is None:
            descriptor = self._layers[index]
            return self._client.open_blob(self._repository, descriptor.digest,
                                          descriptor.size)
        try:
            path = future.result()
        except OSError as exc:
            raise SourceError(f"spooling layer {index}: {exc}") from exc
        return path.open("rb")

    def _start_prefetch(self, skip: int) -> None:
        lower = [i for i in range(len(self._layers) - 1, -1, -1) if i != skip]
        if not lower:
            return
        spool_dir = Path(tempfile.mkdtemp(prefix="squashstore-layers-"))
        weakref.finalize(self, _cleanup, spool_dir)
        atexit.register(_cleanup, spool_dir)
        pending: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in lower:  # in the order the merge reads them
            self._futures[i] = Future()
            pending.put(i)
        for n in range(min(PARALLEL_DOWNLOADS, len(lower))):
            threading.Thread(target=self._worker, args=(pending, spool_dir),
                             name=f"layer-download-{n}", daemon=True).start()

    def _worker(self, pending: queue.SimpleQueue[int], spool_dir: Path) -> None:
        while True:
            try:
                index = pending.get_nowait()
            except queue.Empty:
                return
            future = self._futures[index]
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._download(index, spool_dir))
            except BaseException as exc:  # handed to the reader of this layer
                future.set_exception(exc)

    def _download(self, index: int, spool_dir: Path) -> Path:
        descriptor = self._layers[index]
        path = spool_dir / f"{index}.blob"
        with self._client.open_blob(self._repository, descriptor.digest,
                                    descriptor.size) as blob, path.open("wb") as out:
            spool(blob, out)
        return path


def _cleanup(spool_dir: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(spool_dir, ignore_errors=True)
