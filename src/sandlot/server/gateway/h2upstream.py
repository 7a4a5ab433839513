"""HTTP/2 with prior knowledge (h2c) from the ports gateway to a sandbox's port, for sandboxes
created with ``exposed_port_protocol="http2"``.

Why a second upstream client: an h2c server (gRPC, a Go or Rust service) may not speak HTTP/1.1
at all, and HTTP/1.1 cannot carry what gRPC needs (trailers, full-duplex streams). One HTTP/2
connection per (sandbox, port) carries every request to that port as a stream, so the sandbox's
server sees one tunnel however many clients there are.

Flow control is HTTP/2's own, in both directions: a request body is sent only as fast as the
sandbox's server opens its windows, and a response's DATA is acknowledged (its window reopened)
only once the gateway's client has taken it, so a slow client slows the sandbox's server down
instead of filling the gateway's memory. A stream given up by the gateway's client is reset
(``RST_STREAM CANCEL``); the sandbox's server sees that.

A connection that is lost, or that the server ends with ``GOAWAY``, fails its in-flight responses
(the library this is built on, ``h2``, closes the whole connection on ``GOAWAY``), and the next
request opens a new one: an error there is the client's 502.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings

from sandlot.engines.base import AgentAddress
from sandlot.server.gateway.tunnel import open_tunnel_socket
from sandlot.server.h2limits import FrameMeter, H2Limits
from sandlot.server.upstream import UpstreamError

#: What each stream may have in flight towards the gateway before the gateway's client reads
#: it (HTTP/2's default, 64 KiB, caps a stream at ~64 KiB per round trip: too little for large
#: downloads even over a Unix socket).
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
READ_CHUNK = 65536
#: Connection-specific headers HTTP/2 forbids (RFC 9113 8.2.2); ``te`` only as ``trailers``.
_HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"upgrade",
    b"host",
}


class Unprocessed(UpstreamError):
    """The sandbox's server did not process the request (a GOAWAY below its stream id, or
    ``REFUSED_STREAM``): it may be sent again on a new connection."""


class _Stream:
    """One request's state, fed by the connection's reader."""

    __slots__ = ("chunks", "ended", "error", "head", "trailers")

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.head: asyncio.Future[list[tuple[bytes, bytes]]] = loop.create_future()
        #: DATA as (bytes, flow-controlled length); None once the stream ended.
        self.chunks: asyncio.Queue[tuple[bytes, int] | None] = asyncio.Queue()
        self.trailers: list[tuple[bytes, bytes]] = []
        self.error: str | None = None
        self.ended = False

    def fail(self, reason: str, unprocessed: bool = False) -> None:
        if self.ended or self.error is not None:
            return
        self.error = reason
        if not self.head.done():
            self.head.set_exception(Unprocessed(reason) if unprocessed else UpstreamError(reason))
        self.chunks.put_nowait(None)


@dataclass
class H2Response:
    """A response from the sandbox's server; the same surface as the HTTP/1.1 client's
    :class:`.upstream.UpstreamResponse`, plus ``trailers`` (known once the body is read)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    _conn: H2Upstream
    _stream_id: int
    _stream: _Stream
    _body_task: asyncio.Task[None] | None
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    _done: bool = False

    async def iter_body(self) -> AsyncIterator[bytes]:
        """The body as it arrives; each chunk's window is reopened as the caller takes it (so
        at most a window's worth waits here for a slow client)."""
        while True:
            item = await self._stream.chunks.get()
            if item is None:
                break
            data, flow = item
            # Before the yield: a caller that stops here must not keep the connection's
            # window shrunk forever.
            self._conn.acknowledge(self._stream_id, flow)
            if data:
                yield data
        if self._stream.error is not None:
            raise UpstreamError(self._stream.error)
        self.trailers = self._stream.trailers
        self._done = True

    def close(self) -> None:
        """Reset the stream unless the response was read to its end."""
        if self._body_task is not None:
            self._body_task.cancel()
        self._conn.finish(self._stream_id, reset=not self._done)


class H2Upstream:
    """One HTTP/2 connection to a port in a sandbox, multiplexing requests as streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        # In force from the first frame (a Settings changed later applies only once acked).
        self.h2.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 16,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.streams: dict[int, _Stream] = {}
        #: Why the connection cannot take new streams (lost, GOAWAY); None while it can.
        self.closed: str | None = None
        #: Replaced each time windows open (or a stream slot frees): waiters hold the old one.
        self._changed = asyncio.Event()
        #: The sandbox's server is as untrusted as any client: the same frame limits and budget.
        self._frames = FrameMeter(H2Limits())
        self._flush()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    # -- the connection's reader ------------------------------------------------------------

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _read(self) -> None:
        reason = "the sandbox's server closed the HTTP/2 connection"
        try:
            while data := await self.reader.read(READ_CHUNK):
                if not self._frames.fits(data, self.h2.max_inbound_frame_size):
                    if self._frames.abusive:
                        self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
                        reason = (
                            "the sandbox's server sent too many resets, PINGs or SETTINGS (HTTP/2)"
                        )
                    else:
                        self.h2.close_connection(ErrorCodes.FRAME_SIZE_ERROR)
                        reason = "the sandbox's server sent an oversized HTTP/2 frame"
                    self._flush()
                    break
                for event in self.h2.receive_data(data):
                    self._event(event)
                self._flush()
                if self.closed is not None:
                    reason = self.closed
                    break
        except H2Error as exc:
            self._flush()  # our GOAWAY
            reason = f"the sandbox's server broke the HTTP/2 protocol: {exc}"
        except (OSError, RuntimeError) as exc:
            reason = f"HTTP/2 connection to the sandbox failed: {exc}"
        finally:
            self._lost(reason)

    def _event(self, event: Event) -> None:
        if isinstance(event, ResponseReceived | TrailersReceived | DataReceived | StreamEnded):
            stream = self.streams.get(event.stream_id or 0)
            if stream is None:  # a stream we gave up: keep the connection's window open
                if isinstance(event, DataReceived) and event.flow_controlled_length:
                    self.acknowledge(event.stream_id or 0, event.flow_controlled_length)
                return
            if isinstance(event, ResponseReceived):
                if not stream.head.done():
                    stream.head.set_result([(bytes(k), bytes(v)) for k, v in event.headers or []])
            elif isinstance(event, TrailersReceived):
                stream.trailers = [(bytes(k), bytes(v)) for k, v in event.headers or []]
            elif isinstance(event, DataReceived):
                stream.chunks.put_nowait((event.data or b"", event.flow_controlled_length or 0))
            else:
                stream.ended = True
                stream.chunks.put_nowait(None)
                self._frames.bucket.earn()  # a response whole: a reset now and then is fine
        elif isinstance(event, StreamReset):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                code = event.error_code
                stream.fail(
                    f"the sandbox's server reset the stream ({_code_name(code)})",
                    unprocessed=code == ErrorCodes.REFUSED_STREAM,
                )
            self._wake()
        elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
            self._wake()
        elif isinstance(event, ConnectionTerminated):
            self.closed = (
                f"the sandbox's server ended the HTTP/2 connection (GOAWAY "
                f"{_code_name(event.error_code)})"
            )
            last = event.last_stream_id or 0
            for stream_id, stream in self.streams.items():
                if stream_id > last:
                    stream.fail(self.closed, unprocessed=True)

    def _lost(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
        for stream in self.streams.values():
            stream.fail(reason)
        self.writer.close()
        self._wake()

    # -- requests ---------------------------------------------------------------------------

    def acknowledge(self, stream_id: int, size: int) -> None:
        if size and self.closed is None:
            with contextlib.suppress(H2Error):
                self.h2.acknowledge_received_data(size, stream_id)
                self._flush()

    def finish(self, stream_id: int, reset: bool) -> None:
        """Forget a stream; reset it if it is still open (the gateway's client gave up)."""
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        # DATA nobody will read still counts against the connection's window: give it back.
        while not stream.chunks.empty():
            item = stream.chunks.get_nowait()
            if item is not None:
                self.acknowledge(stream_id, item[1])
        if reset and self.closed is None:
            with contextlib.suppress(H2Error):
                self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
                self._flush()
        self._wake()  # a stream slot is free

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes],
    ) -> H2Response:
        """Open a stream, send the request (a body iterator is sent alongside, under flow
        control) and wait for the response head."""
        while self.h2.open_outbound_streams >= self.h2.remote_settings.max_concurrent_streams:
            await self._wait_change()
        authority = next((v for k, v in headers if k == b"host"), b"sandbox")
        out = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", target.encode("latin-1")),
        ]
        out += [(k, v) for k, v in headers if k not in _HOP_BY_HOP and not k.startswith(b":")]
        if self.closed is not None:
            raise UpstreamError(self.closed)
        stream_id = self.h2.get_next_available_stream_id()
        stream = _Stream()
        self.streams[stream_id] = stream
        empty = isinstance(body, bytes | bytearray) and not body
        try:
            self.h2.send_headers(stream_id, out, end_stream=empty)
        except H2Error as exc:
            self.streams.pop(stream_id, None)
            raise UpstreamError(f"request not sendable over HTTP/2: {exc}") from exc
        self._flush()
        body_task: asyncio.Task[None] | None = None
        try:
            if isinstance(body, bytes | bytearray):
                if body:
                    await self._send_body(stream_id, stream, _one(bytes(body)))
            else:
                body_task = asyncio.ensure_future(self._send_body(stream_id, stream, body))
                body_task.add_done_callback(_retrieve)
                waiting: set[asyncio.Future[Any]] = {body_task, stream.head}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if body_task.done() and body_task.exception() is not None:
                    body_task.result()  # the client left while uploading (ClientGone)...
            head = await stream.head
        except BaseException:
            if body_task is not None:
                body_task.cancel()
            self.finish(stream_id, reset=True)
            raise
        status = next((v for k, v in head if k == b":status"), b"")
        if not status.isdigit():
            self.finish(stream_id, reset=True)
            raise UpstreamError(f"the sandbox's server sent no valid :status ({status!r})")
        rest = [(bytes(k), bytes(v)) for k, v in head if not k.startswith(b":")]
        return H2Response(int(status), rest, self, stream_id, stream, body_task)

    async def _wait_change(self) -> None:
        if self.closed is not None:
            raise UpstreamError(self.closed)
        await self._changed.wait()

    async def _send_body(self, stream_id: int, stream: _Stream, body: AsyncIterator[bytes]) -> None:
        """DATA frames as windows allow, then END_STREAM. ``drain`` after each frame: the
        socket's buffer is the second brake, after HTTP/2's windows."""
        async for chunk in body:
            view = memoryview(chunk)
            while view:
                if stream.error is not None:
                    raise UpstreamError(stream.error)
                try:
                    window = min(
                        self.h2.local_flow_control_window(stream_id),
                        self.h2.max_outbound_frame_size,
                    )
                except H2Error:  # the stream was closed by the server: it has answered
                    return
                if window <= 0:
                    await self._wait_change()
                    continue
                self.h2.send_data(stream_id, view[:window].tobytes())
                self._flush()
                view = view[window:]
                await self.writer.drain()
        with contextlib.suppress(H2Error):  # the server may have answered and closed already
            self.h2.end_stream(stream_id)
            self._flush()

    def close(self) -> None:
        if self.closed is None:
            with contextlib.suppress(H2Error):
                self.h2.close_connection()
                self._flush()
        self._lost("the gateway closed the HTTP/2 connection")
        self._reader.cancel()


def _retrieve(task: asyncio.Task[None]) -> None:
    """An upload that fails after the response began is the response's problem (the client
    left, or the stream was reset): its exception is expected, not worth a warning."""
    if not task.cancelled():
        task.exception()


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _code_name(code: object) -> str:
    return code.name if isinstance(code, ErrorCodes) else str(code)


class H2PortPool:
    """The HTTP/2 connection to one port of one sandbox, reopened when it was lost. The same
    ``request``/``close`` surface as the HTTP/1.1 pool (:class:`.ports._PortPool`)."""

    def __init__(self, address: AgentAddress, secret: bytes | None, port: int) -> None:
        self.address = address
        self.secret = secret
        self.port = port
        self._conn: H2Upstream | None = None
        self._connecting = asyncio.Lock()

    async def _connection(self) -> H2Upstream:
        async with self._connecting:
            if self._conn is None or self._conn.closed is not None:
                sock = await open_tunnel_socket(self.address, self.secret, self.port)
                try:
                    if sock.family == socket.AF_UNIX:
                        reader, writer = await asyncio.open_unix_connection(sock=sock)
                    else:
                        reader, writer = await asyncio.open_connection(sock=sock)
                except BaseException:
                    sock.close()
                    raise
                self._conn = H2Upstream(reader, writer)
            return self._conn

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes],
    ) -> H2Response:
        conn = await self._connection()
        try:
            return await conn.request(method, target, headers, body)
        except Unprocessed:
            # Never seen by the server (e.g. it closed an idle connection as this request
            # went out): once more on a new connection, if the body is still in hand.
            if not isinstance(body, bytes | bytearray):
                raise
            conn = await self._connection()
            return await conn.request(method, target, headers, body)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
