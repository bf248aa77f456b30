"""Byte ranges of one registry blob, fetched with HTTP ``Range`` requests.

`RangeSource` owns the remote side of a lazy image: it asks for ``bytes=a-b`` of
``GET /v2/<repo>/blobs/<digest>`` through a `Get` callable (which owns the URL, the auth
and the redirects to blob storage: `session_get` for a plain `requests` session with an
auth-header callback that is asked again, with ``refresh=True``, when the registry answers
401 because a bearer token expired), checks that the answer is exactly the bytes asked for
(206 with the right ``Content-Range``; a registry that ignores ``Range`` is read up to the
range and skipped), retries dropped connections and 429/5xx with backoff, and fetches
several ranges at once on a small thread pool. Whatever still fails is one `FetchError`,
an `OSError` with errno EIO: the squashfs reader reports it like a failed disk read, so
the FUSE server answers EIO to that read only and a later read tries again.
"""

from __future__ import annotations

import errno
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from squashstore.image import SquashstoreError
from squashstore.lazy.ranges import Span

if TYPE_CHECKING:  # requests is imported when a range is fetched: a FUSE server of an
    import requests  # ordinary image, which imports this through lazy.image, never pays it

    from squashstore.registry.options import Deadline

WORKERS = 4
"""Ranges fetched at once per image."""
RETRIES = 2
"""Attempts after the first for one range; a read waits at most about `BACKOFF` * 3 s
plus the timeouts before it fails with EIO."""
BACKOFF = 0.2
TIMEOUT = (5.0, 30.0)
"""(connect, read) seconds of one request."""
SKIP_MAX = 64 << 20
"""Most bytes read and dropped to reach a range from a registry that ignores ``Range``
(answers 200 with the whole blob): past it, every range would cost a download of the
blob up to it (completing an image: quadratic in its size)."""
_RETRY_STATUS = frozenset((429, 500, 502, 503, 504))
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

Get = Callable[[Mapping[str, str]], "requests.Response"]
"""GETs the blob with these extra headers (a ``Range``), auth and redirects included; the
response should be streamed (``stream=True``)."""
AuthHeaders = Callable[[bool], Mapping[str, str]]
"""The auth headers to send; called with True to get fresh ones after a 401."""


class FetchError(SquashstoreError, OSError):
    """A range of a lazily pulled blob could not be fetched (errno EIO)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)

    def __str__(self) -> str:
        return str(self.strerror)


def session_get(session: requests.Session, url: str, auth: AuthHeaders | None = None,
                timeout: tuple[float, float] = TIMEOUT) -> Get:
    """A `Get` for `url` over `session`; a 401 asks `auth` for fresh headers once."""

    def get(headers: Mapping[str, str]) -> requests.Response:
        fresh = False
        while True:
            sent = {**headers, **(auth(fresh) if auth is not None else {})}
            response = session.get(url, headers=sent, timeout=timeout, allow_redirects=True,
                                   stream=True)
            if response.status_code != 401 or auth is None or fresh:
                return response
            response.close()
            fresh = True

    return get


class RangeSource:
    """The `size` bytes of one blob, fetched by range through `get`; `what` names it in
    errors (``HOST/REPO@DIGEST``)."""

    def __init__(self, get: Get, size: int, what: str, *, workers: int = WORKERS,
                 retries: int = RETRIES, backoff: float = BACKOFF,
                 sleep: Callable[[float], None] = time.sleep, budget: float | None = None,
                 deadline: Deadline | None = None) -> None:
        self._get, self.size, self.what = get, size, what
        self._retries, self._backoff, self._sleep = retries, backoff, sleep
        self.budget = budget
        """Seconds one range may take, retries included (a FUSE read holds its process
        meanwhile); None: no limit beyond each receive's stall limit."""
        self.deadline = deadline
        """The command's deadline (``--timeout``): every range ends by it."""
        self.workers = workers
        """Ranges fetched at once."""
        self._pool = ThreadPoolExecutor(max_workers=workers,
                                        thread_name_prefix="squashstore-fetch")
        self.requests = 0
        """Range requests answered (for figures and tests)."""
        self.bytes = 0
        """Bytes received."""
        self._stats_lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def fetch(self, span: Span) -> bytes:
        """The bytes of `span`, retried; `FetchError` when they cannot be had."""
        if span.end > self.size:
            raise FetchError(f"{self.what}: range {span.start}-{span.end} beyond the blob's "
                             f"{self.size} bytes")
        if not len(span):
            return b""
        stop = self._stop()
        delay = self._backoff
        for attempt in range(self._retries + 1):
            last = attempt == self._retries
            try:
                return self._fetch_once(span, stop)
            except _Retry as exc:
                if last or (stop is not None and time.monotonic() + delay >= stop):
                    raise FetchError(f"{self.what}: bytes {span.start}-{span.end - 1}: "
                                     f"{exc}") from None
            self._sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _stop(self) -> float | None:
        """When a range fetched from now must be done (`time.monotonic`), None: never."""
        now = time.monotonic()
        stops = [now + self.budget] if self.budget is not None else []
        if self.deadline is not None:
            if self.deadline.remaining() <= 0:
                raise FetchError(f"{self.what}: gave up after {self.deadline.seconds:g} s "
                                 "(--timeout, [registry] timeout)")
            stops.append(now + self.deadline.remaining())
        return min(stops, default=None)

    def fetch_many(self, spans: Sequence[Span]) -> list[bytes]:
        """The bytes of every span, fetched concurrently; the first failure is raised after
        all have finished."""
        if len(spans) <= 1:
            return [self.fetch(s) for s in spans]
        futures = [self._pool.submit(self.fetch, s) for s in spans]
        results: list[bytes] = []
        error: BaseException | None = None
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as exc:  # re-raised below, after the others finished
                error = error or exc
        if error is not None:
            raise error
        return results

    def fetch_each(self, spans: Sequence[Span]) -> Iterator[tuple[Span, bytes]]:
        """Each span with its bytes, as they arrive, `workers` requests in flight (a new
        one as soon as one ends, at most twice `workers` answers held); the first failure
        is raised after the requests in flight have finished."""
        pending: set[Future[bytes]] = set()
        owner: dict[Future[bytes], Span] = {}
        queue = list(reversed(spans))
        error: BaseException | None = None
        try:
            while queue or pending:
                while queue and len(pending) < 2 * self.workers and error is None:
                    span = queue.pop()
                    future = self._pool.submit(self.fetch, span)
                    pending.add(future)
                    owner[future] = span
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        data = future.result()
                    except BaseException as exc:  # re-raised once the others finished
                        error = error or exc
                        continue
                    if error is None:
                        yield owner.pop(future), data
        finally:
            for future in pending:
                future.cancel()
            wait(pending)
        if error is not None:
            raise error

    def _fetch_once(self, span: Span, stop: float | None) -> bytes:
        import requests

        headers = {"Range": f"bytes={span.start}-{span.end - 1}",
                   "Accept-Encoding": "identity"}
        try:
            response = self._get(headers)
        except FetchError:
            raise
        except SquashstoreError as exc:  # the registry client's own error, retried already
            raise FetchError(f"{self.what}: {exc}") from None
        except (requests.RequestException, OSError) as exc:
            raise _Retry(_describe(exc)) from None
        with response:
            status = response.status_code
            if status in _RETRY_STATUS:
                raise _Retry(f"HTTP {status}")
            if status == 206:
                return self._partial(response, span, stop)
            if status == 200:
                return self._whole(response, span, stop)
            raise FetchError(f"{self.what}: bytes {span.start}-{span.end - 1}: HTTP {status}")

    def _body(self, response: requests.Response, limit: int, stop: float | None) -> bytes:
        """At most `limit` bytes of the body, as each receive brings them, checking `stop`
        between receives (a registry dripping a byte at a time cannot hold a read)."""
        import requests
        import urllib3

        raw = response.raw
        read = getattr(raw, "read1", None) or raw.read
        parts: list[bytes] = []
        total = 0
        try:
            while total < limit:
                if stop is not None and time.monotonic() >= stop:
                    raise _Retry(f"too slow: {total} bytes in time")
                data = read(min(limit - total, 1 << 20))
                if not data:
                    break
                parts.append(data)
                total += len(data)
        except (requests.RequestException, OSError, urllib3.exceptions.HTTPError) as exc:
            raise _Retry(_describe(exc)) from None
        return b"".join(parts)

    def _partial(self, response: requests.Response, span: Span, stop: float | None
                 ) -> bytes:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != span.start or \
                int(match.group(2)) != span.end - 1 or \
                match.group(3) not in ("*", str(self.size)):
            raise FetchError(f"{self.what}: the registry answered bytes {span.start}-"
                             f"{span.end - 1} with Content-Range "
                             f"{response.headers.get('Content-Range')!r}")
        data = self._body(response, len(span) + 1, stop)  # one more: never read a flood
        if len(data) > len(span):
            raise FetchError(f"{self.what}: the registry sent more than the "
                             f"{len(span)} bytes {span.start}-{span.end - 1} asked for")
        if len(data) != len(span):
            raise _Retry(f"got {len(data)} of {len(span)} bytes")
        self._count(len(data))
        return data

    def _whole(self, response: requests.Response, span: Span, stop: float | None
               ) -> bytes:
        """A registry that ignores Range: skip to the span, read it, drop the rest."""
        if span.start > SKIP_MAX:
            raise FetchError(f"{self.what}: the registry ignores Range requests (it answers "
                             f"with the whole blob): bytes {span.start}-{span.end - 1} "
                             "cannot be read lazily; pull the image without --lazy")
        skip = span.start
        while skip:
            piece = self._body(response, min(skip, 1 << 20), stop)
            if not piece:
                raise _Retry("the blob ended early")
            skip -= len(piece)
        data = self._body(response, len(span), stop)
        if len(data) != len(span):
            raise _Retry(f"got {len(data)} of {len(span)} bytes")
        self._count(span.end)
        return bytes(data)

    def _count(self, received: int) -> None:
        with self._stats_lock:
            self.requests += 1
            self.bytes += received


class _Retry(Exception):
    """A failure worth another attempt (connection trouble, 429, 5xx, short body)."""


def _describe(exc: BaseException) -> str:
    import requests
    import urllib3

    text = str(exc)
    if "Connection refused" in text or isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError | TimeoutError):
        return "timed out"
    return " ".join(text.split())[:160] or type(exc).__name__
