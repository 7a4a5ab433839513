"""Servers the port tests run inside sandboxes (standard library only: sandboxes have no network,
so no pip). Each is written into the sandbox as a file and started with ``launch_process``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def upload_h2(sb: Any) -> None:
    """The pure-Python h2, hpack and hyperframe packages into the sandbox's /srv/lib, for the
    HTTP/2 servers below (a sandbox cannot pip install: it has no network)."""
    import h2
    import hpack
    import hyperframe

    files: dict[str, bytes] = {}
    for package in (h2, hpack, hyperframe):
        root = Path(package.__file__).parent
        for path in root.rglob("*.py"):
            files[f"/srv/lib/{root.name}/{path.relative_to(root)}"] = path.read_bytes()
    dirs = sorted({str(Path(p).parent) for p in files})
    assert sb.exec("mkdir -p " + " ".join(dirs)).exit_code == 0
    sb.filesystem.write_files(files)


#: HTTP/1.1 (keep-alive) on the port given: ``/sse`` streams 4 events 0.4 s apart (chunked),
#: ``/big?mb=N`` streams N MiB (chunked; a client that leaves is noted in /tmp/big-aborted),
#: ``/broken`` promises 1 MB and closes after 1000 bytes, ``POST`` counts and hashes the body
#: (Content-Length or chunked), anything else echoes the path and headers as JSON.
HTTP_APP = r"""
import hashlib, json, socket, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two writes: no 40 ms delayed-ACK stall

    def log_message(self, *args):
        pass

    def reply(self, obj, status=200):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.startswith("/sse"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(4):
                event = ("data: %d\n\n" % i).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                time.sleep(0.4)
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path.startswith("/big"):  # /big?mb=N: N MiB, chunked, as fast as it goes
            mb = int(self.path.split("mb=")[1])
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            block = b"\0" * (1 << 20)
            try:
                for _ in range(mb):
                    self.wfile.write(b"100000\r\n" + block + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the client left: say so where the test can look
                open("/tmp/big-aborted", "w").close()
            return
        if self.path.startswith("/broken"):
            self.send_response(200)
            self.send_header("content-length", "1000000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.reply({"path": self.path, "headers": headers})

    def do_POST(self):
        digest = hashlib.sha256()
        total = 0
        chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        if chunked:
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 20))
                    digest.update(data)
                    total += len(data)
                    left -= len(data)
                self.rfile.readline()
        else:
            left = int(self.headers.get("content-length", 0))
            while left:
                data = self.rfile.read(min(left, 1 << 20))
                if not data:
                    break
                digest.update(data)
                total += len(data)
                left -= len(data)
        self.reply({"size": total, "sha256": digest.hexdigest(), "chunked": chunked})


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer.request_queue_size = 512
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

#: A WebSocket echo server (RFC 6455, unfragmented messages; pings answered; the first offered
#: subprotocol accepted), asyncio: one thread for any number of connections.
WS_ECHO = r"""
import asyncio, base64, hashlib, struct, sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def unmask(data, mask):
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def frame(op, data):
    n = len(data)
    if n < 126:
        head = bytes([0x80 | op, n])
    elif n < 65536:
        head = bytes([0x80 | op, 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 | op, 127]) + struct.pack("!Q", n)
    return head + data


async def handle(reader, writer):
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        key = proto = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"sec-websocket-key":
                key = value.strip()
            elif name == b"sec-websocket-protocol":
                proto = value.split(b",")[0].strip()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        answer = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\nX-Echo-Server: in-the-sandbox\r\n"
        )
        if proto:
            answer += b"Sec-WebSocket-Protocol: " + proto + b"\r\n"
        writer.write(answer + b"\r\n")
        while True:
            b0, b1 = await reader.readexactly(2)
            op, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await reader.readexactly(8))
            mask = await reader.readexactly(4) if b1 & 0x80 else b"\0\0\0\0"
            data = unmask(await reader.readexactly(n), mask)
            if op == 8:
                writer.write(frame(8, data[:2] or struct.pack("!H", 1000)))
                await writer.drain()
                break
            if op == 10:
                continue
            writer.write(frame(10 if op == 9 else op, data))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await server.serve_forever()


asyncio.run(main())
"""

#: A raw TCP echo server: echoes each read; on the client's half-close, sends "|total=N" and
#: closes.
TCP_ECHO = r"""
import asyncio, sys


async def handle(reader, writer):
    total = 0
    try:
        while data := await reader.read(65536):
            total += len(data)
            writer.write(data)
            await writer.drain()
        writer.write(b"|total=%d" % total)
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()


asyncio.run(main())
"""

#: A minimal h2c server (HTTP/2 with prior knowledge, cleartext): enough of RFC 9113 for one
#: client that sends its header blocks without Huffman coding or the dynamic table (the test's).
#: It answers each request stream with ``:status 200`` and the request's ``:path`` as the body.
H2C_SERVER = r"""
import socket, struct, sys, threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STATIC = {1: ":authority", 2: ":method", 3: ":method", 4: ":path", 5: ":path", 6: ":scheme",
          7: ":scheme"}
STATIC_VALUES = {2: "GET", 3: "POST", 4: "/", 5: "/index.html", 6: "http", 7: "https"}


def frame(kind, flags, stream, payload=b""):
    head = struct.pack("!I", len(payload))[1:] + bytes([kind, flags])
    return head + struct.pack("!I", stream) + payload


def read_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def integer(block, i, prefix):
    value = block[i] & ((1 << prefix) - 1)
    i += 1
    if value < (1 << prefix) - 1:
        return value, i
    shift = 0
    while True:
        b = block[i]
        i += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def string(block, i):
    assert not block[i] & 0x80, "Huffman-coded strings are not supported here"
    n, i = integer(block, i, 7)
    return block[i:i + n].decode(), i + n


def headers(block):
    out, i = {}, 0
    while i < len(block):
        b = block[i]
        if b & 0x80:  # indexed (static table only)
            index, i = integer(block, i, 7)
            out[STATIC[index]] = STATIC_VALUES.get(index, "")
            continue
        prefix = 6 if b & 0x40 else 4
        index, i = integer(block, i, prefix)
        if index:
            name = STATIC[index]
        else:
            name, i = string(block, i)
        value, i = string(block, i)
        out[name] = value
    return out


def answer(conn, stream, path):
    body = ("h2c says hello to " + path).encode()
    conn.sendall(frame(1, 4, stream, b"\x88") + frame(0, 1, stream, body))


def serve(conn):
    with conn:
        first = conn.recv(len(PREFACE), socket.MSG_PEEK | socket.MSG_WAITALL)
        if first != PREFACE:  # HTTP/1.1 with Upgrade: h2c (RFC 7540 3.2)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += read_exact(conn, 1)
            assert b"upgrade: h2c" in head.lower(), head
            path = head.split(b" ")[1].decode()
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: h2c\r\n\r\n")
            conn.sendall(frame(4, 0, 0))
            answer(conn, 1, path)  # the upgraded request is stream 1
            assert read_exact(conn, len(PREFACE)) == PREFACE
        else:
            assert read_exact(conn, len(PREFACE)) == PREFACE
            conn.sendall(frame(4, 0, 0))  # our SETTINGS
        while True:
            head = read_exact(conn, 9)
            length = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = read_exact(conn, length)
            if kind == 4 and not flags & 1:
                conn.sendall(frame(4, 1, 0))  # SETTINGS ACK
            elif kind == 1:  # HEADERS (END_HEADERS expected: no CONTINUATION here)
                block = payload
                if flags & 0x8:  # PADDED
                    block = block[1:len(block) - payload[0]]
                if flags & 0x20:  # PRIORITY
                    block = block[5:]
                answer(conn, stream, headers(block)[":path"])
            elif kind == 7:  # GOAWAY
                return


srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(16)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

#: An h2c server (prior knowledge) built on the ``h2`` library, which the test copies into the
#: sandbox (``/srv/lib``; the default image has no h2 and sandboxes have no network). asyncio, one
#: HTTP/2 connection per client, every stream its own task, flow control honoured both ways:
#: ``GET /big?mb=N`` streams N MiB; ``POST`` counts and hashes the body; ``GET /trailers``
#: answers a body then trailers (``grpc-status: 0``, ``x-sum``); ``GET /forever`` streams until
#: the stream is reset; ``GET /resets/P`` waits until the stream of a request for ``/P`` was
#: reset, then names the paths reset so far;
#: anything else echoes the method, path, headers and the connection's number as JSON.
H2_APP = r"""
import asyncio, hashlib, json, socket, sys
sys.path.insert(0, "/srv/lib")
import h2.config, h2.connection, h2.events, h2.exceptions, h2.settings

RESETS = []
RESET = asyncio.Event()
CONNECTIONS = [0]


class Conn:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.streams = {}  # id -> {"head", "body": Queue, "reset": bool}
        self.window = asyncio.Event()
        CONNECTIONS[0] += 1
        self.number = CONNECTIONS[0]

    def flush(self):
        self.writer.write(self.h2.data_to_send())

    async def run(self):
        # Windows of 1 MiB per stream and 16 MiB per connection (64 KiB by default: a round
        # trip per 64 KiB would make uploads crawl)
        self.h2.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window((16 << 20) - 65535)
        self.flush()
        while data := await self.reader.read(65536):
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.flush()
                break
            for ev in events:
                if isinstance(ev, h2.events.RequestReceived):
                    head = dict(ev.headers)
                    st = {"head": head, "body": asyncio.Queue(), "reset": False}
                    self.streams[ev.stream_id] = st
                    asyncio.ensure_future(self.handle(ev.stream_id, st))
                elif isinstance(ev, h2.events.DataReceived):
                    st = self.streams.get(ev.stream_id)
                    if st:
                        st["body"].put_nowait((ev.data, ev.flow_controlled_length))
                    else:
                        self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    st = self.streams.get(ev.stream_id)
                    if st:
                        st["body"].put_nowait(None)
                elif isinstance(ev, h2.events.StreamReset):
                    st = self.streams.pop(ev.stream_id, None)
                    if st:
                        st["reset"] = True
                        st["body"].put_nowait(None)
                        RESETS.append(st["head"][":path"])
                        RESET.set()
                    self.window.set()
                elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                    self.window.set()
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.flush()
                    self.writer.close()
                    return
            self.flush()
        self.writer.close()

    async def send(self, sid, st, data, end):
        while data:
            if st["reset"]:
                return False
            n = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if n <= 0:
                self.window.clear()
                await self.window.wait()
                continue
            self.h2.send_data(sid, data[:n])
            data = data[n:]
            self.flush()
            await self.writer.drain()
        if end and not st["reset"]:
            self.h2.end_stream(sid)
            self.flush()
        return not st["reset"]

    def respond(self, sid, status, headers=(), end=False):
        self.h2.send_headers(sid, [(":status", str(status)), *headers], end_stream=end)
        self.flush()

    async def handle(self, sid, st):
        head = st["head"]
        path, method = head[":path"], head[":method"]
        try:
            if method == "POST":
                digest, total = hashlib.sha256(), 0
                while (item := await st["body"].get()) is not None:
                    digest.update(item[0])
                    total += len(item[0])
                    self.h2.acknowledge_received_data(item[1], sid)
                    self.flush()
                if st["reset"]:
                    return
                body = json.dumps({"size": total, "sha256": digest.hexdigest()}).encode()
                self.respond(sid, 200, [("content-type", "application/json")])
                await self.send(sid, st, body, True)
            elif path.startswith("/big"):
                mb = int(path.split("mb=")[1])
                self.respond(sid, 200, [("content-length", str(mb << 20))])
                block = b"\0" * (1 << 20)
                for _ in range(mb):
                    if not await self.send(sid, st, block, False):
                        return
                self.h2.end_stream(sid)
                self.flush()
            elif path.startswith("/trailers"):
                self.respond(sid, 200, [("content-type", "application/grpc")])
                await self.send(sid, st, b"payload", False)
                self.h2.send_headers(sid, [("grpc-status", "0"), ("x-sum", "42")], end_stream=True)
                self.flush()
            elif path.startswith("/forever"):
                self.respond(sid, 200, [("content-type", "text/plain")])
                while await self.send(sid, st, b"tick\n" * 100, False):
                    await asyncio.sleep(0.01)
            elif path.startswith("/resets"):  # /resets/forever: once /forever was reset
                want = path[len("/resets"):]
                while want not in RESETS:
                    RESET.clear()
                    await RESET.wait()
                body = json.dumps(RESETS).encode()
                self.respond(sid, 200, [("content-type", "application/json")])
                await self.send(sid, st, body, True)
            else:
                echo = {"method": method, "path": path, "headers": head, "conn": self.number}
                body = json.dumps(echo).encode()
                self.respond(sid, 200, [("content-type", "application/json"),
                                        ("content-length", str(len(body)))])
                await self.send(sid, st, body, True)
        except (h2.exceptions.StreamClosedError, ConnectionError):
            pass
        finally:
            self.streams.pop(sid, None)


async def main():
    async def client(reader, writer):
        # small frames (WINDOW_UPDATE, HEADERS) must not wait for ACKs (as HTTP_APP)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await Conn(reader, writer).run()

    server = await asyncio.start_server(client, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()


asyncio.run(main())
"""
