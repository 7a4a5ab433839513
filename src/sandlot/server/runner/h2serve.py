"""HTTP/2 clients with prior knowledge (h2c: ``PRI * HTTP/2.0`` as a connection's first bytes,
what gRPC and ``curl --http2-prior-knowledge`` send) served by ``sandlot server``.

uvicorn speaks HTTP/1.1 only. :func:`.protocols.ports_http_protocol`'s protocol sees the preface and
hands the connection to :class:`H2ServerProtocol`, which serves the whole ASGI app -- control API
and exposed ports alike -- one ASGI ``http`` cycle per stream:

- scope: ``http_version "2"``, the ``:authority`` as the ``host`` header (so the host form of
  exposed ports routes as over HTTP/1.1), the ``http.response.trailers`` extension advertised
  (the ports gateway then passes an HTTP/2 port's trailers on: gRPC end to end);
- bodies both ways under HTTP/2 flow control: a request body's window is reopened only when the
  app has received the data, a response is sent only as fast as the client's windows and the
  socket's buffer allow (the app's ``send`` waits);
- ``http.disconnect`` when the client resets the stream or the connection is lost;
- limits (:class:`.h2limits.H2Limits`, ``sandlot server --h2-*``): at most ``max_streams``
  concurrent streams and as many request handlers running (a stream the client resets has its
  handler cancelled at once, and one reset before its handler started never gets one: a reset
  flood costs no requests' work; new streams wait while reset ones' handlers end),
  :data:`MAX_HEADER_LIST` bytes of headers per request, a budget of cheap frames (resets,
  ``PING``, ``SETTINGS``...), and nothing more read from a client that does not read its
  answers. A client breaking them gets ``GOAWAY ENHANCE_YOUR_CALM`` (a protocol error, the
  matching ``GOAWAY``) and the connection is closed; an idle connection is closed after
  uvicorn's keep-alive timeout;
- graceful shutdown: a ``GOAWAY`` that lets the streams already open finish, then the close.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, cast
from urllib.parse import unquote

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame
from starlette.types import Message

from sandlot.server.h2limits import FrameMeter, H2Limits

log = logging.getLogger("sandlot.h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_STREAMS = H2Limits.max_streams
MAX_HEADER_LIST = 65536
#: Receive windows: how much request body may wait for the app, per stream and per connection.
#: This is what a client can make the server hold (HTTP/1.1 under uvicorn: 64 KiB per
#: connection), so it is kept small; 256 KiB per round trip still moves hundreds of MB/s on a
#: local network.
STREAM_WINDOW = 256 << 10
CONNECTION_WINDOW = 1 << 20
#: A response's frames are written to the socket at least every this many bytes.
WRITE_BATCH = 65536
#: After our GOAWAY, how long the client's last bytes are read and dropped before the close (a
#: close with unread data sends a TCP reset, which can destroy the GOAWAY before it is read).
LINGER = 2.0
#: Response headers HTTP/2 forbids (RFC 9113 8.2.2); an app written for HTTP/1.1 may set them.
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}


class _Stream:
    """One request/response cycle."""

    def __init__(self, stream_id: int, scope: dict[str, Any]) -> None:
        self.id = stream_id
        self.scope = scope
        #: Request DATA not yet received by the app: (bytes, flow-controlled length).
        self.body: list[tuple[bytes, int]] = []
        self.body_ended = False
        self.body_delivered = False
        self.disconnected = False
        self.changed = asyncio.Event()
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.started = False  # http.response.start received
        self.headers_sent = False
        self.body_done = False  # the last http.response.body received
        self.trailers = False
        self.complete = False
        self.task: asyncio.Task[None] | None = None
        #: receive() calls waiting: an app listening for http.disconnect gets it instead of
        #: being cancelled.
        self.listening = 0

    def wake(self) -> None:
        self.changed.set()


class H2ServerProtocol(asyncio.Protocol):
    """An h2c connection: the ASGI app per stream (see the module's docstring)."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        transport: asyncio.Transport,
    ) -> None:
        self.config = config
        self.app = config.loaded_app
        self.server_state = server_state
        self.app_state = app_state
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.limits = limits_of(config)
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.max_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.streams: dict[int, _Stream] = {}
        #: Streams received in the read being processed: their handlers start once all of the
        #: read's frames are in (a stream reset within the same read never gets one).
        self._new: list[_Stream] = []
        #: Streams waiting for a handler slot (see :class:`.h2limits.H2Limits`).
        self._queued: deque[_Stream] = deque()
        self._running = 0
        self._reading_paused = False
        self.closing = False  # shutting down: no new streams
        self.lost = False
        self.lingering = False  # GOAWAY sent: reading only to drop what arrives
        self._frames = FrameMeter(self.limits, skip=len(PREFACE))
        #: Replaced whenever send windows open or the socket drains: waiters hold the old one.
        self._writable = asyncio.Event()
        self._writable.set()
        self._paused = False
        self._idle: asyncio.TimerHandle | None = None
        self.server = _addr(transport.get_extra_info("sockname"))
        self.client = _addr(transport.get_extra_info("peername"))
        server_state.connections.add(self)
        self._flush()
        self._arm_idle()

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.lost or self.lingering:
            return
        if not self._frames.fits(data, self.h2.max_inbound_frame_size):
            if self._frames.abusive:
                log.info(
                    "HTTP/2 client %s spent its budget of cheap frames (resets, PING, "
                    "SETTINGS...): GOAWAY",
                    self.client,
                )
                self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)
            else:
                log.info("HTTP/2 client %s sent an oversized frame", self.client)
                self._goaway(ErrorCodes.FRAME_SIZE_ERROR)
            return
        try:
            events = self.h2.receive_data(data)
        except H2Error as exc:
            # h2 has queued a GOAWAY naming the error: send it, then close.
            log.info("HTTP/2 client %s broke the protocol: %s", self.client, exc)
            self._new.clear()
            self._flush()
            self._linger()
            return
        for event in events:
            self._event(event)
        self._start_new()
        self._flush()
        if (
            not self._reading_paused
            and self.transport.get_write_buffer_size() > self.limits.max_write_buffer
        ):
            # A client that makes us write (PING and SETTINGS answers...) without reading:
            # nothing more is read from it until it has read (resume_writing).
            self._reading_paused = True
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._reading_paused and not self.lost:
            self._reading_paused = False
            self.transport.resume_reading()
        self._wake_writers()

    def eof_received(self) -> bool | None:
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server_state.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self._queued.clear()
        for stream in list(self.streams.values()):
            self._stop(stream)
        self._wake_writers()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: a GOAWAY naming the last stream we will serve, those
        finish, then the connection closes. (The frame is written by hand: ``h2`` treats its own
        GOAWAY as the end of the connection, streams in flight included.)"""
        if self.closing or self.lingering:  # (lingering: our GOAWAY and EOF are out already)
            return
        self.closing = True
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = self.h2.highest_inbound_stream_id
        goaway.error_code = ErrorCodes.NO_ERROR
        if not self.transport.is_closing():
            self.transport.write(goaway.serialize())
        self._close_if_done()

    # -- events ----------------------------------------------------------------------------------

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing() and not self.lingering:  # no write after EOF
            self.transport.write(data)

    def _wake_writers(self) -> None:
        self._writable.set()
        self._writable = asyncio.Event()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if not self.streams and not self.lost:
            timeout = float(getattr(self.config, "timeout_keep_alive", 5) or 5)
            self._idle = self.loop.call_later(timeout, self._idle_close)

    def _idle_close(self) -> None:
        if not self.streams and not self.lost:
            self._goaway(ErrorCodes.NO_ERROR)

    def _goaway(self, code: ErrorCodes) -> None:
        try:
            self.h2.close_connection(code)
            self._flush()
        except H2Error:
            pass
        self._linger()

    def _linger(self) -> None:
        """Close after a GOAWAY: our side at once (EOF), the socket once the client closed its
        side or :data:`LINGER` passed, whichever comes first."""
        if self.lingering or self.transport.is_closing():
            return
        self.lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER, self.transport.close)
        else:
            self.transport.close()

    def _close_if_done(self) -> None:
        if self.closing and not self.streams and not self.lost:
            self._goaway(ErrorCodes.NO_ERROR)

    def _event(self, event: Event) -> None:
        if isinstance(event, RequestReceived):
            self._request(event)
        elif isinstance(event, DataReceived):
            sid = event.stream_id or 0
            stream = self.streams.get(sid)
            size = event.flow_controlled_length or 0
            if stream is None or stream.disconnected:
                self._acknowledge(sid, size)  # nobody will read it: keep the window open
            else:
                stream.body.append((event.data or b"", size))
                stream.wake()
        elif isinstance(event, StreamEnded):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.body_ended = True
                stream.wake()
        elif isinstance(event, StreamReset):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                self._stop(stream)
            self._wake_writers()
        elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
            self._wake_writers()
        elif isinstance(event, ConnectionTerminated):
            # The client said goodbye: h2 will not let us send anything more on this
            # connection, so the streams in flight are over too.
            self.transport.close()

    def _acknowledge(self, stream_id: int, size: int) -> None:
        if size and not self.lost:
            try:
                self.h2.acknowledge_received_data(size, stream_id)
            except H2Error:
                return
            self._flush()

    def _request(self, event: RequestReceived) -> None:
        sid = event.stream_id or 0
        if self.closing:
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        pseudo: dict[bytes, bytes] = {}
        headers: list[tuple[bytes, bytes]] = []
        cookies: list[bytes] = []
        for name, value in event.headers or []:
            k, v = bytes(name), bytes(value)
            if k.startswith(b":"):
                pseudo[k] = v
            elif k == b"cookie":
                cookies.append(v)
            else:
                headers.append((k, v))
        if cookies:  # HTTP/2 clients may split them; apps read one (RFC 9113 8.2.3)
            headers.append((b"cookie", b"; ".join(cookies)))
        method = pseudo.get(b":method", b"").decode("latin-1")
        path = pseudo.get(b":path")
        if method == "CONNECT" or path is None:  # no WebSockets over HTTP/2 (RFC 8441) here
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        authority = pseudo.get(b":authority")
        if authority is not None and not any(k == b"host" for k, _ in headers):
            headers.insert(0, (b"host", authority))
        raw_path, _, query = path.partition(b"?")
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "2",
            "server": self.server,
            "client": self.client,
            "scheme": pseudo.get(b":scheme", b"http").decode("latin-1"),
            "method": method,
            "root_path": getattr(self.config, "root_path", ""),
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "headers": headers,
            "state": self.app_state.copy(),
            "extensions": {"http.response.trailers": {}},
        }
        stream = _Stream(sid, scope)
        stream.body_ended = bool(event.stream_ended)
        self.streams[sid] = stream
        self._new.append(stream)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    # -- handlers: started, queued, stopped --------------------------------------------------------

    def _start_new(self) -> None:
        """Start the handlers of the streams the last read opened (those still wanted), as far
        as slots allow; the rest wait for one (open streams all: ``h2`` bounds how many)."""
        new, self._new = self._new, []
        for stream in new:
            if stream.disconnected or self.lost:
                continue
            if self._running < self.limits.max_streams:
                self._start(stream)
            else:
                self._queued.append(stream)

    def _start(self, stream: _Stream) -> None:
        self._running += 1
        task = self.loop.create_task(self._run(stream))
        stream.task = task
        self.server_state.tasks.add(task)
        task.add_done_callback(self.server_state.tasks.discard)
        # Not in _run's finally: a task cancelled before its first step never runs its body.
        task.add_done_callback(lambda _: self._ended(stream))

    def _stop(self, stream: _Stream) -> None:
        """The stream is over for the client (reset, connection lost): its handler is cancelled
        at once -- which closes whatever it opened into a sandbox -- unless it is listening for
        ``http.disconnect`` (then that is its answer, now: the ports gateway's watcher cancels
        the exchange itself); never started, it is forgotten."""
        stream.disconnected = True
        stream.wake()
        if stream.task is not None:
            if not stream.task.done() and not stream.listening:
                stream.task.cancel()
        elif self.streams.get(stream.id) is stream:
            if stream in self._queued:
                self._queued.remove(stream)
            self._done(stream)

    def _ended(self, stream: _Stream) -> None:
        self._running -= 1
        if stream.complete and not stream.disconnected:
            self._frames.bucket.earn()  # a response served whole: a reset may be forgiven
        self._done(stream)
        while self._queued and self._running < self.limits.max_streams and not self.lost:
            self._start(self._queued.popleft())

    # -- one stream --------------------------------------------------------------------------------

    async def _run(self, stream: _Stream) -> None:
        async def receive() -> Message:
            return await self._receive(stream)

        async def send(message: Message) -> None:
            await self._send(stream, message)

        try:
            await self.app(stream.scope, receive, send)
        except asyncio.CancelledError:
            pass
        except Exception:
            if not stream.disconnected:
                log.exception("the app failed on HTTP/2 stream %d", stream.id)
        finally:
            if not stream.complete and not stream.disconnected and not self.lost:
                if not stream.started:  # nothing said yet: a plain 500
                    await self._send_500(stream)
                else:  # a truncated response must not pass for whole
                    self._reset(stream, ErrorCodes.INTERNAL_ERROR)

    async def _send_500(self, stream: _Stream) -> None:
        try:
            await self._send(
                stream,
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                },
            )
            await self._send(
                stream, {"type": "http.response.body", "body": b"Internal Server Error"}
            )
        except (H2Error, RuntimeError):
            self._reset(stream, ErrorCodes.INTERNAL_ERROR)

    def _reset(self, stream: _Stream, code: ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream.id, code)
        except H2Error:
            return
        self._flush()

    def _done(self, stream: _Stream) -> None:
        self.streams.pop(stream.id, None)
        # Request data the app never read still counts against the connection's window.
        for _, size in stream.body:
            self._acknowledge(stream.id, size)
        stream.body.clear()
        self._close_if_done()
        self._arm_idle()

    async def _receive(self, stream: _Stream) -> Message:
        while True:
            if stream.body:
                data, size = stream.body.pop(0)
                self._acknowledge(stream.id, size)
                more = bool(stream.body) or not stream.body_ended
                if not more:
                    stream.body_delivered = True
                return {"type": "http.request", "body": data, "more_body": more}
            if stream.disconnected or stream.complete:  # uvicorn's way: done is gone
                return {"type": "http.disconnect"}
            if stream.body_ended and not stream.body_delivered:
                stream.body_delivered = True
                return {"type": "http.request", "body": b"", "more_body": False}
            stream.changed.clear()
            stream.listening += 1
            try:
                await stream.changed.wait()
            finally:
                stream.listening -= 1

    async def _send(self, stream: _Stream, message: Message) -> None:
        if stream.disconnected or self.lost:
            return  # as uvicorn does: the app may finish, nobody listens
        kind = message["type"]
        if kind == "http.response.start":
            if stream.started:
                raise RuntimeError("http.response.start sent twice")
            stream.started = True
            stream.status = int(message["status"])
            stream.trailers = bool(message.get("trailers", False))
            defaults = list(getattr(self.server_state, "default_headers", []))
            stream.headers = [
                (k.lower(), v)
                for k, v in defaults + list(message.get("headers") or [])
                if k.lower() not in _HOP_BY_HOP
            ]
        elif kind == "http.response.body":
            if not stream.started or stream.body_done:
                raise RuntimeError(f"unexpected {kind} on HTTP/2 stream {stream.id}")
            body = bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            end = not more and not stream.trailers
            if not stream.headers_sent and not body and not more and stream.trailers:
                stream.body_done = True  # the head waits for the trailers (see below)
                return
            if not more:
                stream.body_done = True
            if not stream.headers_sent:
                stream.headers_sent = True
                head = [(b":status", str(stream.status).encode()), *stream.headers]
                self.h2.send_headers(stream.id, head, end_stream=end and not body)
                if end and not body:
                    self._flush()
                    stream.complete = True
                    stream.wake()
                    return
            await self._send_data(stream, body, end)
            if end:
                stream.complete = True
                stream.wake()
        elif kind == "http.response.trailers":
            if not stream.trailers or not stream.body_done or stream.complete:
                raise RuntimeError(f"unexpected {kind} on HTTP/2 stream {stream.id}")
            if message.get("more_trailers", False):
                raise RuntimeError("more_trailers is not supported")
            tail = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers") or []]
            if not stream.headers_sent:
                # No body: the head goes now. Without trailers it ends the stream itself, which
                # is gRPC's "trailers-only" answer (an error status in the head): an empty DATA
                # frame ending the stream instead would leave a gRPC client without a status.
                stream.headers_sent = True
                head = [(b":status", str(stream.status).encode()), *stream.headers]
                self.h2.send_headers(stream.id, head, end_stream=not tail)
                if tail:
                    self.h2.send_headers(stream.id, tail, end_stream=True)
            elif tail:
                self.h2.send_headers(stream.id, tail, end_stream=True)
            else:
                self.h2.end_stream(stream.id)
            self._flush()
            stream.complete = True
            stream.wake()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on an HTTP/2 stream")

    async def _send_data(self, stream: _Stream, body: bytes, end: bool) -> None:
        """DATA as the windows and the socket allow (the app waits here: backpressure). Frames
        are written in batches of up to :data:`WRITE_BATCH` bytes: a small response's HEADERS
        and DATA go out in one write (one syscall, one packet)."""
        view = memoryview(body)
        pending = 0
        while view or end:
            if stream.disconnected or self.lost:
                return
            window = min(
                self.h2.local_flow_control_window(stream.id), self.h2.max_outbound_frame_size
            )
            if self._paused or (view and window <= 0):
                self._flush()
                pending = 0
                await self._writable.wait()
                continue
            piece = view[:window]
            view = view[len(piece) :]
            self.h2.send_data(stream.id, piece.tobytes(), end_stream=end and not view)
            pending += len(piece)
            if not view:
                break
            if pending >= WRITE_BATCH:
                self._flush()
                pending = 0
        self._flush()


def limits_of(config: Any) -> H2Limits:
    """The limits the app was configured with (``app.state.h2_limits``), else the defaults."""
    state = getattr(getattr(config, "app", None), "state", None)
    limits = getattr(state, "h2_limits", None)
    return limits if isinstance(limits, H2Limits) else H2Limits()


def _addr(value: object) -> tuple[str, int | None] | None:
    """A socket address as ASGI wants it: ``(host, port)``, or ``(path, None)`` for a Unix
    socket (as uvicorn does; the API tells its admin socket by it)."""
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    if isinstance(value, str) and value:
        return (value, None)
    return None


def switch_to_h2(
    config: Any,
    server_state: Any,
    app_state: dict[str, Any],
    transport: asyncio.BaseTransport,
    data: bytes,
) -> H2ServerProtocol:
    """Hand a connection whose first bytes (``data``) are the HTTP/2 preface to a new
    :class:`H2ServerProtocol`."""
    protocol = H2ServerProtocol(config, server_state, app_state, cast(asyncio.Transport, transport))
    transport.set_protocol(protocol)
    protocol.data_received(data)
    return protocol
