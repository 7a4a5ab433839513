"""A small HTTP/1.1 client for the gateway's hop to a sandbox's agent.

Why not httpx here: on this hop every request pays the client's overhead, and the gateway's
budget for an exec round trip is about a millisecond. Measured on the reference machine,
``httpx.AsyncClient`` takes ~0.8-1.3 ms for a ``/health`` over a Unix socket where a plain
asyncio stream takes ~0.1 ms. The agent is ours and speaks plain HTTP/1.1, so the subset
needed is small: one request at a time per connection, ``Content-Length`` or chunked responses,
keep-alive, and a pool of idle connections per sandbox.

A connection whose response was not read to the end (client gone, error) is closed, never
reused -- closing it is also how the agent learns its client left and kills a streamed command.
A request is never retried once written, except idempotent ones on a reused connection that
died before answering (so ``/run`` never runs twice).

The agent runs inside the sandbox, so everything it sends is hostile input (root in a sandbox
can replace it): a head is at most :data:`MAX_HEAD` bytes with a well-formed status line, header
names and values (a bare CR or LF in a value would be a header injected into the client's
answer), a ``Content-Length`` that is a number and chunk sizes that are not negative; anything
else is an :class:`UpstreamError` (the gateway's 502). Bodies are streamed, so what they hold
is bounded by backpressure; the server's own calls read them with :meth:`UpstreamResponse.read`,
which stops at a limit (an endless ``/bound_ports`` answer once grew the server from 74 to
735 MiB). Proxied requests are not timed out here (``/run`` answers when its command ends,
streams last as long as they last): the client that waits decides; the server's own calls are
(:mod:`.agentcalls`).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sandlot.engines.base import AgentAddress

MAX_HEAD = 65536
#: Idle pooled connections older than this are dropped (the agent closes idle ones at 300 s).
IDLE_MAX = 60.0
POOL_MAX = 16
READ_CHUNK = 65536
_RETRYABLE = {"GET", "HEAD", "OPTIONS"}
#: What a header name and value may hold (RFC 9110 §5.1, §5.5; obsolete line folding refused).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class UpstreamError(Exception):
    """The agent could not be reached or broke the protocol."""


class BodyTooLarge(UpstreamError):
    """An answer the server reads whole was larger than it allows."""


class Connection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def usable(self) -> bool:
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and time.monotonic() - self.idle_since < IDLE_MAX
        )

    def close(self) -> None:
        self.writer.close()


@dataclass
class UpstreamResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    _pool: AgentPool
    _conn: Connection | None
    _length: int | None
    _chunked: bool
    _done: bool = False
    _closed: bool = field(default=False)
    #: Set as the last chunk of a body with a length is handed out (before the generator ends).
    last_chunk_out: bool = False

    async def iter_body(self) -> AsyncIterator[bytes]:
        """The decoded body, chunk by chunk as it arrives."""
        conn = self._conn
        assert conn is not None
        reader = conn.reader
        try:
            if self._chunked:
                while True:
                    line = await reader.readuntil(b"\r\n")
                    digits = line.split(b";", 1)[0].strip()
                    if not digits or digits.strip(b"0123456789abcdefABCDEF"):
                        raise UpstreamError("malformed chunk size from the agent")
                    size = int(digits, 16)
                    if size == 0:
                        # trailers (bounded like a head), then the blank line
                        trailers = 0
                        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                            trailers += len(line)
                            if trailers > MAX_HEAD:
                                raise UpstreamError("trailers from the agent too large")
                        break
                    remaining = size
                    while remaining:
                        data = await reader.read(min(remaining, READ_CHUNK))
                        if not data:
                            raise UpstreamError("agent closed the connection mid-response")
                        remaining -= len(data)
                        yield data
                    if await reader.readexactly(2) != b"\r\n":
                        raise UpstreamError("malformed chunked response from the agent")
            elif self._length is not None:
                remaining = self._length
                while remaining:
                    data = await reader.read(min(remaining, READ_CHUNK))
                    if not data:
                        raise UpstreamError("agent closed the connection mid-response")
                    remaining -= len(data)
                    self.last_chunk_out = not remaining
                    yield data
            else:
                while data := await reader.read(READ_CHUNK):
                    yield data
                self._length = -1  # read to EOF: not reusable
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise UpstreamError(f"broken response from the agent: {exc}") from exc
        except OSError as exc:
            raise UpstreamError(f"agent connection failed: {exc}") from exc
        self._done = True

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
        reusable = (
            self._done
            and self._length != -1
            and not any(k == b"connection" and v.lower() == b"close" for k, v in self.headers)
        )
        if reusable:
            self._pool.release(conn)
        else:
            conn.close()


def _salvage(conn: Connection) -> bytes | None:
    """After a failed send, asyncio's reader refuses to read even what the agent answered
    before closing (an early 401 or 413). Take that answer from the reader's buffer (a private
    attribute, hence the care) and give the connection a fresh reader holding the rest."""
    buffered = getattr(conn.reader, "_buffer", None)
    if not isinstance(buffered, bytearray):
        return None
    data = bytes(buffered)
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    rest = asyncio.StreamReader(limit=MAX_HEAD)
    rest.feed_data(data[end + 4 :])
    rest.feed_eof()
    conn.reader = rest
    return data[: end + 4]


class AgentPool:
    """Idle keep-alive connections to one agent."""

    def __init__(self, address: AgentAddress, secret: bytes | None = None) -> None:
        self.address = address
        #: The sandbox's secret, for the gateway's own check (None: leave it to the agent).
        self.secret = secret
        self._idle: list[Connection] = []

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
        if len(self._idle) < POOL_MAX and conn.usable():
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    def _take_idle(self) -> Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn
            conn.close()
        return None

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes],
    ) -> UpstreamResponse:
        """Send a request and read the response head. ``headers`` must already carry the
        body's ``content-length`` when ``body`` is an iterator."""
        head = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
        if not any(k == b"host" for k, _ in headers):  # the ports gateway passes the client's
            head.append(b"host: agent\r\n")
        for k, v in headers:
            head.append(k + b": " + v + b"\r\n")
        if isinstance(body, bytes | bytearray):
            head.append(b"content-length: " + str(len(body)).encode() + b"\r\n")
        head.append(b"\r\n")
        raw_head = b"".join(head)
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
        writer = conn.writer
        try:
            if isinstance(body, bytes | bytearray):
                # One write for the common small request: one syscall, one packet.
                writer.write(raw_head + body if len(body) <= READ_CHUNK else raw_head)
                if len(body) > READ_CHUNK:
                    writer.write(body)
                await writer.drain()
            else:
                writer.write(raw_head)
                async for chunk in body:
                    writer.write(chunk)
                    await writer.drain()
                await writer.drain()
        except (OSError, RuntimeError) as exc:  # uvloop: RuntimeError on a closed transport
            # The agent may have answered early (401, 413...) and closed without reading the
            # whole body: its answer, if any, beats a generic 502.
            send_error: Exception | None = exc
        else:
            send_error = None
        try:
            head = await conn.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            early = _salvage(conn) if send_error is not None else None
            if early is None:
                reason = (
                    f"agent connection failed: {send_error}"
                    if send_error
                    else "the agent closed the connection"
                )
                raise UpstreamError(reason) from exc
            head = early
        except asyncio.LimitOverrunError as exc:
            raise UpstreamError("response head from the agent too large") from exc
        except OSError as exc:
            raise UpstreamError(f"agent connection failed: {exc}") from exc
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise UpstreamError(f"malformed status line from the agent: {lines[0][:80]!r}")
        status = int(parts[1])
        if not 100 <= status <= 599:
            raise UpstreamError(f"malformed status line from the agent: {lines[0][:80]!r}")
        headers: list[tuple[bytes, bytes]] = []
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            key = name.lower()
            value = value.strip(b" \t")
            if not sep or not _TOKEN.fullmatch(key) or _BAD_VALUE.search(value):
                raise UpstreamError("malformed header from the agent")
            if key == b"content-length":
                if not value.isdigit() or len(value) > 18 or length not in (None, int(value)):
                    raise UpstreamError("malformed content-length from the agent")
                length = int(value)
            elif key == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            headers.append((key, value))
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            length = 0
            chunked = False
        response = UpstreamResponse(status, headers, self, conn, length, chunked)
        if send_error is not None:
            # The request was not sent whole: this connection must not be reused.
            headers.append((b"connection", b"close"))
        if length == 0 and not chunked:
            response._done = True
        return response

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
