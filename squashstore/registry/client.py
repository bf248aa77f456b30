"""One registry's HTTP API (the OCI distribution spec) as squashstore speaks it.

`Client` owns a `requests` session to one registry host: TLS as podman configures it
(verified by default against the system CAs plus ``/etc/containers/certs.d/HOST:PORT/*.crt``,
client certificates from ``*.cert``/``*.key`` there, ``--cert-dir`` instead of that directory,
``--tls-verify=false`` or an ``insecure`` registries.conf entry: no verification, and plain
http when https does not answer); the authentication handshake (anonymous, then what the
``WWW-Authenticate`` challenge asks: basic, or a bearer token from the realm, cached per
scope); retries with backoff for idempotent requests on dropped connections and 429/5xx;
`BlobReader`, a raw stream of one blob that resumes with a ``Range`` request where the
connection dropped or stalled; and chunked uploads whose memory does not grow with the blob.
Two limits bound the waiting: a transfer that receives nothing for ``[registry] stall``
seconds counts as stalled (retried, a download resumed), and a `Deadline` (``--timeout``,
``[registry] timeout``) ends all of a command's registry work at once. Every error is a
`RegistryError` with one line naming the host and what failed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import ssl
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, cast

import requests
import requests.adapters
import urllib3

from squashstore import config, oci
from squashstore.image import SourceError
from squashstore.registry.auth import Credentials, find_credentials, parse_creds
from squashstore.registry.options import Deadline, RegistryOptions

__all__ = ["Client", "Deadline", "NotFound", "RegistryError", "RegistryOptions", "TimedOut"]

CERTS_DIRS = (Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d"))
"""Per-registry TLS directories, as containers/image reads them (root's; a user's
``~/.config/containers/certs.d`` is added first)."""
AUTH_ROUNDS = 4
"""Requests one call may send while answering 401s (a second refusal of the same
credentials is final; other rounds follow tokens other threads fetched meanwhile)."""
RETRIES = 4
"""Attempts after the first for an idempotent request or a dropped download."""
BACKOFF = 0.5
"""Seconds before the first retry; doubled each time."""
CONNECT_TIMEOUT = 10.0
"""Seconds to establish a connection (the read timeout is the stall limit,
`squashstore.config.DEFAULT_STALL`)."""
STALL_MAX = config.MAX_SECONDS
"""The longest stall limit used (``--stall``-like options are not checked by the config;
``stall = 1e308`` overflowed the socket timeout: a traceback from urllib3)."""
UPLOAD_CHUNK = 16 << 20
"""Bytes per PATCH of a chunked upload: the most a push holds in memory."""
MANIFEST_LIMIT = 4 << 20
"""The largest manifest or index accepted (containers/image's limit)."""
SMALL_BODY_LIMIT = 1 << 20
"""The most read of a token answer or an error's body (the rest is not read)."""
MANIFEST_ACCEPT = ", ".join((oci.OCI_MANIFEST, oci.OCI_INDEX, oci.DOCKER_MANIFEST,
                             oci.DOCKER_LIST))
DOCKER_HUB_API = "registry-1.docker.io"


class RegistryError(SourceError):
    """A registry request failed (network, TLS, auth, missing content)."""


class NotFound(RegistryError):
    """The registry does not have the manifest or blob asked for."""


class TimedOut(RegistryError):
    """The command's deadline for registry work passed (never retried)."""


def certs_dirs(host: str) -> list[Path]:
    """The directories whose ``*.crt`` are CAs for `host` when no ``--cert-dir`` is given."""
    dirs = []
    if os.getuid() != 0:
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        dirs.append(config / "containers" / "certs.d")
    return [d / host for d in [*dirs, *CERTS_DIRS]]


def _ssl_context(host: str, options: RegistryOptions) -> tuple[ssl.SSLContext, tuple[str, str]
                                                                | None]:
    context = ssl.create_default_context()
    client_cert: tuple[str, str] | None = None
    dirs = [options.cert_dir] if options.cert_dir is not None else certs_dirs(host)
    for directory in dirs:
        try:
            entries = sorted(directory.iterdir())
        except OSError:
            continue
        for path in entries:
            try:
                if path.suffix == ".crt":
                    context.load_verify_locations(cafile=str(path))
                elif path.suffix == ".cert" and path.with_suffix(".key").is_file():
                    client_cert = (str(path), str(path.with_suffix(".key")))
            except (OSError, ssl.SSLError) as exc:
                raise RegistryError(f"{host}: cannot load {path}: {exc}") from exc
    return context, client_cert


class _ContextAdapter(requests.adapters.HTTPAdapter):
    """An adapter whose TLS verification uses `context` (system CAs + certs.d)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__(max_retries=0, pool_maxsize=8)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)


_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> ``("bearer", {realm: ..., ...})``."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


def describe_connection_error(exc: BaseException) -> str:
    """A short reason for a failed connection."""
    text = str(exc)
    causes = _causes(exc)
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted ({cause.verify_message})"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
    if isinstance(exc, requests.TooManyRedirects):
        return "too many redirects"
    for cause in causes:
        if isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError,
                              BrokenPipeError, http.client.RemoteDisconnected,
                              http.client.IncompleteRead,
                              urllib3.exceptions.IncompleteRead)):
            return "connection closed by the registry"
    if "NameResolutionError" in text or "Name or service not known" in text or \
            "Failed to resolve" in text or "nodename nor servname" in text:
        return "unknown host (name does not resolve)"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS certificate not trusted"
    if "Connection refused" in text:
        return "connection refused"
    if isinstance(exc, requests.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, (requests.Timeout, TimeoutError)) or any(
            isinstance(c, (urllib3.exceptions.ReadTimeoutError, TimeoutError))
            for c in causes):
        return "no data received in time (stalled)"
    for cause in causes:
        if isinstance(cause, ssl.SSLError):
            return f"TLS error ({cause.reason or cause})"
    return " ".join(text.split())[:200]


def _causes(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or any(current is s for s in seen) or len(seen) > 20:
            continue
        seen.append(current)
        pending += [current.__cause__, current.__context__]
        pending += [a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            pending.append(reason)
    return seen


def basic_authorization(creds: Credentials) -> dict[str, str]:
    """The basic ``Authorization`` header, UTF-8 as podman sends it (requests would encode
    latin-1, and raise on a name or password outside it)."""
    token = base64.b64encode(f"{creds.username}:{creds.password}".encode("utf-8",
                                                                          "surrogateescape"))
    return {"Authorization": f"Basic {token.decode()}"}


def _final(exc: BaseException) -> bool:
    """A failure retrying cannot mend: an unknown host, an untrusted certificate, a TLS
    setup the server refuses, a redirect loop."""
    reason = describe_connection_error(exc)
    return reason.startswith(("unknown host", "TLS", "too many redirects"))


class Client:
    """The registry at `host` (``HOST[:PORT]``, ``docker.io`` meaning Docker Hub)."""

    def __init__(self, host: str, options: RegistryOptions | None = None,
                 insecure: bool = False, sleep: Callable[[float], None] = time.sleep) -> None:
        self.host = host
        self.options = options or RegistryOptions()
        self.api_host = DOCKER_HUB_API if host == "docker.io" else host
        verify = self.options.tls_verify
        self.verify = (not insecure) if verify is None else verify
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "squashstore"
        context, client_cert = _ssl_context(host, self.options)
        self.session.mount("https://", _ContextAdapter(context) if self.verify else
                           requests.adapters.HTTPAdapter(max_retries=0, pool_maxsize=8))
        self.session.mount("http://", requests.adapters.HTTPAdapter(max_retries=0))
        if client_cert is not None:
            self.session.cert = client_cert
        self.session.verify = self.verify
        self._base: str | None = None
        self._tokens: dict[str, str] = {}
        self._auth_lock = threading.Lock()
        """Taken to answer a 401, so that threads share one token instead of each taking
        another thread's fresh token for a refusal."""
        self._basic = False
        self._explicit: Credentials | None = (parse_creds(self.options.creds)
                                              if self.options.creds else None)
        self._sleep = sleep
        self.stall = min(self.options.stall or config.load().registry.stall, STALL_MAX)
        """Seconds without a byte before a request counts as stalled."""
        self.deadline = self.options.deadline

    # ------------------------------------------------------------------ connection

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def credentials(self, repository: str = "") -> Credentials | None:
        if self._explicit is not None:
            return self._explicit
        return find_credentials(self.host, repository, self.options.authfile)

    def timeouts(self, what: str) -> tuple[float, float]:
        """(connect, read) seconds for the next request or read: the stall limit, cut to
        what is left of the deadline; `TimedOut` when nothing is left."""
        connect, read = CONNECT_TIMEOUT, self.stall
        if self.deadline is not None:
            left = self.deadline.remaining()
            if left <= 0:
                raise self._timed_out(what)
            connect, read = min(connect, left), min(read, left)
        return connect, read

    def expired(self, what: str, cause: BaseException | None = None) -> None:
        """Raise `TimedOut` if the deadline has passed (`cause` chained)."""
        if self.deadline is not None and self.deadline.remaining() <= 0:
            raise self._timed_out(what) from cause

    def _timed_out(self, what: str) -> TimedOut:
        seconds = self.deadline.seconds if self.deadline is not None else 0.0
        return TimedOut(f"{self.host}: gave up after {seconds:g} s (--timeout, [registry] "
                        f"timeout): {what}")

    def pause(self, seconds: float) -> None:
        """A backoff wait, cut short by the deadline."""
        if self.deadline is not None:
            seconds = min(seconds, max(self.deadline.remaining(), 0.0))
        self._sleep(seconds)

    def _send(self, method: str, url: str, stream: bool = False,
              **kwargs: Any) -> requests.Response:
        """One request. Bodies always stream: one not asked for as a stream is read here, at
        most `SMALL_BODY_LIMIT` bytes (a registry's answer cannot fill the memory)."""
        what = f"{method} {urllib.parse.urlsplit(url).path}"
        timeout = self.timeouts(what)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            # verify given per request: a session's verify=False loses to $REQUESTS_CA_BUNDLE
            response = self.session.request(method, url, timeout=timeout, verify=self.verify,
                                            stream=True, **kwargs)
        if not stream:
            try:
                body = self.read_body(response, SMALL_BODY_LIMIT + 1, what)
            except TimedOut:
                response.close()
                raise
            except RegistryError as exc:  # a broken connection: retried like one
                response.close()
                raise requests.ConnectionError(str(exc)) from exc.__cause__
            except BaseException:
                response.close()
                raise
            if len(body) > SMALL_BODY_LIMIT:
                response.close()
                raise RegistryError(f"{self.host}: {what}: the answer is larger than "
                                    f"{SMALL_BODY_LIMIT} bytes")
            response._content = body  # what requests keeps of a body it read itself
            response.raw.release_conn()  # read to its end: the connection is reused
        return response

    def base(self) -> str:
        """``https://HOST`` (or ``http://HOST`` for an insecure registry that has no TLS)."""
        if self._base is not None:
            return self._base
        https = f"https://{self.api_host}"
        try:
            self._retrying(lambda: self._send("GET", https + "/v2/"), "GET /v2/")
            self._base = https
        except RegistryError as exc:
            if self.verify or not isinstance(exc.__cause__, requests.RequestException):
                raise
            http = f"http://{self.api_host}"
            self._retrying(lambda: self._send("GET", http + "/v2/"), "GET /v2/")
            self._base = http
        return self._base

    def _retrying(self, call: Callable[[], requests.Response], what: str,
                  idempotent: bool = True) -> requests.Response:
        delay = BACKOFF
        attempts = RETRIES + 1 if idempotent else 1
        for attempt in range(attempts):
            try:
                response = call()
            except requests.RequestException as exc:
                self.expired(what, exc)
                if attempt == attempts - 1 or _final(exc):
                    raise RegistryError(f"{self.host}: {what}: "
                                        f"{describe_connection_error(exc)}") from exc
            else:
                if response.status_code not in (429, 500, 502, 503, 504) or \
                        attempt == attempts - 1:
                    return response
                response.close()
            self.pause(delay)
            self.expired(what)
            delay *= 2
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ auth

    def _auth_headers(self, scope: str, repository: str) -> dict[str, str]:
        token = self._tokens.get(scope)
        if token:
            return {"Authorization": f"Bearer {token}"}
        creds = self.credentials(repository)
        if self._basic and creds is not None:
            return basic_authorization(creds)
        return {}

    def _authenticate(self, response: requests.Response, scope: str, repository: str,
                      attempt: int) -> None:
        """Answer a 401: the first time with what the challenge asks (a cached token may
        have expired: it is replaced), a second refusal is final."""
        header = response.headers.get("WWW-Authenticate", "")
        scheme, params = parse_challenge(header)
        creds = self.credentials(repository)
        if scheme == "basic":
            if creds is None:
                raise RegistryError(f"{self.host}: authentication required (no credentials: "
                                    "`squashstore login` or --creds)")
            if self._basic and attempt > 0:
                raise self._refused(creds)
            self._basic = True
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(f"{self.host}: unsupported authentication challenge "
                                f"{header[:80]!r}")
        if attempt > 0:
            if creds is None:
                raise RegistryError(f"{self.host}: access denied to {scope} (not logged in)")
            raise RegistryError(f"{self.host}: access denied to {scope} for "
                                f"{creds.username}")
        self._tokens[scope] = self._fetch_token(params, scope, creds)

    def _refused(self, creds: Credentials) -> RegistryError:
        where = f" (from {creds.source})" if creds.source else ""
        return RegistryError(f"{self.host}: authentication failed: wrong username or password "
                             f"for {creds.username!r}{where}")

    def _fetch_token(self, params: Mapping[str, str], scope: str,
                     creds: Credentials | None) -> str:
        query = {k: v for k, v in (("service", params.get("service", "")),
                                   ("scope", scope)) if v}
        auth = basic_authorization(creds) if creds is not None else {}
        realm = params["realm"]
        if urllib.parse.urlsplit(realm).scheme not in ("http", "https"):
            raise RegistryError(f"{self.host}: unsupported token realm {realm[:80]!r}")
        response = self._retrying(
            lambda: self._send("GET", realm, params=query, headers=auth), "token request")
        if response.status_code in (401, 403):
            if creds is not None:
                raise self._refused(creds)
            raise RegistryError(f"{self.host}: authentication required (no credentials: "
                                "`squashstore login` or --creds)")
        if response.status_code != 200:
            raise RegistryError(f"{self.host}: token request to {realm} failed: HTTP "
                                f"{response.status_code}")
        try:
            body = response.json()
        except ValueError as exc:
            raise RegistryError(f"{self.host}: the token service sent no JSON") from exc
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) \
            else None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.host}: the token service sent no token")
        return token

    def check_login(self) -> None:
        """What ``podman login`` checks: the credentials are accepted by the registry."""
        creds = self.credentials()
        url = self.base() + "/v2/"
        response = self._retrying(lambda: self._send("GET", url), "GET /v2/")
        if response.status_code == 401:
            scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
            if creds is None:
                raise RegistryError(f"{self.host}: no credentials given")
            if scheme == "bearer" and "realm" in params:
                self._fetch_token(params, "", creds)
                return
            response = self._retrying(lambda: self._send(
                "GET", url, headers=basic_authorization(creds)), "GET /v2/")
            if response.status_code == 401:
                raise self._refused(creds)
        if response.status_code >= 400:
            raise RegistryError(f"{self.host}: GET /v2/: HTTP {response.status_code}")

    # ------------------------------------------------------------------ requests

    def request(self, method: str, path: str, repository: str, *, push: bool = False,
                headers: Mapping[str, str] | None = None, stream: bool = False,
                data: Any = None, idempotent: bool | None = None) -> requests.Response:
        """`method` on `path` (``/v2/...`` or an absolute URL) with auth for `repository`."""
        scope = f"repository:{repository}:{'pull,push' if push else 'pull'}"
        url = path if path.startswith(("http://", "https://")) else self.base() + path
        idem = method in ("GET", "HEAD") if idempotent is None else idempotent
        refusals = 0
        for _ in range(AUTH_ROUNDS):
            sent = self._auth_headers(scope, repository)
            all_headers = {**(headers or {}), **sent}

            def send(h: dict[str, str] = all_headers) -> requests.Response:
                return self._send(method, url, headers=h, stream=stream, data=data,
                                  allow_redirects=True)

            response = self._retrying(send, f"{method} {urllib.parse.urlsplit(url).path}",
                                      idem)
            if response.status_code != 401:
                return response
            response.close()
            with self._auth_lock:
                if self._auth_headers(scope, repository) != sent:
                    continue  # another thread authenticated meanwhile: try with its token
                self._authenticate(response, scope, repository, refusals)
            refusals += 1
        raise RegistryError(f"{self.host}: {method} {urllib.parse.urlsplit(url).path}: "
                            "authentication kept changing under concurrent requests")

    def _error(self, response: requests.Response, what: str) -> RegistryError:
        detail = ""
        with contextlib.suppress(ValueError, KeyError, TypeError, IndexError, AttributeError,
                                 RegistryError):
            body = response._content if isinstance(response._content, bytes) else \
                self.read_body(response, SMALL_BODY_LIMIT, what)
            errors = json.loads(body)["errors"]
            detail = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
                               for e in errors)
        if response.status_code == 403:
            detail = detail or "access denied"
        text = f"{self.host}: {what}: HTTP {response.status_code}" + \
            (f" ({detail})" if detail else "")
        return NotFound(text) if response.status_code == 404 else RegistryError(text)

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """``(bytes, media type, digest)`` of a manifest or index; the digest is checked."""
        response = self.request("GET", f"/v2/{repository}/manifests/{reference}", repository,
                                headers={"Accept": MANIFEST_ACCEPT}, stream=True)
        with response:
            if response.status_code != 200:
                raise self._error(response, f"manifest {repository}:{reference}")
            data = self.read_body(response, MANIFEST_LIMIT + 1,
                                  f"manifest {repository}:{reference}", decode=True)
        if len(data) > MANIFEST_LIMIT:
            raise RegistryError(f"{self.host}: manifest {repository}:{reference} is larger "
                                f"than {MANIFEST_LIMIT} bytes")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha") and ":" in reference and reference != digest:
            raise RegistryError(f"{self.host}: manifest {repository}@{reference}: digest "
                                f"mismatch (got {digest})")
        promised = response.headers.get("Docker-Content-Digest", "")
        if promised.startswith("sha256:") and promised != digest:
            raise RegistryError(f"{self.host}: manifest {repository}:{reference}: "
                                f"Docker-Content-Digest {promised} does not match {digest}")
        media_type = response.headers.get("Content-Type", "").partition(";")[0].strip()
        with contextlib.suppress(SourceError):
            media_type = oci.media_type_of(data, f"{repository}:{reference}") \
                if media_type not in (*oci.MANIFEST_TYPES, *oci.INDEX_TYPES) else media_type
        return data, media_type, digest

    def read_body(self, response: requests.Response, limit: int, what: str,
                  decode: bool = False) -> bytes:
        """At most `limit` bytes of a streamed response's body (a Content-Encoding undone
        when `decode`), read under the stall limit and the deadline."""
        parts: list[bytes] = []
        total = 0
        try:
            while total < limit:
                _set_read_timeout(response, self.timeouts(what)[1])
                data = _read_some(response, limit - total, decode)
                if not data:
                    break
                parts.append(data)
                total += len(data)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            self.expired(what, exc)
            raise RegistryError(f"{self.host}: {what}: "
                                f"{describe_connection_error(exc)}") from exc
        return b"".join(parts)

    def open_blob(self, repository: str, digest: str, size: int = -1) -> BinaryIO:
        """A raw stream of the blob (not yet verified: the caller checks the digest)."""
        return cast(BinaryIO, BlobReader(self, repository, digest, size))

    def read_blob(self, repository: str, descriptor: oci.Descriptor, limit: int) -> bytes:
        """A small blob's bytes (a config), checked against `descriptor`."""
        if descriptor.size > limit:
            raise RegistryError(f"{self.host}: {descriptor.digest} is {descriptor.size} "
                                f"bytes, more than {limit}")
        parts: list[bytes] = []
        total = 0
        with self.open_blob(repository, descriptor.digest, descriptor.size) as blob:
            while total <= limit and (part := blob.read(limit + 1 - total)):
                parts.append(part)
                total += len(part)
        data = b"".join(parts)
        return oci.fetch_verified(lambda _d: data, descriptor,
                                  f"{self.host}/{repository}")

    def blob_exists(self, repository: str, digest: str) -> bool:
        response = self.request("HEAD", f"/v2/{repository}/blobs/{digest}", repository,
                                push=True)
        response.close()
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise self._error(response, f"HEAD blob {digest}")

    def upload_blob(self, repository: str, path: Path, digest: str,
                    progress: Callable[[int], None] | None = None) -> bool:
        """Upload the file at `path` as blob `digest` in `UPLOAD_CHUNK` pieces; False when
        the registry already had it. The digest is checked by the registry on the final PUT.
        """
        if self.blob_exists(repository, digest):
            if progress is not None:
                progress(path.stat().st_size)
            return False
        last: RegistryError | None = None
        for attempt in range(RETRIES + 1):
            try:
                self._upload_once(repository, path, digest, progress)
                return True
            except RegistryError as exc:
                if isinstance(exc, TimedOut) or attempt == RETRIES or \
                        not isinstance(exc.__cause__, requests.RequestException):
                    raise
                last = exc
                self.pause(BACKOFF * 2 ** attempt)
        raise last or AssertionError("unreachable")

    def _upload_once(self, repository: str, path: Path, digest: str,
                     progress: Callable[[int], None] | None) -> None:
        location = self._start_upload(repository)
        offset = 0
        with path.open("rb") as f:
            while chunk := f.read(UPLOAD_CHUNK):
                end = offset + len(chunk) - 1
                response = self.request(
                    "PATCH", location, repository, push=True, data=chunk, idempotent=False,
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Range": f"{offset}-{end}",
                             "Content-Length": str(len(chunk))})
                response.close()
                if response.status_code != 202:
                    raise self._error(response, f"uploading {digest} at byte {offset}")
                location = self._location(response)
                offset += len(chunk)
                del chunk
                if progress is not None:
                    progress(offset)
        url = _with_digest(location, digest)
        response = self.request("PUT", url, repository, push=True, idempotent=False,
                                headers={"Content-Length": "0"})
        response.close()
        if response.status_code != 201:
            raise self._error(response, f"finishing the upload of {digest}")

    def _start_upload(self, repository: str) -> str:
        """POST a new upload session; its location."""
        response = self.request("POST", f"/v2/{repository}/blobs/uploads/", repository,
                                push=True, headers={"Content-Length": "0"})
        response.close()
        if response.status_code != 202:
            raise self._error(response, "starting an upload")
        return self._location(response)

    def _location(self, response: requests.Response) -> str:
        location = response.headers.get("Location", "")
        if not location:
            raise RegistryError(f"{self.host}: the registry sent no upload location")
        return urllib.parse.urljoin(self.base() + "/", location)

    def upload_bytes(self, repository: str, data: bytes, digest: str) -> None:
        """A small blob (a config) in one monolithic PUT."""
        if self.blob_exists(repository, digest):
            return
        location = self._start_upload(repository)
        url = _with_digest(location, digest)
        response = self.request("PUT", url, repository, push=True, data=data,
                                idempotent=False,
                                headers={"Content-Type": "application/octet-stream"})
        response.close()
        if response.status_code != 201:
            raise self._error(response, f"uploading {digest}")

    def put_manifest(self, repository: str, reference: str, data: bytes,
                     media_type: str) -> None:
        response = self.request("PUT", f"/v2/{repository}/manifests/{reference}", repository,
                                push=True, data=data, idempotent=True,
                                headers={"Content-Type": media_type})
        response.close()
        if response.status_code not in (200, 201):
            raise self._error(response, f"putting the manifest {repository}:{reference}")


class BlobReader(io.RawIOBase):
    """A blob's bytes as they arrive; a dropped or stalled connection (nothing received for
    the client's `stall` seconds) is resumed from the byte where it broke with a ``Range``
    request (or, when the registry ignores Range, by skipping), at most `RETRIES` times in a
    row without progress. Under a deadline each read returns what one receive brings, so the
    deadline is checked at least every `stall` seconds. A registry that sends more than the
    blob's `size` is cut off at once (a lying server cannot fill the disk)."""

    def __init__(self, client: Client, repository: str, digest: str, size: int) -> None:
        super().__init__()
        self._client, self._repository, self._digest, self._size = \
            client, repository, digest, size
        self.position = 0
        self.resumes = 0
        self._response: requests.Response | None = None
        self._failures = 0
        self._broke = ""
        """Why the last connection broke (named when resuming it fails too)."""

    def readable(self) -> bool:
        return True

    def _what(self) -> str:
        return f"{self._client.host}/{self._repository}@{self._digest}"

    def _of(self) -> str:
        return f"{self.position} of {self._size}" if self._size >= 0 else str(self.position)

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.position}-"} if self.position else {}
        try:
            response = self._client.request(
                "GET", f"/v2/{self._repository}/blobs/{self._digest}", self._repository,
                headers=headers, stream=True)
        except TimedOut:
            raise
        except RegistryError as exc:
            if not self.position:
                raise
            raise RegistryError(f"{self._what()}: {self._broke}, and resuming failed: "
                                f"{str(exc).removeprefix(self._client.host + ': ')}") from exc
        if response.status_code == 416:
            response.close()
            total = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("Content-Range", ""))
            has = f"has only {total.group(1)} bytes of it" if total else "cannot resume it"
            raise RegistryError(f"{self._what()}: resuming at byte {self._of()}: the registry "
                                f"{has} (the manifest gives a wrong size, or the blob changed)")
        if response.status_code not in (200, 206):
            error = self._client._error(response, f"blob {self._digest}")
            response.close()
            raise error
        if self.position and response.status_code == 200:
            skip = self.position
            while skip:
                _set_read_timeout(response, self._client.timeouts(self._at())[1])
                data = _read_some(response, min(skip, 1 << 20))
                if not data:
                    response.close()
                    raise RegistryError(f"{self._what()}: the blob ended early on resume")
                skip -= len(data)
        elif response.status_code == 206:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if start is None or int(start.group(1)) != self.position:
                response.close()
                raise RegistryError(f"{self._what()}: the registry resumed at the wrong byte")
        self._response = response

    def _at(self) -> str:
        return f"blob {self._digest} at byte {self._of()}"

    def _reason(self, exc: BaseException) -> str:
        """Why a read failed, with where: stalled, or closed after N of M bytes."""
        text = _short(exc)
        if "stalled" in text:
            return f"no data for {self._client.stall:g} s after {self._of()} bytes (stalled)"
        if text.startswith("connection closed") or isinstance(exc, RegistryError):
            return f"connection closed after {self._of()} bytes"
        return f"{text} after {self._of()} bytes"

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while True:
            if self._response is None:
                self._open()
            assert self._response is not None
            limit = len(buffer)
            if self._size >= 0:
                limit = min(limit, self._size - self.position + 1)  # one byte to see a lie
            try:
                _set_read_timeout(self._response, self._client.timeouts(self._at())[1])
                data = _read_some(self._response, limit, whole=self._client.deadline is None) \
                    if limit > 0 else b""
                failure: BaseException | None = None
                if not data and self._size >= 0 and self.position < self._size:
                    failure = RegistryError("connection closed")
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                data, failure = b"", exc
            if failure is None:
                n = len(data)
                if self._size >= 0 and self.position + n > self._size:
                    raise RegistryError(f"{self._what()}: the registry sent more than the "
                                        f"{self._size} bytes the manifest gives")
                buffer[:n] = data
                self.position += n
                if n:
                    self._failures = 0
                return n
            self._response.close()
            self._response = None
            self._broke = self._reason(failure)
            self._client.expired(self._at(), failure)
            self._failures += 1
            if self._failures > RETRIES:
                raise RegistryError(f"{self._what()}: download failed after {RETRIES} "
                                    f"retries: {self._broke}") from failure
            self.resumes += 1
            self._client.pause(BACKOFF * 2 ** (self._failures - 1))

    def close(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None
        super().close()


def _read_some(response: requests.Response, limit: int, decode: bool = False,
               whole: bool = False) -> bytes:
    """Up to `limit` bytes of a streamed body, as one receive brings them (urllib3's read1;
    a plain read where it has none); with `whole`, `limit` bytes unless the body ends (one
    call for many receives: 15-40 % less CPU for a blob, each receive still bounded by the
    stall limit, but a server dripping a byte at a time keeps it going: for reads without a
    deadline)."""
    raw = response.raw
    read1 = getattr(raw, "read1", None)
    if read1 is not None and not whole:
        return cast(bytes, read1(limit, decode_content=decode))
    return cast(bytes, raw.read(limit, decode_content=decode))


def _set_read_timeout(response: requests.Response, seconds: float) -> None:
    """The socket timeout for the next receives of a streamed body (requests fixes it when
    the request is sent; a deadline that comes closer must shorten it)."""
    sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(seconds)


def _short(exc: BaseException) -> str:
    if isinstance(exc, RegistryError):
        return str(exc)
    return describe_connection_error(exc)


def spool(reader: BinaryIO, dest: BinaryIO, chunk: int = 1 << 20) -> int:
    """Copy `reader` to `dest`; the byte count."""
    total = 0
    while data := reader.read(chunk):
        dest.write(data)
        total += len(data)
    return total


def _with_digest(location: str, digest: str) -> str:
    """An upload location with the ``digest`` query that completes it."""
    return location + ("&" if "?" in location else "?") + \
        urllib.parse.urlencode({"digest": digest})
