"""A byte relay process: the far end of :mod:`sandlot.server.gateway.relay`.

The gateway hands it pairs of connected sockets (a client's connection and a connection into a
sandbox) over a ``SOCK_SEQPACKET`` control socket, with SCM_RIGHTS; from then on this process
copies bytes between the two, with backpressure each way and half-closes passed on, until both
directions are done, and reports the byte counts back. Long-lived connections -- WebSockets,
h2c upgrades, TCP proxy connections -- thus cost the gateway's event loop nothing once they are
open, use the machine's other cores, and their descriptors count against this process's
RLIMIT_NOFILE, not the gateway's (two per connection; the gateway starts more relays as these
fill up).

Started as a script (``python -P relay_worker.py FD MOST SERVER_PID``), not as
``-m sandlot.server...``, so that it imports nothing but the standard library and uvloop. When
the control socket reaches EOF (the server is gone, even by SIGKILL), or the server is no longer
its parent, every connection is closed and the process exits.

Control messages (one per packet): gateway → relay ``A`` + id (u64, with two fds attached) to
add a pair, ``C`` + id to close one; relay → gateway ``H`` + capacity (u64, pairs it can hold),
once at start, and ``D`` + id + bytes client→sandbox + bytes sandbox→client (u64 each) when a
pair is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import struct
import sys
from collections import deque

ADD, CLOSE, HELLO, DONE = b"A", b"C", b"H", b"D"
ID = struct.Struct("!Q")
REPORT = struct.Struct("!QQQ")
#: Descriptors kept for the process itself (control socket, stdio, uvloop's own).
RESERVED_FDS = 64
#: Above this much unsent data towards one side, the other side is not read.
HIGH_WATER = 256 * 1024
#: How often a relay checks that the server that started it is still its parent.
PARENT_CHECK_SECONDS = 2.0


class _Side(asyncio.Protocol):
    """One connection of a pair; what it reads is written to the other."""

    def __init__(self, pair: _Pair) -> None:
        self.pair = pair
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.copied = 0
        self.eof = False
        #: Read before the other side was attached (then reading pauses until it is).
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        assert self.transport is not None and self.peer is not None
        if self.pair.done:  # closed (CLOSE, or the other side failed) while being attached
            self.transport.close()
            return
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        peer = self.peer
        if peer.transport is None:
            return
        for data in peer.early:  # the peer was attached first and has already read
            self.transport.write(data)
        peer.early.clear()
        if peer.eof:
            self._pass_eof()
        if not peer.transport.is_closing():
            peer.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.copied += len(data)
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)
            assert self.transport is not None
            self.transport.pause_reading()
            return
        if not peer.transport.is_closing():
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer._pass_eof()
        return True  # the other direction goes on

    def _pass_eof(self) -> None:
        """The peer sent EOF: pass it on to our side, and end the pair once both have."""
        assert self.transport is not None and self.peer is not None
        if not self.transport.is_closing() and self.transport.can_write_eof():
            self.transport.write_eof()
        if self.eof:
            self.pair.finish()

    def pause_writing(self) -> None:  # our outgoing buffer is full: stop reading the peer
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.finish()


class _Pair:
    def __init__(self, relay: Relay, pair_id: int) -> None:
        self.relay = relay
        self.id = pair_id
        self.client = _Side(self)
        self.sandbox = _Side(self)
        self.client.peer, self.sandbox.peer = self.sandbox, self.client
        self.done = False

    def finish(self) -> None:
        """Close both sides (what is buffered is still sent) and report, once."""
        if self.done:
            return
        self.done = True
        for side in (self.client, self.sandbox):
            if side.transport is not None:
                side.transport.close()
        self.relay.report(self)


class Relay:
    def __init__(self, control: socket.socket, most: int = 0, server_pid: int = 0) -> None:
        self.control = control
        self.most = most
        #: The server that started us (0: not checked).
        self.server_pid = server_pid
        self.pairs: dict[int, _Pair] = {}
        self.outbox: deque[bytes] = deque()
        self.stopped = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def capacity(self) -> int:
        """Pairs this process can hold: its descriptor limit, raised to the hard limit (and
        the gateway's own cap, if it set one)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
        fits = max(1, (soft - RESERVED_FDS) // 2)
        return min(fits, self.most) if self.most > 0 else fits

    def start(self) -> None:
        self.send(HELLO + ID.pack(self.capacity()))
        self.loop.add_reader(self.control.fileno(), self.on_control)
        self._watch_parent()

    def _watch_parent(self) -> None:
        """Second guard beside the control socket's EOF: a relay whose server is gone (it was
        re-parented, perhaps before this process even started) stops, whatever happened to the
        control socket."""
        if self.server_pid and os.getppid() != self.server_pid:
            self.stop()
            return
        self.loop.call_later(PARENT_CHECK_SECONDS, self._watch_parent)

    # -- control -------------------------------------------------------------------------------

    def on_control(self) -> None:
        while True:
            try:
                data, fds, _flags, _ = socket.recv_fds(self.control, 64, 2)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:  # the server is gone: so are its connections
                for fd in fds:
                    os.close(fd)
                self.stop()
                return
            kind, body = data[:1], data[1:]
            if kind == ADD and len(fds) == 2 and len(body) == ID.size:
                self.add(ID.unpack(body)[0], fds[0], fds[1])
                continue
            for fd in fds:  # anything else carries no descriptors we keep
                os.close(fd)
            if kind == CLOSE and len(body) == ID.size:
                pair = self.pairs.get(ID.unpack(body)[0])
                if pair is not None:
                    pair.finish()

    def add(self, pair_id: int, client_fd: int, sandbox_fd: int) -> None:
        pair = _Pair(self, pair_id)
        self.pairs[pair_id] = pair
        self.loop.create_task(self._attach(pair, client_fd, sandbox_fd))

    async def _attach(self, pair: _Pair, client_fd: int, sandbox_fd: int) -> None:
        socks: list[socket.socket] = []
        try:
            for fd in (client_fd, sandbox_fd):
                socks.append(socket.socket(fileno=fd))
            for side, sock in ((pair.client, socks[0]), (pair.sandbox, socks[1])):
                sock.setblocking(False)
                await self.loop.connect_accepted_socket(lambda side=side: side, sock)  # type: ignore[misc]
        except (OSError, ValueError):
            for sock in socks:
                sock.close()
            for fd in (client_fd, sandbox_fd)[len(socks) :]:
                os.close(fd)
            pair.finish()

    def report(self, pair: _Pair) -> None:
        self.pairs.pop(pair.id, None)
        self.send(DONE + REPORT.pack(pair.id, pair.client.copied, pair.sandbox.copied))

    def send(self, message: bytes) -> None:
        self.outbox.append(message)
        self.flush()

    def flush(self) -> None:
        while self.outbox:
            try:
                self.control.send(self.outbox[0])
            except (BlockingIOError, InterruptedError):
                self.loop.add_writer(self.control.fileno(), self._writable)
                return
            except OSError:  # the server is gone
                self.outbox.clear()
                self.stop()
                return
            self.outbox.popleft()

    def _writable(self) -> None:
        self.loop.remove_writer(self.control.fileno())
        self.flush()

    def stop(self) -> None:
        for pair in list(self.pairs.values()):
            pair.done = True  # no reports: nobody is listening
            for side in (pair.client, pair.sandbox):
                if side.transport is not None:
                    side.transport.abort()
        self.pairs.clear()
        self.stopped.set()


async def serve(control_fd: int, most: int, server_pid: int) -> None:
    control = socket.socket(fileno=control_fd)
    control.setblocking(False)
    relay = Relay(control, most, server_pid)
    relay.start()
    await relay.stopped.wait()
    # Out at once: the connections are aborted already, and the loop's own clean-up (cancelling
    # tasks still attaching sockets) must not be able to keep an orphan relay alive.
    os._exit(0)


def main() -> None:
    args = sys.argv[1:]
    if len(args) not in (2, 3) or not all(a.isdigit() for a in args):
        sys.exit("usage: relay_worker.py CONTROL_FD MOST_CONNECTIONS [SERVER_PID] (0: no cap)")
    relay = serve(int(args[0]), int(args[1]), int(args[2]) if len(args) == 3 else 0)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(relay)
    else:
        uvloop.run(relay)


if __name__ == "__main__":
    main()
