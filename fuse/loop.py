"""The event loop the FUSE server runs pyfuse3 on: one epoll, a worker-thread pool, signals.

This module owns how the server waits. pyfuse3 runs its request loop on whatever object its
module attribute `trio` names (`pyfuse3.asyncio.enable()` puts asyncio there) and calls on
it only a few primitives: `open_nursery`, `Lock`, `lowlevel.wait_readable`,
`lowlevel.notify_closing`, `lowlevel.current_task`, `lowlevel.current_trio_token` and
`ClosedResourceError`. `Loop` provides exactly those for a server whose only descriptor is
/dev/fuse, plus what the server itself needs: `run_in_thread` (a bounded pool of daemon
threads, for data blocks decompressed off the loop) and `add_signal_handler`. Tasks are
coroutines resumed from a ready queue; a task waiting for the descriptor or a thread is
parked until epoll (one-shot registrations) or the wakeup pipe (thread results, signals)
says so. Against trio it saves the server's import of trio (~430 M instructions and a
forked ``ldconfig -p`` per start) and ~3/4 of the CPU pyfuse3 spends around each request
(NOTES.md, "FUSE server on asyncio"): trio and asyncio are general, this is not. An
exception escaping a task ends its nursery, and `run` raises it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import select
import signal
import threading
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


class ClosedResourceError(Exception):
    """The descriptor a task waited for is being closed (`Loop.notify_closing`)."""


class _Task:
    __slots__ = ("coro", "name", "nursery")

    def __init__(self, coro: Any, name: str | None, nursery: _Nursery | None) -> None:
        self.coro = coro
        self.name = name
        self.nursery = nursery


@types.coroutine
def _park() -> Generator[None, Any, Any]:
    """Suspend the current task until something puts it back on the ready queue."""
    return (yield)


class _Failure:
    """A value that resumes a task by raising `exc` in it."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Lock:
    """A fair lock for tasks of one loop (ownership passes straight to the next waiter)."""

    def __init__(self, loop: Loop) -> None:
        self._loop = loop
        self._held = False
        self._waiters: collections.deque[_Task] = collections.deque()

    async def __aenter__(self) -> None:
        if self._held:
            self._waiters.append(self._loop.current)
            await _park()
        else:
            self._held = True

    async def __aexit__(self, *exc: object) -> None:
        if self._waiters:
            self._loop.wake(self._waiters.popleft(), None)
        else:
            self._held = False


class _Nursery:
    """Child tasks; leaving the block waits for all of them and raises the first failure."""

    def __init__(self, loop: Loop) -> None:
        self._loop = loop
        self._children = 0
        self._parent: _Task | None = None
        self._error: BaseException | None = None

    async def __aenter__(self) -> _Nursery:
        return self

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any,
                   name: str | None = None) -> None:
        self._children += 1
        self._loop.wake(_Task(fn(*args), name, self), None)

    def child_done(self, error: BaseException | None) -> None:
        self._children -= 1
        if error is not None and self._error is None:
            self._error = error
        if not self._children and self._parent is not None:
            self._loop.wake(self._parent, None)

    async def __aexit__(self, *exc: object) -> None:
        if self._children:
            self._parent = self._loop.current
            await _park()
        if self._error is not None:
            raise self._error


class Loop:
    """One server's loop (see the module docstring); `run` drives a coroutine to its end."""

    ClosedResourceError = ClosedResourceError

    def __init__(self, threads: int = 0) -> None:
        self.lowlevel = self.from_thread = self  # pyfuse3 calls trio.lowlevel.*
        self.current = _Task(None, "none", None)
        self._ready: collections.deque[tuple[_Task, Any]] = collections.deque()
        self._waiting: dict[int, _Task] = {}
        self._registered: set[int] = set()
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._threads = threads
        self._workers = 0
        self._jobs: queue.SimpleQueue[tuple[_Task, Callable[[], Any]] | None] = (
            queue.SimpleQueue())
        self._results: collections.deque[tuple[_Task, Any]] = collections.deque()
        self._signals: list[int] = []
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._previous: dict[int, Any] = {}

    # -- what pyfuse3 calls --------------------------------------------------------------

    def current_trio_token(self) -> str:
        return "squashstore"

    def current_task(self) -> _Task:
        return self.current

    def open_nursery(self) -> _Nursery:
        return _Nursery(self)

    def Lock(self) -> _Lock:  # trio's name
        return _Lock(self)

    async def wait_readable(self, fd: int) -> None:
        self._waiting[fd] = self.current
        if fd in self._registered:
            self._epoll.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)
        else:
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLONESHOT)
            self._registered.add(fd)
        await _park()

    def notify_closing(self, fd: int) -> None:
        task = self._waiting.pop(fd, None)
        if task is not None:
            self.wake(task, _Failure(ClosedResourceError()))

    # -- what the server calls -----------------------------------------------------------

    async def run_in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in one of at most `threads` daemon threads (none: here, at once); its
        result or exception."""
        if not self._threads:
            return fn(*args)
        if self._workers < self._threads:
            self._workers += 1
            threading.Thread(target=self._work, name=f"squashstore-read-{self._workers}",
                             daemon=True).start()
        self._jobs.put((self.current, lambda: fn(*args)))
        result: T = await _park()
        return result

    def add_signal_handler(self, signum: int, handler: Callable[[int], None]) -> None:
        """Call `handler(signum)` on the loop when `signum` arrives (main thread only)."""
        if not self._handlers:
            signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._handlers[signum] = handler
        self._previous.setdefault(signum, signal.signal(signum, self._on_signal))

    def wake(self, task: _Task, value: Any) -> None:
        self._ready.append((task, value))

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` and every task it starts until `coro` returns (or raises)."""
        main = _Task(coro, "main", None)
        ready, waiting = self._ready, self._waiting
        ready.append((main, None))
        try:
            while True:
                while ready:
                    task, value = ready.popleft()
                    self.current = task
                    try:
                        if type(value) is _Failure:
                            task.coro.throw(value.exc)
                        else:
                            task.coro.send(value)
                    except StopIteration:
                        if task is main:
                            return
                        task.nursery.child_done(None)  # type: ignore[union-attr]
                    except BaseException as exc:
                        if task is main:
                            raise
                        task.nursery.child_done(exc)  # type: ignore[union-attr]
                for fd, _ in self._epoll.poll():
                    if fd == self._wake_r:
                        self._woken()
                    else:
                        parked = waiting.pop(fd, None)
                        if parked is not None:
                            ready.append((parked, None))
        finally:
            self._close()

    # -- inside --------------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            task, call = job
            try:
                value: Any = call()
            except BaseException as exc:  # handed to the task that asked
                value = _Failure(exc)
            self._results.append((task, value))
            with contextlib.suppress(BlockingIOError):  # full: the loop drains it anyway
                os.write(self._wake_w, b"t")

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _woken(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        while self._results:
            self._ready.append(self._results.popleft())
        while self._signals:
            signum = self._signals.pop(0)
            self._handlers[signum](signum)

    def _close(self) -> None:
        if self._handlers:
            signal.set_wakeup_fd(-1)
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
        for _ in range(self._workers):
            self._jobs.put(None)
        self._epoll.close()
        if not self._workers:  # else a read still running may write to it: left to exit
            os.close(self._wake_r)
            os.close(self._wake_w)

