"""Bounds on what one sandbox's exposed ports, and one API token, can make the server hold.

Ports:
Every HTTP request to an exposed port holds a connection into the sandbox (HTTP/1.1: a tunnel
each; an http2 port: a stream of its one connection) for as long as it is in flight. Before
these bounds, nothing limited how many: one client resetting 40,000 HTTP/2 streams opened a
connection into the sandbox for each, and many clients (or many connections) could still hold
thousands. Now each (sandbox, port) admits :attr:`PortLimits.max_requests` requests at once,
keeps up to :attr:`PortLimits.max_queued` more waiting (first come, first served) for at most
:attr:`PortLimits.queue_timeout` seconds, and answers the rest ``503 port_busy`` at once. WebSockets
and TCP proxy connections are not counted here: once open they belong to relay processes
(:mod:`.relay`), whose own capacity bounds them; a sandbox's TCP proxy connections are capped on
their own (:attr:`PortLimits.max_tcp_connections`), so one sandbox cannot take that capacity.

Tokens: one API token may have at most :data:`TOKEN_REQUESTS` requests in flight at once, over
all its connections (HTTP/2 bounds each connection to 128 streams, but not how many connections
a token opens); one more is ``429 too_many_requests`` at once. The limit is generous (an agent
platform streaming from hundreds of sandboxes at once holds one request each); it is there so
that one token cannot hold the server's memory and tasks without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import AsyncIterator

from starlette.types import ASGIApp, Receive, Scope, Send

from sandlot.server.gateway.asgi import refuse_websocket, send_json


class Busy(Exception):
    """No slot: the queue is full, or the wait timed out."""


class Admission:
    """At most ``limit`` holders at once, ``queue`` more waiting in order (see the module)."""

    def __init__(self, limit: int, queue: int, timeout: float) -> None:
        self.limit = limit
        self.queue = queue
        self.timeout = timeout
        self.held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.held < self.limit and not self._waiters:
            self.held += 1
            return
        if len(self._waiters) >= self.queue:
            raise Busy(f"{self.held} requests in flight and {len(self._waiters)} waiting")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot as we gave up: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise Busy(
                    f"{self.held} requests in flight; waited {self.timeout:g}s for one to end"
                ) from None
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: held stays the same
                return
        self.held -= 1


class TokenRequestLimit:
    """ASGI middleware: at most ``limit`` requests in flight per API token (see the module).
    Tokens are told apart by a digest, so none is kept in memory longer than its requests."""

    def __init__(self, app: ASGIApp, limit: int, prefix: str) -> None:
        self.app = app
        self.limit = limit
        self.prefix = b"bearer " + prefix.encode()
        self.held: dict[bytes, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self._key(scope) if scope["type"] in ("http", "websocket") else None
        if key is None:
            await self.app(scope, receive, send)
            return
        count = self.held.get(key, 0)
        if count >= self.limit:
            await self._refuse(scope, send)
            return
        self.held[key] = count + 1
        try:
            await self.app(scope, receive, send)
        finally:
            left = self.held[key] - 1
            if left:
                self.held[key] = left
            else:
                del self.held[key]

    def _key(self, scope: Scope) -> bytes | None:
        for name, value in scope["headers"]:
            if name == b"authorization" and value[: len(self.prefix)].lower() == self.prefix:
                return hashlib.blake2b(bytes(value[7:]).strip(), digest_size=16).digest()
        return None

    async def _refuse(self, scope: Scope, send: Send) -> None:
        body = {
            "error": f"this API token already has {self.limit} requests in flight, the limit "
            f"(sandlot server --max-requests-per-token)",
            "code": "too_many_requests",
        }
        if scope["type"] == "websocket":
            await refuse_websocket(scope, send, 429, body)
        else:
            await send_json(send, 429, body)
