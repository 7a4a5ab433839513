"""A small HTTP/1.1 client for the gateway's hop to a sandbox's agent.

Why not httpx here: on this hop every request pays the client's overhead, and the gateway's
budget for an exec round trip is about a millisecond. Measured on the reference machine,
``httpx.AsyncClient`` takes ~0.8-1.3 ms for a ``/health`` over a Unix socket where a plain
asyncio stream takes ~0.1 ms. The agent is ours and speaks plain HTTP/1.1, so the subset needed
is small: one request at a time per connection, ``Content-Length`` or chunked responses,
keep-alive, and a pool of idle connections per sandbox.

A connection whose response was not read to the end (client gone, error) is closed, never reused
-- closing it is also how the agent learns its client left and kills a streamed command. A
request is never retried once written, except idempotent ones on a reused connection that died
before answering (so ``/run`` never runs twice).

The wire (writing requests, checking and parsing answers, pooling) is
:mod:`sandlot.http11client`, shared with the SDK's hop to the local server; this module is the
gateway's face of it. The agent runs inside the sandbox, so everything it sends is hostile input
(root in a sandbox can replace it): a head is at most :data:`MAX_HEAD` bytes with a well-formed
status line, header names and values (a bare CR or LF in a value would be a header injected into
the client's answer), a ``Content-Length`` that is a number and chunk sizes that are not
negative; anything else is an :class:`UpstreamError` (the gateway's 502). Bodies are streamed,
so what they hold is bounded by backpressure; the server's own calls read them with
:meth:`UpstreamResponse.read`, which stops at a limit (an endless ``/bound_ports`` answer once
grew the server from 74 to 735 MiB). Proxied requests are not timed out here (``/run`` answers
when its command ends, streams last as long as they last): the client that waits decides; the
server's own calls are (:mod:`.agentcalls`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from sandlot import http11client as wire
from sandlot.engines.base import AgentAddress
from sandlot.http11client import MAX_HEAD, READ_CHUNK

__all__ = [
    "IDLE_MAX",
    "MAX_HEAD",
    "POOL_MAX",
    "READ_CHUNK",
    "AgentPool",
    "BodyTooLarge",
    "Connection",
    "UpstreamError",
    "UpstreamResponse",
]

#: Idle pooled connections older than this are dropped (the agent closes idle ones at 300 s).
IDLE_MAX = 60.0
POOL_MAX = 16
_RETRYABLE = {"GET", "HEAD", "OPTIONS"}

#: One connection to an agent (or, for the ports gateway, a tunnel through it).
Connection = wire.Connection


#: The agent could not be reached or broke the protocol. The wire's own error class (not a
#: subclass): what the wire raises mid-body reaches the gateway's ``except UpstreamError`` as
#: it is, with no wrapper generator per piece of body (that wrapper cost ~6 us per exec).
UpstreamError = wire.PeerError


class BodyTooLarge(UpstreamError):
    """An answer the server reads whole was larger than it allows."""


class UpstreamResponse:
    """An agent's answer: ``status``, ``headers``, then its body through :meth:`iter_body`
    (or :meth:`read`); :meth:`close` gives the connection back or closes it."""

    __slots__ = (
        "_chunked",
        "_closed",
        "_conn",
        "_keep_alive",
        "_length",
        "_pool",
        "_progress",
        "headers",
        "status",
    )

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        pool: AgentPool,
        conn: Connection,
        length: int | None,
        chunked: bool,
        keep_alive: bool,
    ) -> None:
        self.status = status
        self.headers = headers
        self._pool = pool
        self._conn: Connection | None = conn
        self._length = length
        self._chunked = chunked
        #: False once the answer said ``connection: close``, runs to the connection's end,
        #: or the request was not sent whole.
        self._keep_alive = keep_alive
        self._closed = False
        self._progress = wire.BodyProgress(None if chunked else length)

    @property
    def last_chunk_out(self) -> bool:
        """True once the last piece of a body with a length was handed out (before the
        iterator ends): the gateway sends it flagged as the last."""
        return self._progress.left == 0 and self._length is not None

    def iter_body(self) -> AsyncIterator[bytes]:
        """The decoded body, chunk by chunk as it arrives (:class:`UpstreamError` if the
        agent breaks it off or breaks the protocol)."""
        conn = self._conn
        assert conn is not None
        return wire.iter_body(conn.reader, self._length, self._chunked, self._progress)

    async def read(self, limit: int) -> bytes:
        """The whole body, for the server's own calls: :class:`BodyTooLarge` past ``limit``
        bytes (nothing more is read; the connection is then closed, not reused)."""
        if self._length is not None and self._length > limit:
            raise BodyTooLarge(f"the agent's answer is {self._length} bytes (limit {limit})")
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_body():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the agent's answer is over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Give the connection back if the response was read to its end; else close it."""
        if self._closed:
            return
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._progress.done and self._keep_alive:
            self._pool.release(conn)
        else:
            conn.close()


class AgentPool:
    """Idle keep-alive connections to one agent."""

    def __init__(self, address: AgentAddress, secret: bytes | None = None) -> None:
        self.address = address
        #: The sandbox's secret, for the gateway's own check (None: leave it to the agent).
        self.secret = secret
        self._idle = wire.IdlePool(POOL_MAX, IDLE_MAX)

    async def _connect(self) -> Connection:
        try:
            if self.address.unix_path is not None:
                reader, writer = await asyncio.open_unix_connection(
                    self.address.unix_path, limit=MAX_HEAD
                )
            else:
                reader, writer = await asyncio.open_connection(
                    self.address.host, self.address.port, limit=MAX_HEAD
                )
        except OSError as exc:
            raise UpstreamError(exc.strerror or str(exc) or type(exc).__name__) from exc
        return Connection(reader, writer)

    def release(self, conn: Connection) -> None:
        self._idle.release(conn)

    def _take_idle(self) -> Connection | None:
        return self._idle.take()

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes],
    ) -> UpstreamResponse:
        """Send a request and read the response head. ``headers`` must already carry the
        body's ``content-length`` when ``body`` is an iterator."""
        extra: list[tuple[bytes, bytes]] = []
        if not any(k == b"host" for k, _ in headers):  # the ports gateway passes the client's
            extra.append((b"host", b"agent"))
        if isinstance(body, bytes | bytearray):
            extra_len = [(b"content-length", str(len(body)).encode())]
        else:
            extra_len = []
        raw_head = wire.encode_head(method, target, [*extra, *headers, *extra_len])
        # A body iterator cannot be replayed: only requests with their body in hand retry.
        retries = 1 if method in _RETRYABLE and isinstance(body, bytes | bytearray) else 0
        while True:
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                response = await self._exchange(conn, raw_head, body, method)
            except UpstreamError:
                conn.close()
                if reused and retries:
                    retries -= 1
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return response

    async def _exchange(
        self,
        conn: Connection,
        raw_head: bytes,
        body: bytes | AsyncIterator[bytes],
        method: str,
    ) -> UpstreamResponse:
        try:
            await wire.send_request(conn.writer, raw_head, body)
        except (OSError, RuntimeError) as exc:  # uvloop: RuntimeError on a closed transport
            # The agent may have answered early (401, 413...) and closed without reading the
            # whole body: its answer, if any, beats a generic 502.
            send_error: Exception | None = exc
        else:
            send_error = None
        try:
            head = await wire.read_head(conn.reader)
        except wire.IncompleteAnswer as exc:
            early = wire.salvage_early_answer(conn) if send_error is not None else None
            if early is None:
                reason = (
                    f"agent connection failed: {send_error}"
                    if send_error
                    else "the agent closed the connection"
                )
                raise UpstreamError(reason) from exc
            head = early
        except wire.ProtocolError as exc:
            raise UpstreamError(f"{exc} from the agent") from exc
        except OSError as exc:
            raise UpstreamError(f"agent connection failed: {exc}") from exc
        try:
            parsed = wire.parse_head(head, method)
        except wire.ProtocolError as exc:
            raise UpstreamError(f"{exc} from the agent") from exc
        if send_error is not None:
            # The request was not sent whole: this connection must not be reused.
            parsed.headers.append((b"connection", b"close"))
        return UpstreamResponse(
            parsed.status,
            parsed.headers,
            self,
            conn,
            parsed.length,
            parsed.chunked,
            keep_alive=parsed.keep_alive and send_error is None,
        )

    def close(self) -> None:
        self._idle.close()
