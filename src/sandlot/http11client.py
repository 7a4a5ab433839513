"""The HTTP/1.1 client wire, on asyncio streams, for the two hops sandlot makes itself: the
server to a sandbox's agent (:mod:`sandlot.server.upstream`) and the async SDK to the local
server (:mod:`sandlot.sdk._uds`). Each wraps it in its own face (the gateway's
``UpstreamResponse``, an httpx transport); the bytes on the wire, their bounds and the pool are
here, once.

Why by hand: on these hops every request pays the client's overhead and an exec round trip
is about a millisecond. Measured on the reference machine, ``httpx.AsyncClient`` took
~0.8-1.3 ms for an agent ``/health`` over a Unix socket where a plain asyncio stream took
~0.1 ms. h11 (installed, with uvicorn) was measured too, on an exec-shaped exchange (request
out, chunked event-stream answer of two events in, parsed to its end), CPU only: ~160 us per
request against ~45 us for these functions (same busy 2-core VM, interleaved runs), with no
bound h11 has that these lack. The subset is small: one request at a time per connection,
``Content-Length``, chunked or read-to-close bodies, keep-alive.

What comes back is hostile input (an agent runs inside its sandbox, and root there can
replace it; the SDK's answers pass through from agents): a head is at most :data:`MAX_HEAD`
bytes with a well-formed status line, header names and values (a bare CR or LF in a value
would be a header injected into whoever relays the answer), a ``Content-Length`` made of ASCII
digits (at most one value) and hex chunk sizes; trailers are bounded like a head. Anything
else is a :class:`ProtocolError`. Bodies are streamed piece by piece (at most
:data:`READ_CHUNK` each), so what they hold is bounded by the reader's own limits.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

#: The largest response head (status line and headers), and the most trailers, read.
MAX_HEAD = 65536
#: The largest piece of body read at once.
READ_CHUNK = 65536

T = TypeVar("T")

#: What a header name and value may hold (RFC 9110 §5.1, §5.5; obsolete line folding refused).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class PeerError(Exception):
    """The peer could not be reached, failed mid-answer, or broke HTTP/1.1."""


class ProtocolError(PeerError):
    """The peer broke HTTP/1.1: a malformed or oversized head, chunk or trailer."""


class IncompleteAnswer(ProtocolError):
    """The peer closed the connection before its answer was complete."""


class Connection:
    """One keep-alive connection: its streams and since when it is idle."""

    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def usable(self, idle_max: float | None = None) -> bool:
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and (idle_max is None or time.monotonic() - self.idle_since < idle_max)
        )

    def close(self) -> None:
        self.writer.close()


class IdlePool:
    """Idle keep-alive connections to one peer: at most ``size``, none idle longer than
    ``idle_max`` seconds (None: no age limit)."""

    __slots__ = ("_idle", "idle_max", "size")

    def __init__(self, size: int, idle_max: float | None = None) -> None:
        self.size = size
        self.idle_max = idle_max
        self._idle: list[Connection] = []

    def take(self) -> Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(self.idle_max):
                return conn
            conn.close()
        return None

    def release(self, conn: Connection) -> None:
        if len(self._idle) < self.size and conn.usable(self.idle_max):
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def encode_head(method: str, target: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A request head. The caller's values are its own (the gateway's are already checked)."""
    parts = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
    for k, v in headers:
        parts.append(k + b": " + v + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def send_request(
    writer: asyncio.StreamWriter,
    head: bytes,
    body: bytes | AsyncIterable[bytes],
    chunked: bool = False,
) -> Awaitable[None]:
    """Write a request: ``head`` then ``body`` (bytes, or pieces sent as they come, in chunked
    encoding if ``chunked``); await the result. Errors of the socket propagate (OSError;
    uvloop raises RuntimeError on a closed transport). A body in hand is written at once and
    only the drain is awaited: no coroutine of its own on the hot path."""
    if isinstance(body, bytes | bytearray):
        # One write for the common small request: one syscall, one packet.
        if len(body) <= READ_CHUNK:
            writer.write(head + body)
        else:
            writer.write(head)
            writer.write(body)
        return writer.drain()
    return _send_pieces(writer, head, body, chunked)


async def _send_pieces(
    writer: asyncio.StreamWriter, head: bytes, body: AsyncIterable[bytes], chunked: bool
) -> None:
    writer.write(head)
    async for piece in body:
        if chunked:
            if piece:
                writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
        else:
            writer.write(piece)
        await writer.drain()
    if chunked:
        writer.write(b"0\r\n\r\n")
    await writer.drain()


async def _timed(awaitable: Awaitable[T], timeout: float | None) -> T:
    if timeout is None:
        return await awaitable
    return await asyncio.wait_for(awaitable, timeout)


async def read_head(reader: asyncio.StreamReader, timeout: float | None = None) -> bytes:
    """The response head, ``\\r\\n\\r\\n`` included. :class:`IncompleteAnswer` if the peer
    closes first, :class:`ProtocolError` past :data:`MAX_HEAD` (the reader's limit),
    ``TimeoutError`` after ``timeout`` seconds."""
    try:
        if timeout is None:  # the gateway's case: no coroutine more than needed
            return await reader.readuntil(b"\r\n\r\n")
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise IncompleteAnswer("the peer closed the connection without answering") from exc
    except asyncio.LimitOverrunError as exc:
        raise ProtocolError("response head too large") from exc


@dataclass(slots=True)
class Head:
    """A parsed response head. ``length`` None and not ``chunked``: the body runs to the
    connection's end (which then cannot be reused)."""

    status: int
    #: Names lowercased, values stripped; as received otherwise.
    headers: list[tuple[bytes, bytes]]
    length: int | None
    chunked: bool
    #: False when the peer said ``connection: close`` or the body runs to the end.
    keep_alive: bool


def parse_head(raw: bytes, method: str) -> Head:
    """Check and parse a response head (as :func:`read_head` returns it) to a request made
    with ``method``; :class:`ProtocolError` for anything malformed."""
    lines = raw[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if (
        len(parts) < 2
        or not parts[0].startswith(b"HTTP/1.")
        or len(parts[1]) != 3
        or not parts[1].isdigit()
        or not 100 <= int(parts[1]) <= 599
    ):
        raise ProtocolError(f"malformed status line: {lines[0][:80]!r}")
    status = int(parts[1])
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    chunked = False
    keep_alive = True
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        key = name.lower()
        value = value.strip(b" \t")
        if not sep or not _TOKEN.fullmatch(key) or _BAD_VALUE.search(value):
            raise ProtocolError("malformed header")
        if key == b"content-length":
            if not value.isdigit() or len(value) > 18 or length not in (None, int(value)):
                raise ProtocolError("malformed content-length")
            length = int(value)
        elif key == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif key == b"connection" and value.lower() == b"close":
            keep_alive = False
        headers.append((key, value))
    if method == "HEAD" or status in (204, 304) or status < 200:
        length, chunked = 0, False
    elif chunked:
        length = None  # RFC 9112 §6.3: chunked wins over a length
    elif length is None:
        keep_alive = False
    return Head(status, headers, length, chunked, keep_alive)


class BodyProgress:
    """How far :func:`iter_body` got: ``done`` once the body was read to its end, ``left``
    the bytes still to come of a body with a length (0 as its last piece is handed out)."""

    __slots__ = ("done", "left")

    def __init__(self, length: int | None = None) -> None:
        self.done = length == 0
        self.left = length


async def iter_body(
    reader: asyncio.StreamReader,
    length: int | None,
    chunked: bool,
    progress: BodyProgress | None = None,
) -> AsyncGenerator[bytes, None]:
    """The decoded body, piece by piece as it arrives (each at most :data:`READ_CHUNK`),
    recording in ``progress`` how far it got.

    Raises :class:`IncompleteAnswer` if the peer closes early, :class:`ProtocolError` for a
    malformed chunk or trailers past :data:`MAX_HEAD`, :class:`PeerError` for other socket
    errors. No timeout here (a ``wait_for`` around each read cost ~6 us per exec at the
    gateway): a caller that wants one puts it around each piece (:func:`next_piece`)."""
    if progress is None:
        progress = BodyProgress()
    try:
        if chunked:
            while True:
                line = await reader.readuntil(b"\r\n")
                digits = line.split(b";", 1)[0].strip()
                # hex digits only, at most 15 (a str.strip, ~1 us less per chunk than a regex)
                if not digits or len(digits) > 15 or digits.strip(b"0123456789abcdefABCDEF"):
                    raise ProtocolError("malformed chunk size")
                size = int(digits, 16)
                if size == 0:
                    trailers = 0
                    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                        trailers += len(line)
                        if trailers > MAX_HEAD:
                            raise ProtocolError("trailers too large")
                    break
                remaining = size
                while remaining:
                    data = await reader.read(min(remaining, READ_CHUNK))
                    if not data:
                        raise IncompleteAnswer("the peer closed the connection mid-answer")
                    remaining -= len(data)
                    yield data
                if await reader.readexactly(2) != b"\r\n":
                    raise ProtocolError("malformed chunk end")
        elif length is not None:
            remaining = length
            while remaining:
                data = await reader.read(min(remaining, READ_CHUNK))
                if not data:
                    raise IncompleteAnswer("the peer closed the connection mid-answer")
                remaining -= len(data)
                progress.left = remaining
                yield data
        else:
            while data := await reader.read(READ_CHUNK):
                yield data
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise IncompleteAnswer(f"the peer closed the connection mid-answer ({exc})") from exc
    except asyncio.LimitOverrunError as exc:
        raise ProtocolError(f"malformed answer: {exc}") from exc
    except OSError as exc:
        raise PeerError(f"connection failed: {exc}") from exc
    progress.done = True


async def next_piece(pieces: AsyncIterator[bytes], timeout: float | None) -> bytes | None:
    """The next piece of :func:`iter_body` (None at the end), waiting at most ``timeout``
    seconds for it (``TimeoutError``)."""
    try:
        return await _timed(anext(pieces), timeout)
    except StopAsyncIteration:
        return None


def salvage_early_answer(conn: Connection) -> bytes | None:
    """After a failed send, asyncio's reader refuses to read even what the peer answered
    before closing (an early 401 or 413). Take that answer's head from the reader's buffer (a
    private attribute, hence the care) and give the connection a fresh reader holding the
    rest; None if there is no whole head."""
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
