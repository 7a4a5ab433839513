"""The TCP proxy (``enable_tcp_proxy``): a listener per sandbox on the server's host
(``--tcp-proxy-host``, 127.0.0.1 by default; the port is chosen by the system) relaying raw TCP
to the port bound with ``/bind_port``, as Koyeb's does. With several bound ports the first one
bound (the agent's ``GET /bound_ports`` order) is the target; each new connection reads it again.
Once through, both sockets go to a relay process (:mod:`..relay`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from sandlot.server.config import PortLimits
from sandlot.server.control.lifecycle import Lifecycle
from sandlot.server.errors import ApiError, WakeError
from sandlot.server.gateway.ports.registry import PortRegistry
from sandlot.server.gateway.relay import RelayError, Relays
from sandlot.server.gateway.tunnel import TunnelError, open_tunnel_socket, wait_readable

log = logging.getLogger("sandlot.ports")


def _close_gently(conn: socket.socket) -> None:
    """Close with a FIN, not a reset: what the client already sent is read and dropped first
    (closing a socket with unread data makes the kernel answer RST)."""
    if conn.fileno() < 0:
        return
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        while conn.recv(65536):
            pass
    conn.close()


class _HangupWatch:
    """Call ``on_gone`` once the client closes its side or the connection fails; nothing it
    sent is consumed, and a client that speaks first is there (the watch then ends).

    It runs as the event loop's reader callback, not as a task, so that :meth:`stop` takes the
    reader off at once and the socket can be closed or handed on right after. A task waiting
    for readability takes its reader off only when it next runs; a socket closed before that
    leaves a stale selector entry under its descriptor's number, and the next socket given that
    number (a new TCP proxy listener) registers into the stale entry without reaching epoll:
    its readiness is never seen and its connections wait in the backlog for ever."""

    def __init__(self, conn: socket.socket, on_gone: Callable[[], None]) -> None:
        self._conn = conn
        self._on_gone = on_gone
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = conn.fileno()
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            spoke = bool(self._conn.recv(1, socket.MSG_PEEK))
        except BlockingIOError:
            return
        except OSError:
            spoke = False
        self.stop()
        if not spoke:
            self._on_gone()

    def stop(self) -> None:
        """Stop watching (idempotent); call it before the socket is closed or handed on."""
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None


@dataclass
class _TcpProxy:
    listener: socket.socket
    accepting: asyncio.Task[None]


class TcpProxies:
    """The TCP proxies' listeners, by sandbox, and their connections."""

    def __init__(
        self,
        host: str,
        limits: PortLimits,
        registry: PortRegistry,
        lifecycle: Lifecycle,
        relays: Relays,
    ) -> None:
        self.host = host
        self.limits = limits
        self.registry = registry
        self.lifecycle = lifecycle
        self.relays = relays
        self._proxies: dict[str, _TcpProxy] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: TCP proxy connections open per sandbox.
        self._open: dict[str, int] = {}

    async def ensure(self, sandbox_id: str) -> socket.socket:
        """The sandbox's TCP proxy listener (made if it is not there yet)."""
        lock = self._locks.setdefault(sandbox_id, asyncio.Lock())
        async with lock:
            proxy = self._proxies.get(sandbox_id)
            if proxy is not None:
                return proxy.listener
            listener = socket.create_server((self.host, 0), backlog=512)
            listener.setblocking(False)
            accepting = asyncio.get_running_loop().create_task(
                self._accept_tcp(sandbox_id, listener)
            )
            # closed once the task is over, so never while its reader is registered
            accepting.add_done_callback(lambda _: listener.close())
            self._proxies[sandbox_id] = _TcpProxy(listener, accepting)
            log.info("TCP proxy of sandbox %s on %s", sandbox_id, listener.getsockname()[:2])
            return listener

    async def _accept_tcp(self, sandbox_id: str, listener: socket.socket) -> None:
        """Accept by hand rather than with ``asyncio.start_server``: nothing of a connection is
        read here, so the whole stream goes to the relay untouched. Not with
        ``loop.sock_accept`` either: a cancelled one takes its reader off only later, by the
        descriptor's number, which by then may name the next listener (the listener is closed
        when this task is done, see :meth:`ensure`)."""
        while True:
            await wait_readable(listener)
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:  # EMFILE and the like: the listener stays, retry shortly
                log.warning("TCP proxy of %s: accept failed: %s", sandbox_id, exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = asyncio.get_running_loop().create_task(self._tcp_connection(sandbox_id, conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _tcp_connection(self, sandbox_id: str, conn: socket.socket) -> None:
        """One TCP proxy connection, if the sandbox has fewer than ``max_tcp_connections``
        open (else it is closed at once)."""
        open_now = self._open.get(sandbox_id, 0)
        if open_now >= self.limits.max_tcp_connections:
            log.info("TCP proxy of %s: %d connections open, the limit", sandbox_id, open_now)
            _close_gently(conn)
            return
        self._open[sandbox_id] = open_now + 1
        try:
            await self._tcp_relay(sandbox_id, conn)
        finally:
            left = self._open.pop(sandbox_id, 1) - 1
            if left:
                self._open[sandbox_id] = left

    async def _tcp_relay(self, sandbox_id: str, conn: socket.socket) -> None:
        """Reach the sandbox's port, then hand both sockets to a relay. Until the hand-over the
        client is watched: one that leaves (or a way in that takes longer than
        ``tcp_connect_timeout``: a frozen agent, a port whose backlog is full) ends the attempt
        and the socket is closed at once -- such connections used to wait, in CLOSE_WAIT, for
        as long as the sandbox did not answer."""
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.current_task()
        assert task is not None
        left = False

        def gone() -> None:
            nonlocal left
            left = True
            task.cancel()

        watch = _HangupWatch(conn, gone)
        try:
            async with (
                asyncio.timeout(self.limits.tcp_connect_timeout) as deadline,
                self.lifecycle.activity(sandbox_id),
            ):
                agent = await self.registry.agent(sandbox_id)
                if agent is None:
                    return
                await self.registry.exposed(
                    sandbox_id
                )  # a new agent gets the stored ports bound again
                status, answer = await self.registry.agent_call(sandbox_id, "/bound_ports", None)
                if status != 200 or not answer.ports:
                    log.info("TCP proxy of %s: no port bound, connection closed", sandbox_id)
                    return
                port = answer.ports[0]
                upstream = await open_tunnel_socket(agent.address, agent.secret, port)
                watch.stop()
                deadline.reschedule(None)
                await self.relays.splice(conn, upstream, (sandbox_id, port))  # takes both
        except (TunnelError, ApiError, WakeError, RelayError, OSError) as exc:
            log.info("TCP proxy of %s: %s", sandbox_id, exc)
        except TimeoutError:
            log.info(
                "TCP proxy of %s: no way into the sandbox within %gs, connection closed",
                sandbox_id,
                self.limits.tcp_connect_timeout,
            )
        except asyncio.CancelledError:
            if not left or task.uncancel() > 0:
                raise
        finally:
            watch.stop()
            _close_gently(conn)

    async def close_one(self, sandbox_id: str) -> None:
        proxy = self._proxies.pop(sandbox_id, None)
        self._locks.pop(sandbox_id, None)
        if proxy is not None:
            proxy.accepting.cancel()  # which closes the listener (see ensure)

    async def keep(self, wanted: set[str]) -> None:
        """Listeners for exactly the sandboxes in ``wanted``."""
        for sandbox_id in list(self._proxies):
            if sandbox_id not in wanted:
                await self.close_one(sandbox_id)
        for sandbox_id in wanted - set(self._proxies):
            await self.ensure(sandbox_id)

    async def close(self) -> None:
        for sandbox_id in list(self._proxies):
            await self.close_one(sandbox_id)
        for task in list(self._tasks):
            task.cancel()
