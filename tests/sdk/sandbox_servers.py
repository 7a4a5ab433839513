"""Servers the port tests run inside sandboxes (standard library only: sandboxes have no network,
so no pip). Each is written into the sandbox as a file and started with ``launch_process``."""

from __future__ import annotations

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
