"""One thread that relays the bytes of every TCP tunnel the agent cannot hand over.

In a gVisor sandbox (and over TCP) the agent itself carries a tunnel's bytes between the
gateway's connection and the port's (tunnel.py). A thread pair per tunnel made 10,000 idle
WebSockets cost 20,000 threads in the sandbox: its pids limit was spent and the sandbox stopped
answering. Here every tunnel is two non-blocking sockets in one ``selectors`` loop: an idle
tunnel costs its two descriptors and a few hundred bytes, and a busy one at most one buffer
(64 KiB) per direction, because a side is not read while what it sent before is still waiting
for the other side to take it (backpressure, not memory). Everything it holds is charged to the
sandbox: its descriptors, memory and the one thread.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading

BUFFER = 65536


class _Direction:
    """Bytes from ``src`` to ``dst``; ``pending`` holds what ``dst`` has not taken yet."""

    __slots__ = ("done", "dst", "pending", "src")

    def __init__(self, src: socket.socket, dst: socket.socket, pending: bytes) -> None:
        self.src, self.dst, self.pending, self.done = src, dst, pending, False


class _Tunnel:
    __slots__ = ("a", "b", "ways")

    def __init__(self, a: socket.socket, b: socket.socket, a_sent: bytes) -> None:
        self.a, self.b = a, b
        self.ways = (_Direction(a, b, a_sent), _Direction(b, a, b""))

    def interest(self, sock: socket.socket) -> int:
        events = 0
        for way in self.ways:
            if way.src is sock and not way.done and not way.pending:
                events |= selectors.EVENT_READ
            if way.dst is sock and way.pending:
                events |= selectors.EVENT_WRITE
        return events

    def step(self, sock: socket.socket, mask: int) -> None:
        """Move what can move without blocking; OSError ends the tunnel (the caller closes)."""
        for way in self.ways:
            if way.dst is sock and mask & selectors.EVENT_WRITE and way.pending:
                sent = way.dst.send(way.pending)
                way.pending = way.pending[sent:]
                if not way.pending and way.done:
                    way.dst.shutdown(socket.SHUT_WR)
            if way.src is sock and mask & selectors.EVENT_READ and not way.pending:
                try:
                    data = way.src.recv(BUFFER)
                except (BlockingIOError, InterruptedError):
                    continue
                if not data:
                    way.done = True
                    way.dst.shutdown(socket.SHUT_WR)
                    continue
                try:
                    sent = way.dst.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                way.pending = data[sent:]

    @property
    def finished(self) -> bool:
        return all(way.done and not way.pending for way in self.ways)


class RelayLoop:
    """Started on first use; ``add`` may be called from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._incoming: list[_Tunnel] = []
        self._selector: selectors.BaseSelector | None = None
        self._wake_r, self._wake_w = -1, -1

    def add(self, client: socket.socket, client_sent: bytes, target: socket.socket) -> None:
        """Relay between ``client`` (which already sent ``client_sent``) and ``target`` until
        both sides have finished; both sockets belong to the loop from now on."""
        for sock in (client, target):
            sock.setblocking(False)
        with self._lock:
            if self._selector is None:
                self._selector = selectors.DefaultSelector()
                self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self._selector.register(self._wake_r, selectors.EVENT_READ, None)
                threading.Thread(target=self._run, name="tunnel-relay", daemon=True).start()
            self._incoming.append(_Tunnel(client, target, client_sent))
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        while True:
            for key, mask in selector.select():
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    with self._lock:
                        fresh, self._incoming = self._incoming, []
                    for new in fresh:
                        self._update(selector, new)
                    continue
                tunnel: _Tunnel = key.data
                try:
                    tunnel.step(key.fileobj, mask)  # type: ignore[arg-type]
                except OSError:
                    self._close(selector, tunnel)
                    continue
                self._update(selector, tunnel)

    def _update(self, selector: selectors.BaseSelector, tunnel: _Tunnel) -> None:
        if tunnel.finished:
            self._close(selector, tunnel)
            return
        for sock in (tunnel.a, tunnel.b):
            events = tunnel.interest(sock)
            registered = sock in selector.get_map()
            if events and registered:
                selector.modify(sock, events, tunnel)
            elif events:
                selector.register(sock, events, tunnel)
            elif registered:
                selector.unregister(sock)

    @staticmethod
    def _close(selector: selectors.BaseSelector, tunnel: _Tunnel) -> None:
        for sock in (tunnel.a, tunnel.b):
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(sock)
            sock.close()


RELAY = RelayLoop()
