"""h2serve.py on its own: a real uvicorn server (as ``sandlot server`` configures it, on
127.0.0.1) running a small ASGI app, driven by a raw ``h2`` client, for what the end-to-end port
tests cannot steer: an app that holds a response open across a graceful shutdown, one that fails
before or during its response, ``http.disconnect`` on a reset, trailers-only answers, request
bodies under flow control and the idle timeout. No sandboxes; no root needed."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import uvicorn

from sandlot.server.runner.protocols import PortsWebSocketProtocol, ports_http_protocol

Scope = dict[str, Any]


@dataclass
class Signals:
    """What the app tells the test (threading events: the app runs on the server's thread)."""

    holding: threading.Event = field(default_factory=threading.Event)
    release: asyncio.Event | None = None
    disconnected: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None


def make_app(signals: Signals) -> Any:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]

        async def start(status: int = 200, trailers: bool = False) -> None:
            await send({"type": "http.response.start", "status": status, "trailers": trailers})

        if path == "/hold":  # answers once the test releases it
            signals.loop = asyncio.get_running_loop()
            signals.release = asyncio.Event()
            signals.holding.set()
            await signals.release.wait()
            await start()
            await send({"type": "http.response.body", "body": b"released"})
        elif path == "/until-disconnect":
            await start()
            await send({"type": "http.response.body", "body": b"waiting", "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass
            signals.disconnected.set()
        elif path == "/fail-before":
            raise RuntimeError("the app fails before answering")
        elif path == "/fail-during":
            await start()
            await send({"type": "http.response.body", "body": b"half", "more_body": True})
            raise RuntimeError("the app fails mid-response")
        elif path == "/trailers-only":
            await start(trailers=True)
            await send({"type": "http.response.body", "body": b""})
            await send({"type": "http.response.trailers", "headers": []})
        elif path == "/trailers":
            await start(trailers=True)
            await send({"type": "http.response.body", "body": b"data"})
            await send({"type": "http.response.trailers", "headers": [(b"x-t", b"1")]})
        elif path == "/hash":  # reads the body, answers its size and sha256
            digest, size = hashlib.sha256(), 0
            while True:
                message = await receive()
                digest.update(message.get("body", b""))
                size += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
            await start()
            await send(
                {"type": "http.response.body", "body": f"{size} {digest.hexdigest()}".encode()}
            )
        else:
            await start(404)
            await send({"type": "http.response.body", "body": b"nope"})

    return app


@dataclass
class Server:
    port: int
    server: uvicorn.Server
    thread: threading.Thread
    signals: Signals


@pytest.fixture
def server() -> Iterator[Server]:
    signals = Signals()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    config = uvicorn.Config(
        make_app(signals),
        http=ports_http_protocol(),
        ws=PortsWebSocketProtocol,
        lifespan="off",
        log_level="warning",
        timeout_keep_alive=1,
        timeout_graceful_shutdown=10,
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.01)
    yield Server(sock.getsockname()[1], srv, thread, signals)
    srv.should_exit = True
    thread.join(15)
    sock.close()


@pytest.fixture
def connect(server: Server) -> Iterator[Any]:
    """Clients to the server, closed at the end."""
    made: list[Client] = []

    def new() -> Client:
        made.append(Client(server.port))
        return made[-1]

    yield new
    for client in made:
        client.close()


@dataclass
class Answer:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[bytes, bytes] | None = None
    reset: h2.errors.ErrorCodes | int | None = None
    ended: bool = False
    frames_with_end: list[str] = field(default_factory=list)


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.initiate_connection()
        self.flush()
        self.answers: dict[int, Answer] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None

    def flush(self) -> None:
        self.sock.sendall(self.h2.data_to_send())

    def close(self) -> None:
        self.sock.close()

    def start(self, path: str, method: str = "GET", end: bool = True) -> int:
        sid = self.h2.get_next_available_stream_id()
        headers = [(":method", method), (":scheme", "http"), (":authority", "t"), (":path", path)]
        self.h2.send_headers(sid, headers, end_stream=end)
        self.flush()
        self.answers[sid] = Answer()
        return sid

    def pump(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        for ev in self.h2.receive_data(data):
            answer = self.answers.get(getattr(ev, "stream_id", 0) or 0)
            if isinstance(ev, h2.events.ResponseReceived) and answer:
                answer.headers = dict(ev.headers)
                answer.status = int(answer.headers[b":status"])
                if ev.stream_ended:
                    answer.frames_with_end.append("HEADERS")
            elif isinstance(ev, h2.events.DataReceived) and answer:
                answer.body += ev.data
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if ev.stream_ended:
                    answer.frames_with_end.append("DATA")
            elif isinstance(ev, h2.events.TrailersReceived) and answer:
                answer.trailers = dict(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded) and answer:
                answer.ended = True
            elif isinstance(ev, h2.events.StreamReset) and answer:
                answer.reset = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
        self.flush()
        return True

    def wait(self, sid: int) -> Answer:
        answer = self.answers[sid]
        while not answer.ended and answer.reset is None:
            assert self.pump(), "connection closed"
        return answer


def test_scope_and_a_request_body_under_flow_control(server: Server, connect: Any) -> None:
    """A 5 MB body, many times the stream's receive window: it flows as the app reads it."""
    c = connect()
    body = bytes(range(256)) * (5 * 4096)
    sid = c.start("/hash", method="POST", end=False)
    view = memoryview(body)
    while view:
        window = min(c.h2.local_flow_control_window(sid), c.h2.max_outbound_frame_size)
        if window == 0:
            assert c.pump()
            continue
        c.h2.send_data(sid, view[:window].tobytes())
        c.flush()
        view = view[window:]
    c.h2.end_stream(sid)
    c.flush()
    answer = c.wait(sid)
    assert answer.status == 200
    assert answer.body == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()


def test_reset_gives_the_app_http_disconnect(server: Server, connect: Any) -> None:
    c = connect()
    sid = c.start("/until-disconnect")
    while not c.answers[sid].body:
        assert c.pump()
    c.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    c.flush()
    assert server.signals.disconnected.wait(10)


def test_app_failures(server: Server, connect: Any) -> None:
    c = connect()
    before = c.wait(c.start("/fail-before"))
    assert before.status == 500 and before.body == b"Internal Server Error"
    during = c.wait(c.start("/fail-during"))
    assert during.status == 200 and during.body == b"half"
    assert during.reset == h2.errors.ErrorCodes.INTERNAL_ERROR  # not a response that passes
    assert c.wait(c.start("/other")).status == 404  # the connection goes on


def test_trailers(server: Server, connect: Any) -> None:
    c = connect()
    only = c.wait(c.start("/trailers-only"))
    assert only.status == 200 and only.frames_with_end == ["HEADERS"] and only.trailers is None
    full = c.wait(c.start("/trailers"))
    assert full.body == b"data" and full.trailers == {b"x-t": b"1"}


def test_graceful_shutdown_lets_open_streams_finish(server: Server, connect: Any) -> None:
    c = connect()
    held = c.start("/hold")
    assert server.signals.holding.wait(10)
    server.server.should_exit = True
    while c.goaway is None:  # GOAWAY first, naming the held stream as the last served
        assert c.pump()
    assert c.goaway.error_code == 0 and c.goaway.last_stream_id == held
    loop, release = server.signals.loop, server.signals.release
    assert loop is not None and release is not None
    loop.call_soon_threadsafe(release.set)
    # (h2 treats a GOAWAY as the end of everything, so the rest is read as frames by hand.)
    data = b""
    while chunk := c.sock.recv(65536):  # the held stream's answer, then the close
        data += chunk
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        sid = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
        frames.append((data[3], data[4], sid, data[9 : 9 + length]))
        data = data[9 + length :]
    head = next(f for f in frames if f[0] == 0x1 and f[2] == held)
    assert dict(c.h2.decoder.decode(head[3], raw=True))[b":status"] == b"200"
    body = [f for f in frames if f[0] == 0x0 and f[2] == held]
    assert b"".join(f[3] for f in body) == b"released" and body[-1][1] & 0x1  # END_STREAM
    server.thread.join(15)
    assert not server.thread.is_alive()


def test_idle_connection_is_closed(server: Server, connect: Any) -> None:
    """uvicorn's keep-alive timeout (1 s here) applies to an HTTP/2 connection with no
    stream."""
    c = connect()
    assert c.wait(c.start("/other")).status == 404
    started = time.monotonic()
    while c.pump():
        pass
    assert c.goaway is not None and c.goaway.error_code == 0
    assert 0.5 < time.monotonic() - started < 5


def test_shutdown_with_an_idle_closed_connection_lingering(server: Server, connect: Any) -> None:
    """The server stopping while a connection it closed for idleness still lingers (our GOAWAY
    and EOF sent, the client not gone yet): nothing more is written to it, and the shutdown
    goes through (it raised "write() after write_eof()" and broke uvicorn's shutdown)."""
    c = connect()
    assert c.wait(c.start("/other")).status == 404
    while c.goaway is None:
        assert c.pump()
    failures: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: failures.append(args.exc_value)  # type: ignore[assignment]
    try:
        server.server.should_exit = True
        server.thread.join(15)
    finally:
        threading.excepthook = previous
    assert not server.thread.is_alive()
    assert failures == []


def test_a_preface_split_across_reads(server: Server) -> None:
    """The preface recognised however it arrives (held back until it is whole)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid, [(":method", "GET"), (":scheme", "http"), (":authority", "t"), (":path", "/x")], True
    )
    data = conn.data_to_send()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (data[:3], data[3:14], data[14:30], data[30:]):
            sock.sendall(piece)
            time.sleep(0.05)  # separate reads on the server (not a synchronisation)
        status = None
        while status is None:
            chunk = sock.recv(65536)
            assert chunk, "closed"
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers)[b":status"]
    assert status == b"404"
