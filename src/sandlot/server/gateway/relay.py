"""Hand long-lived byte streams to relay processes (:mod:`.relay_worker`).

A WebSocket or h2c connection to an exposed port, or a TCP proxy connection, is -- once its
handshake has gone through the gateway -- nothing but bytes both ways for as long as it stays
open, often hours and mostly idle. Kept in the gateway, each would hold two descriptors and a
share of the one event loop that also answers the control API. :meth:`Relays.splice` sends both
sockets to a relay process instead and waits there, holding nothing but a future, until that
process reports the pair done.

Why processes: RLIMIT_NOFILE is per process, and a server cannot always raise it (no
CAP_SYS_RESOURCE: on the machines sandlot is developed on the hard limit is 20,000, which 10,000
WebSockets at two descriptors each already exceed); a relay that is full makes the next one
start. They also put the copying on other cores.

A relay that dies ends its connections (their waiters get :class:`RelayError`); the next splice
starts a new one. Relays end with the server: at :meth:`Relays.close`, and on their own when the
control socket reaches EOF, which a SIGKILLed server also causes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

from sandlot.server.gateway.relay_worker import ADD, CLOSE, DONE, HELLO, ID, REPORT

log = logging.getLogger("sandlot.relay")

WORKER = Path(__file__).with_name("relay_worker.py")
START_TIMEOUT = 10.0


class RelayError(Exception):
    """A relay process could not be started, or died with connections in it."""


@dataclass(frozen=True)
class Spliced:
    """What a relayed connection carried, reported when it ended."""

    client_to_sandbox: int
    sandbox_to_client: int


@dataclass(eq=False)
class _Worker:
    process: subprocess.Popen[bytes]
    control: socket.socket
    capacity: int = 0
    waiting: dict[int, asyncio.Future[Spliced]] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    dead: bool = False

    @property
    def free(self) -> int:
        return self.capacity - len(self.waiting)


class Relays:
    """The gateway's relay processes, started on demand (up to ``max_workers``)."""

    def __init__(self, max_workers: int = 16, connections_per_worker: int | None = None) -> None:
        self.max_workers = max_workers
        #: At most this many connections per relay (default: what its descriptor limit allows).
        self.connections_per_worker = connections_per_worker
        self._workers: list[_Worker] = []
        self._ids = itertools.count(1)
        self._starting: asyncio.Lock | None = None
        self._closed = False
        self._tagged: dict[Hashable, dict[int, _Worker]] = {}

    @property
    def open_connections(self) -> int:
        return sum(len(w.waiting) for w in self._workers)

    @property
    def processes(self) -> int:
        return len(self._workers)

    async def warm_up(self) -> None:
        """Start the first relay ahead of the first connection (~50 ms of Python start)."""
        with contextlib.suppress(RelayError):
            await self.ready()

    async def ready(self) -> None:
        """Make sure a relay can take one more connection (starting one if needed); raises
        :class:`RelayError` otherwise -- so a caller can refuse cleanly before it has done
        anything it cannot take back (answered an upgrade, handed a socket over)."""
        await self._worker()

    async def splice(
        self, client: socket.socket, sandbox: socket.socket, tag: Hashable = None
    ) -> Spliced:
        """Relay ``client`` ↔ ``sandbox`` until both directions have ended. Both sockets are
        handed over (closed here, whatever happens); cancelling closes the pair, and so does
        :meth:`close_tagged` with the ``tag`` given here (e.g. ``(sandbox_id, port)``)."""
        try:
            worker = await self._worker()
            pair_id = next(self._ids)
            done: asyncio.Future[Spliced] = asyncio.get_running_loop().create_future()
            worker.waiting[pair_id] = done
            try:
                await _send(
                    worker.control, ADD + ID.pack(pair_id), [client.fileno(), sandbox.fileno()]
                )
            except OSError as exc:
                worker.waiting.pop(pair_id, None)
                raise RelayError(f"cannot hand the connection to the relay: {exc}") from exc
            if tag is not None and not done.done():  # after the ADD: a CLOSE never overtakes it
                self._tagged.setdefault(tag, {})[pair_id] = worker
                done.add_done_callback(lambda _: self._untag(tag, pair_id))
        finally:
            client.close()
            sandbox.close()
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if not worker.dead and not done.done():
                with contextlib.suppress(OSError):
                    worker.control.send(CLOSE + ID.pack(pair_id))
            raise

    def close_tagged(self, tag: Hashable) -> int:
        """Close every relayed connection spliced with ``tag`` (a port was unexposed: its open
        WebSockets and TCP proxy connections end too). Returns how many were asked to close."""
        pairs = self._tagged.get(tag, {})
        for pair_id, worker in list(pairs.items()):
            if not worker.dead:
                with contextlib.suppress(OSError):
                    worker.control.send(CLOSE + ID.pack(pair_id))
        return len(pairs)

    def _untag(self, tag: Hashable, pair_id: int) -> None:
        pairs = self._tagged.get(tag)
        if pairs is not None:
            pairs.pop(pair_id, None)
            if not pairs:
                del self._tagged[tag]

    async def _worker(self) -> _Worker:
        if self._closed:
            raise RelayError("the server is shutting down")
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            live = [w for w in self._workers if not w.dead and w.free > 0]
            if live:
                return max(live, key=lambda w: w.free)
            if len(self._workers) >= self.max_workers:
                raise RelayError(
                    f"all {self.max_workers} relay processes are full "
                    f"({self.open_connections} connections)"
                )
            worker = await self._start()
            self._workers.append(worker)
            return worker

    async def _start(self) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = await asyncio.to_thread(
                subprocess.Popen,
                [
                    sys.executable,
                    "-P",
                    str(WORKER),
                    str(theirs.fileno()),
                    str(self.connections_per_worker or 0),
                    str(os.getpid()),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            raise RelayError(f"cannot start a relay process: {exc}") from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        worker = _Worker(process, ours)
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_control, worker)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await worker.ready.wait()
        except TimeoutError:
            self._lost(worker)
            raise RelayError("a relay process did not start") from None
        if worker.dead:
            raise RelayError("a relay process exited at start")
        log.info("relay process %d holds up to %d connections", process.pid, worker.capacity)
        return worker

    def _on_control(self, worker: _Worker) -> None:
        while True:
            try:
                data = worker.control.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._lost(worker)
                return
            kind, body = data[:1], data[1:]
            if kind == DONE and len(body) == REPORT.size:
                pair_id, up, down = REPORT.unpack(body)
                done = worker.waiting.pop(pair_id, None)
                if done is not None and not done.done():
                    done.set_result(Spliced(up, down))
            elif kind == HELLO and len(body) == ID.size:
                worker.capacity = ID.unpack(body)[0]
                worker.ready.set()

    def _lost(self, worker: _Worker) -> None:
        """The relay is gone (or given up on): its connections are over."""
        if worker.dead:
            return
        worker.dead = True
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(worker.control.fileno())
        worker.control.close()
        worker.ready.set()
        if worker in self._workers:
            self._workers.remove(worker)
        for done in worker.waiting.values():
            if not done.done():
                done.set_exception(RelayError("the relay process ended"))
        if worker.waiting and not self._closed:
            log.warning(
                "relay process %d ended with %d connections",
                worker.process.pid,
                len(worker.waiting),
            )
        worker.waiting.clear()
        with contextlib.suppress(OSError):
            worker.process.kill()
        with contextlib.suppress(RuntimeError):  # reaped in a thread (the executor may be gone)
            asyncio.get_running_loop().run_in_executor(None, worker.process.wait)

    async def close(self) -> None:
        """End every relay and so every relayed connection."""
        self._closed = True
        for worker in list(self._workers):
            self._lost(worker)


async def _send(sock: socket.socket, message: bytes, fds: list[int]) -> None:
    """One control packet with descriptors attached (waits while the socket is full)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            socket.send_fds(sock, [message], fds)
            return
        except (BlockingIOError, InterruptedError):
            writable = loop.create_future()
            loop.add_writer(sock.fileno(), writable.set_result, None)
            try:
                await writable
            finally:
                loop.remove_writer(sock.fileno())


__all__ = ["RelayError", "Relays", "Spliced"]
