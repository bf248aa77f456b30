"""A TCP proxy on 127.0.0.1 that misbehaves like a bad network in front of a real registry.

`StallProxy(port)` forwards every connection to ``127.0.0.1:port`` byte for byte (TLS passes
through untouched: the registry's certificate for 127.0.0.1 stays valid). Once a connection
has carried `after` bytes from the registry to the client, the proxy applies `mode` to it,
for the first `times` such connections (-1: all of them), and passes the others through:

- ``stall``: stops forwarding and keeps the connection open and silent (a registry that
  hangs mid-blob);
- ``close``: closes both sides at once (a connection dropped mid-blob).

With `then_refuse`, every connection after the first hit is closed at once (a registry
that went away mid-blob). Manifests and configs are small, so with `after` above a few tens
of KiB only blob downloads are hit. `hits` counts the connections the mode was applied to.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

BUFFER = 64 << 10


class StallProxy:
    def __init__(self, port: int, after: int = 256 << 10, mode: str = "stall",
                 times: int = 1, then_refuse: bool = False) -> None:
        assert mode in ("stall", "close")
        self.target, self.after, self.mode, self.times = port, after, mode, times
        self.then_refuse = then_refuse
        self.hits = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True, name="stallproxy").start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take(self) -> bool:
        with self._lock:
            if self.times == 0:
                return False
            if self.times > 0:
                self.times -= 1
            self.hits += 1
            return True

    def _serve(self, client: socket.socket) -> None:
        if self.then_refuse and self.hits:
            client.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            client.close()
            return
        with self._lock:
            self._sockets += [client, upstream]
        down = 0
        stalled = False
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)
        try:
            while not self._closed.is_set():
                for key, _ in selector.select(0.5):
                    source = key.fileobj
                    assert isinstance(source, socket.socket)
                    data = source.recv(BUFFER)
                    if not data:
                        return
                    if source is upstream:
                        if down + len(data) > self.after and not stalled and \
                                down <= self.after and self._take():
                            client.sendall(data[:self.after - down])
                            if self.mode == "close":
                                return
                            stalled = True
                            selector.unregister(upstream)  # silent from now on
                            down = self.after + 1
                            continue
                        down += len(data)
                        client.sendall(data)
                    elif not stalled:
                        upstream.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
