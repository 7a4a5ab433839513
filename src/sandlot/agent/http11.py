"""A small HTTP/1.1 server built on :mod:`socket` and :mod:`threading`.

Why not :mod:`http.server`: importing it pulls in ``email``, ``http.client`` and ``ssl`` (about
20 ms and several MiB on the machines we measured), and the agent runs in every sandbox, where
start-up time and resident size are the product. What the agent needs from HTTP is small and
precise: keep-alive, ``Content-Length`` and chunked request bodies, chunked streaming responses
(server-sent events), ``Upgrade`` hand-over (WebSocket, TCP tunnels) and hard limits on what a
client may send. That is what this module does, and nothing else.

One thread per connection; a handler gets a :class:`Request`, and either returns a
:class:`Reply` (buffered JSON or bytes) or answers itself through :meth:`Request.respond`,
:meth:`Request.start_stream` or :meth:`Request.upgrade`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

# Annotations only: importing typing at run time costs the agent milliseconds of start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from io import BufferedReader
    from typing import Any

MAX_REQUEST_LINE = 65536
MAX_HEADER_COUNT = 100
MAX_HEADER_BYTES = 65536
#: How long a keep-alive connection may stay idle, and how long a read or write may stall.
IO_TIMEOUT = 300.0

REASONS = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    204: "No Content",
    206: "Partial Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    507: "Insufficient Storage",
}


class HTTPError(Exception):
    """Raised by handlers (and the parser) to answer with a JSON error.

    The body is ``{"error": message, **extra}``; ``extra`` carries route-specific fields such as
    Koyeb's ``success: false``.
    """

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {**self.extra, "error": self.message}


class ClientGone(Exception):
    """The peer closed the connection (or stopped reading) while we were answering."""


class Reply:
    """A buffered answer: JSON (``obj``) or raw bytes (``data``)."""

    __slots__ = ("content_type", "data", "headers", "status")

    def __init__(
        self,
        status: int,
        obj: Any = None,
        *,
        data: bytes | None = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.data = data if data is not None else dump_json(obj)
        self.content_type = content_type
        self.headers = headers or {}


def dump_json(obj: Any) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate (e.g. an undecodable file name): escape it
        return json.dumps(obj, separators=(",", ":")).encode()


_HEX = frozenset("0123456789abcdefABCDEF")
_HEX_BYTES = frozenset(b"0123456789abcdefABCDEF")


def percent_decode(text: str, plus: bool = False) -> str:
    """``%XX`` decoding (and ``+`` as space in queries), as :func:`urllib.parse.unquote`
    does, without importing :mod:`urllib` (start-up time). Undecodable bytes are kept with
    ``surrogateescape``, which is how Python represents non-UTF-8 file names."""
    if plus:
        text = text.replace("+", " ")
    if "%" not in text:
        return text
    head, *rest = text.split("%")
    out = bytearray(head.encode("utf-8", "surrogateescape"))
    for piece in rest:
        if len(piece) >= 2 and piece[0] in _HEX and piece[1] in _HEX:
            out.append(int(piece[:2], 16))
            out += piece[2:].encode("utf-8", "surrogateescape")
        else:
            out += b"%" + piece.encode("utf-8", "surrogateescape")
    return out.decode("utf-8", "surrogateescape")


class Request:
    """One parsed request on a connection, with its body still unread."""

    def __init__(
        self, conn: Connection, method: str, target: str, version: str, headers: dict[str, str]
    ) -> None:
        self.conn = conn
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        raw_path, _, raw_query = target.partition("?")
        raw_path = raw_path.partition("#")[0]
        if raw_path.startswith(("http://", "https://")):  # absolute-form target
            raw_path = "/" + raw_path.split("/", 3)[-1] if raw_path.count("/") >= 3 else "/"
        self.path = percent_decode(raw_path) or "/"
        self.query: dict[str, str] = {}
        for pair in raw_query.partition("#")[0].split("&"):
            if pair:
                key, _, value = pair.partition("=")
                self.query[percent_decode(key, plus=True)] = percent_decode(value, plus=True)
        self.responded = False
        self.keep_alive = self._wants_keep_alive()
        self._expect_continue = headers.get("expect", "").lower() == "100-continue"
        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        if te is not None and cl is not None:
            raise HTTPError(400, "both Transfer-Encoding and Content-Length given")
        self._chunked = False
        self._remaining = 0
        self._chunk_left = 0
        self._body_done = False
        if te is not None:
            if te.strip().lower() != "chunked":
                raise HTTPError(501, f"unsupported Transfer-Encoding: {te}")
            self._chunked = True
        elif cl is not None:
            if not cl.strip().isdigit():
                raise HTTPError(400, "invalid Content-Length")
            self._remaining = int(cl)
        self._body_done = not self._chunked and self._remaining == 0

    def _wants_keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    # -- request body -------------------------------------------------------------------------

    @property
    def declared_length(self) -> int | None:
        """The body size the client announced, or None for a chunked body."""
        return None if self._chunked else self._remaining

    def _continue(self) -> None:
        if self._expect_continue:
            self._expect_continue = False
            self.conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def read_chunk(self, size: int = 262144) -> bytes:
        """Next piece of the body (at most ``size`` bytes); ``b""`` at its end."""
        if self._body_done:
            return b""
        self._continue()
        rfile = self.conn.rfile
        if not self._chunked:
            data: bytes = rfile.read(min(size, self._remaining))
            if not data:
                raise ClientGone("request body ended early")
            self._remaining -= len(data)
            self._body_done = self._remaining == 0
            return data
        if self._chunk_left == 0:
            line = rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise HTTPError(400, "malformed chunked body")
            size_field = line.split(b";", 1)[0].strip()
            if not size_field or not all(c in _HEX_BYTES for c in size_field):
                raise HTTPError(400, "malformed chunk size")
            self._chunk_left = int(size_field, 16)
            if self._chunk_left == 0:
                # Trailer section: header lines until an empty line.
                for _ in range(MAX_HEADER_COUNT):
                    trailer = rfile.readline(MAX_REQUEST_LINE)
                    if trailer in (b"\r\n", b"\n", b""):
                        break
                self._body_done = True
                return b""
        chunk: bytes = rfile.read(min(size, self._chunk_left))
        data = chunk
        if not data:
            raise ClientGone("request body ended early")
        self._chunk_left -= len(data)
        if self._chunk_left == 0 and rfile.readline(3) not in (b"\r\n", b"\n"):
            raise HTTPError(400, "malformed chunked body")
        return data

    def iter_body(self, size: int = 262144) -> Iterator[bytes]:
        while True:
            data = self.read_chunk(size)
            if not data:
                return
            yield data

    def read_body(self, limit: int) -> bytes:
        """The whole body, refusing (413) anything larger than ``limit`` bytes."""
        if not self._chunked and self._remaining > limit:
            # Do not read it: the connection is closed after the 413.
            self.keep_alive = False
            raise HTTPError(413, f"request body too large (limit {limit} bytes)")
        parts: list[bytes] = []
        total = 0
        for data in self.iter_body():
            total += len(data)
            if total > limit:
                self.keep_alive = False
                raise HTTPError(413, f"request body too large (limit {limit} bytes)")
            parts.append(data)
        return b"".join(parts)

    def json(self, limit: int) -> dict[str, Any]:
        """The body as a JSON object; 400 for anything else (an empty body is ``{}``)."""
        raw = self.read_body(limit)
        if not raw.strip():
            return {}
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise HTTPError(400, f"invalid JSON body: {exc}") from None
        if not isinstance(obj, dict):
            raise HTTPError(400, "JSON body must be an object")
        return obj

    def discard_body(self, limit: int = 1 << 20) -> None:
        """Consume what is left of the body so the connection can serve the next request."""
        if self._body_done:
            return
        if not self._chunked and self._remaining > limit:
            self.keep_alive = False
            return
        if self._expect_continue:
            # The client waits for "100 Continue" before sending the body: it will not come,
            # so answer and close instead of waiting for bytes that may never be sent.
            self.keep_alive = False
            return
        total = 0
        try:
            for data in self.iter_body():
                total += len(data)
                if total > limit:
                    self.keep_alive = False
                    return
        except (HTTPError, ClientGone, OSError):
            self.keep_alive = False

    # -- answers ------------------------------------------------------------------------------

    def _head(self, status: int, headers: dict[str, str]) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
        lines.extend(f"{k}: {v}" for k, v in headers.items())
        if not self.keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def respond(
        self,
        status: int,
        data: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        if self.responded:
            raise RuntimeError("response already sent")
        self.responded = True
        if not self._body_done:
            self.discard_body()
        h = {"Content-Type": content_type, "Content-Length": str(len(data))}
        if headers:
            h.update(headers)
        self.conn.send(self._head(status, h) + (b"" if self.method == "HEAD" else data))

    def respond_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.respond(status, dump_json(obj), headers=headers)

    def start_stream(
        self, status: int, content_type: str, headers: dict[str, str] | None = None
    ) -> ChunkedWriter:
        """Send the head of a chunked response; the body follows through the writer.

        HTTP/1.0 has no chunked encoding: such a client gets the raw body, ended by closing.
        """
        if self.responded:
            raise RuntimeError("response already sent")
        self.responded = True
        if not self._body_done:
            self.discard_body()
        chunked = self.version != "HTTP/1.0"
        if not chunked:
            self.keep_alive = False
        h = {"Content-Type": content_type}
        if chunked:
            h["Transfer-Encoding"] = "chunked"
        if headers:
            h.update(headers)
        self.conn.send(self._head(status, h))
        return ChunkedWriter(self, chunked)

    def start_fixed(
        self, status: int, length: int, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        """Send the head of a response whose body (``length`` bytes) follows by :meth:`send`."""
        self.responded = True
        h = {"Content-Type": content_type, "Content-Length": str(length)}
        if headers:
            h.update(headers)
        self.conn.send(self._head(status, h))

    def send(self, data: bytes) -> None:
        self.conn.send(data)

    def respond_with_fd(self, status: int, headers: dict[str, str], fd: int) -> None:
        """A body-less answer whose head carries ``fd`` (SCM_RIGHTS, Unix sockets only); the
        connection closes after it."""
        self.responded = True
        self.keep_alive = False
        head = self._head(status, {**headers, "Content-Length": "0"})
        try:
            with self.conn._wlock:
                sent = socket.send_fds(self.conn.sock, [head], [fd])
                self.conn.sock.sendall(head[sent:])
        except (OSError, ValueError) as exc:
            raise ClientGone(str(exc)) from None

    def upgrade(self, headers: dict[str, str]) -> Connection:
        """Answer 101 and hand the raw connection to the caller (it owns it afterwards)."""
        self.responded = True
        self.keep_alive = False
        lines = ["HTTP/1.1 101 Switching Protocols", *(f"{k}: {v}" for k, v in headers.items())]
        self.conn.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return self.conn


class ChunkedWriter:
    """The body of a chunked response; any write failure becomes :class:`ClientGone`."""

    def __init__(self, request: Request, chunked: bool = True) -> None:
        self.request = request
        self.chunked = chunked
        self.closed = False

    def write(self, data: bytes) -> None:
        if data:
            if self.chunked:
                data = b"%x\r\n%b\r\n" % (len(data), data)
            self.request.conn.send(data)

    def event(self, name: str, obj: Any) -> None:
        """One server-sent event: ``event: <name>\\ndata: <json>\\n\\n``."""
        self.write(b"event: " + name.encode() + b"\ndata: " + dump_json(obj) + b"\n\n")

    def comment(self, text: str) -> None:
        self.write(b":" + text.encode() + b"\n\n")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.chunked:
                self.request.conn.send(b"0\r\n\r\n")


class Connection:
    """A client connection: buffered reads, locked writes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(IO_TIMEOUT)
        self.rfile: BufferedReader = sock.makefile("rb", buffering=65536)  # type: ignore[assignment]
        self._wlock = threading.Lock()
        self.closed = False

    def send(self, data: bytes) -> None:
        try:
            with self._wlock:
                self.sock.sendall(data)
        except (OSError, ValueError) as exc:  # EPIPE, ECONNRESET, timeout, closed socket
            raise ClientGone(str(exc)) from None

    def peer_gone(self) -> bool:
        """True if the peer has closed its side (checked without consuming data or waiting)."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        # Not recv(MSG_DONTWAIT) alone: a socket with a timeout first waits for readability.
        if not poller.poll(0):
            return False
        try:
            data = self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        return data == b""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def detach(self) -> tuple[socket.socket, bytes]:
        """Hand the socket, non-blocking, and the bytes already read past the request to the
        caller, which owns them from now on (this connection's close leaves them alone)."""
        self.sock.setblocking(False)
        try:
            pending = self.rfile.read1(65536) or b""  # the buffer only: the socket would block
        except (BlockingIOError, InterruptedError):
            pending = b""
        self.closed = True
        with contextlib.suppress(OSError):
            self.rfile.close()
        return self.sock, pending


Dispatch = Callable[[Request], "Reply | None"]


def _read_head(conn: Connection) -> Request | None:
    """Parse the request line and headers; None when the peer closed between requests."""
    rfile = conn.rfile
    line = rfile.readline(MAX_REQUEST_LINE + 1)
    while line in (b"\r\n", b"\n"):  # tolerate stray empty lines between requests (RFC 9112)
        line = rfile.readline(MAX_REQUEST_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_REQUEST_LINE:
        raise HTTPError(414, "request line too long")
    try:
        method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ")
    except ValueError:
        raise HTTPError(400, "malformed request line") from None
    if version not in ("HTTP/1.1", "HTTP/1.0") or not method.isalpha() or not target:
        raise HTTPError(400, "malformed request line")
    headers: dict[str, str] = {}
    size = 0
    for _ in range(MAX_HEADER_COUNT + 1):
        raw = rfile.readline(MAX_HEADER_BYTES + 1)
        size += len(raw)
        if size > MAX_HEADER_BYTES:
            raise HTTPError(431, "request headers too large")
        if raw in (b"\r\n", b"\n"):
            break
        if not raw:
            raise ClientGone("connection closed inside headers")
        text = raw.decode("latin-1").rstrip("\r\n")
        name, sep, value = text.partition(":")
        if not sep or not name or name != name.strip() or text[0] in " \t":
            raise HTTPError(400, "malformed header line")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    else:
        raise HTTPError(431, "too many request headers")
    return Request(conn, method, target, version, headers)


def serve_connection(sock: socket.socket, dispatch: Dispatch) -> None:
    """Serve requests on one connection until it closes or a request asks to close it."""
    conn = Connection(sock)
    try:
        while True:
            try:
                req = _read_head(conn)
            except HTTPError as err:
                _send_error_and_close(conn, err)
                return
            except (ClientGone, OSError, ValueError):
                return
            if req is None:
                return
            try:
                reply = dispatch(req)
                if reply is not None:
                    req.respond(reply.status, reply.data, reply.content_type, reply.headers)
            except HTTPError as err:
                if req.responded:
                    return
                try:
                    req.respond_json(err.status, err.body())
                except ClientGone:
                    return
            except (ClientGone, TimeoutError, ConnectionError):
                return
            except Exception as exc:
                print(
                    f"sandlot-agent: error serving {req.method} {req.path}: {exc!r}",
                    file=sys.stderr,
                )
                import traceback

                traceback.print_exc()
                if req.responded:
                    return
                req.keep_alive = False
                with contextlib.suppress(ClientGone):
                    req.respond_json(500, {"error": f"internal error: {exc}"})
                return
            if not req.keep_alive or conn.closed:
                return
    finally:
        conn.close()


def _send_error_and_close(conn: Connection, err: HTTPError) -> None:
    body = dump_json(err.body())
    head = (
        f"HTTP/1.1 {err.status} {REASONS.get(err.status, 'Error')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    with contextlib.suppress(ClientGone):
        conn.send(head.encode("latin-1") + body)


class Listener:
    """A listening socket (Unix or TCP) accepting connections, one thread each."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.unix_path: str | None = None
        if spec.startswith("unix:"):
            self.unix_path = spec[5:]
            if not self.unix_path:
                raise ValueError("empty Unix socket path")
            self.sock = _bind_unix(self.unix_path)
        elif spec.startswith("fd:"):
            # An already bound and listening socket handed over by whoever started us (the
            # engine keeps the socket file where the sandbox cannot reach it).
            if not spec[3:].isdigit():
                raise ValueError(f"bad listen address {spec!r}; expected fd:N")
            fd = int(spec[3:])
            self.sock = socket.socket(fileno=fd)
            self.sock.set_inheritable(False)  # never into the commands the agent runs
            if self.sock.type != socket.SOCK_STREAM:
                raise ValueError(f"fd {fd} is not a stream socket")
        elif spec.startswith("tcp:"):
            host, _, port = spec[4:].rpartition(":")
            host = host.strip("[]")
            if not host or not port.isdigit():
                raise ValueError(f"bad TCP address {spec!r}; expected tcp:HOST:PORT")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, int(port)))
        else:
            raise ValueError(
                f"bad listen address {spec!r}; expected unix:PATH, tcp:HOST:PORT or fd:N"
            )
        self.sock.listen(256)
        self.closed = False
        #: The open client connections (see :meth:`park`).
        self.clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()

    def serve_forever(self, dispatch: Dispatch) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError as exc:
                if self.closed:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors (every relayed tunnel holds two, in gVisor sandboxes):
                    # wait for some to close rather than spin on a backlog that stays full.
                    time.sleep(0.05)
                continue
            if self.sock.family != socket.AF_UNIX:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._clients_lock:
                self.clients.add(client)
            thread = threading.Thread(target=self._serve, args=(client, dispatch), daemon=True)
            try:
                thread.start()
            except RuntimeError:  # "can't start new thread": the pids limit, most likely
                self._forget(client)
                client.close()
                time.sleep(0.05)

    def _serve(self, client: socket.socket, dispatch: Dispatch) -> None:
        try:
            serve_connection(client, dispatch)
        finally:
            self._forget(client)

    def _forget(self, client: socket.socket) -> None:
        with self._clients_lock:
            self.clients.discard(client)

    def park(self, grace: float = 2.0) -> None:
        """Let go of every socket that leads out of the sandbox, for a gVisor checkpoint
        (gVisor cannot save a socket bound on the host: see sandlot.agent.checkpoint). The
        listening socket is closed, every client connection shut down and waited for (at most
        ``grace`` seconds), and the socket file removed last: its absence says "done"."""
        with contextlib.suppress(OSError):
            self.sock.close()
        with self._clients_lock:
            clients = list(self.clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + grace
        while self.clients and time.monotonic() < deadline:
            time.sleep(0.002)
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)

    def unpark(self) -> None:
        """Listen again after :meth:`park` (a restored or resumed checkpoint): a new socket at
        the same path (the engine adopts it as it adopts a restarted agent's)."""
        if self.unix_path is None:
            raise ValueError("only a unix: listener can be parked and listen again")
        self.sock = _bind_unix(self.unix_path)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        finally:
            if self.unix_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.unix_path)


def _bind_unix(path: str) -> socket.socket:
    import stat

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ValueError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody is listening on it
        else:
            raise ValueError(f"another process is already listening on {path}")
        finally:
            probe.close()
    # Bind and listen under a temporary name, then rename into place: whoever sees the socket
    # file can connect to it at once (no window between bind() and listen()).
    tmp = f"{path}.{os.getpid()}.tmp"
    if len(os.fsencode(tmp)) > 107:  # sun_path limit: no room for a temporary name
        tmp = path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(tmp)
    finally:
        os.umask(old_umask)
    sock.listen(256)
    if tmp != path:
        os.rename(tmp, path)
    return sock
