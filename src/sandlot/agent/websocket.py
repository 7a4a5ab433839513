"""A minimal, strict RFC 6455 WebSocket (server side) over an :mod:`http11` connection.

What it does: the opening handshake (version 13, no extensions, no subprotocol), masked client
frames, fragmented messages, ping/pong, the closing handshake, UTF-8 checking of text
messages, and limits on frame and message sizes. What it refuses (closing with the RFC's
status codes): unmasked client frames, reserved bits or opcodes (1002), invalid UTF-8 (1007),
messages that are too big (1009).

The standard library has no WebSocket; the agent needs one for interactive terminals.
"""

from __future__ import annotations

import base64
import contextlib
import struct
import threading

from sandlot.agent.http11 import ClientGone, Connection, HTTPError, Request

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_MESSAGE = 16 * 1024 * 1024

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPCODES = (OP_TEXT, OP_BINARY)
CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011


class ProtocolError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def accept_key(key: str) -> str:
    # CPython's own SHA-1, not hashlib's: hashlib loads OpenSSL, which reads its configuration
    # (and the providers it names: code) from the sandbox's filesystem.
    try:
        from _sha1 import sha1  # type: ignore[import-not-found]  # no stubs
    except ImportError:  # a Python built without it (not the agent's runtime)
        from hashlib import sha1

    return base64.b64encode(sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",")}


def handshake(req: Request) -> WebSocket:
    """Validate an upgrade request and answer 101; 400/426 with a JSON error otherwise."""
    if req.method != "GET":
        raise HTTPError(405, "WebSocket upgrades must use GET")
    if "websocket" not in _tokens(req.headers.get("upgrade", "")) or "upgrade" not in _tokens(
        req.headers.get("connection", "")
    ):
        raise HTTPError(426, "this route needs a WebSocket upgrade (Upgrade: websocket)")
    if req.headers.get("sec-websocket-version") != "13":
        raise HTTPError(426, "unsupported WebSocket version (13 required)")
    key = req.headers.get("sec-websocket-key", "")
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid_key = False
    if not valid_key:
        raise HTTPError(400, "invalid Sec-WebSocket-Key")
    if req.declared_length:
        raise HTTPError(400, "a WebSocket upgrade request has no body")
    conn = req.upgrade(
        {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Accept": accept_key(key),
        }
    )
    return WebSocket(conn)


def encode_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None
) -> bytes:
    """One frame; server frames are unmasked, ``mask`` is for clients (and tests)."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head.append(mask_bit | n)
    elif n < 65536:
        head.append(mask_bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", n)
    if mask is not None:
        head += mask
        payload = _unmask(payload, mask)
    return bytes(head) + payload


def _unmask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    if not n:
        return data
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


class WebSocket:
    """An established WebSocket. One thread may receive while others send."""

    def __init__(self, conn: Connection, max_message: int = MAX_MESSAGE) -> None:
        self.conn = conn
        self.max_message = max_message
        self._send_lock = threading.Lock()
        self.close_sent = False
        self.close_received = False
        self.close_code: int | None = None
        conn.sock.settimeout(None)  # terminals idle for hours; the peer's close ends us

    # -- sending ------------------------------------------------------------------------------

    def _send(self, opcode: int, payload: bytes) -> None:
        with self._send_lock:
            if self.close_sent:
                raise ClientGone("WebSocket already closed")
            if opcode == OP_CLOSE:
                self.close_sent = True
            self.conn.send(encode_frame(opcode, payload))

    def send_text(self, text: str) -> None:
        self._send(OP_TEXT, text.encode("utf-8"))

    def send_binary(self, data: bytes) -> None:
        self._send(OP_BINARY, data)

    def ping(self, data: bytes = b"") -> None:
        self._send(OP_PING, data)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send our close frame (once); the peer's answer is read by :meth:`receive`."""
        with contextlib.suppress(ClientGone):
            self._send(OP_CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:120])

    # -- receiving ----------------------------------------------------------------------------

    def _read_exact(self, n: int) -> bytes:
        data: bytes = self.conn.rfile.read(n)
        if len(data) != n:
            raise ClientGone("connection closed inside a WebSocket frame")
        return data

    def _read_frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._read_exact(2)
        fin, rsv, opcode = bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F
        masked, n = bool(b1 & 0x80), b1 & 0x7F
        if rsv:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
        if opcode not in (OP_CONT, *DATA_OPCODES, *CONTROL_OPCODES):
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if not masked:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        if opcode in CONTROL_OPCODES and (n > 125 or not fin):
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "bad control frame")
        if n == 126:
            (n,) = struct.unpack("!H", self._read_exact(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read_exact(8))
            if n >> 63:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "bad frame length")
        if n > self.max_message:
            raise ProtocolError(CLOSE_TOO_BIG, f"frame larger than {self.max_message} bytes")
        mask = self._read_exact(4)
        return fin, opcode, _unmask(self._read_exact(n), mask)

    def receive(self) -> tuple[int, bytes] | None:
        """The next data message as ``(OP_TEXT | OP_BINARY, payload)``; None once closed.

        Pings are answered, pongs ignored; a close frame is answered and ends the stream; a
        protocol violation closes the connection with the matching status code.
        """
        try:
            return self._receive()
        except ProtocolError as err:
            self.close(err.code, err.reason)
            self.close_code = err.code
            return None
        except (ClientGone, OSError, ValueError):
            return None

    def _receive(self) -> tuple[int, bytes] | None:
        message_op: int | None = None
        parts: list[bytes] = []
        size = 0
        while True:
            fin, opcode, payload = self._read_frame()
            if opcode == OP_PING:
                try:
                    self._send(OP_PONG, payload)
                except ClientGone:
                    return None
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                self.close_received = True
                code = CLOSE_NORMAL
                if len(payload) == 1:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "bad close payload")
                if len(payload) >= 2:
                    (code,) = struct.unpack("!H", payload[:2])
                    try:
                        payload[2:].decode("utf-8")
                    except UnicodeDecodeError:
                        raise ProtocolError(CLOSE_INVALID_DATA, "bad close reason") from None
                self.close_code = code
                self.close(code if 1000 <= code < 5000 and code not in (1004, 1005, 1006) else 1000)
                return None
            if opcode == OP_CONT:
                if message_op is None:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation without a message")
            else:
                if message_op is not None:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
                message_op = opcode
            size += len(payload)
            if size > self.max_message:
                raise ProtocolError(CLOSE_TOO_BIG, f"message larger than {self.max_message} bytes")
            parts.append(payload)
            if fin:
                data = b"".join(parts)
                if message_op == OP_TEXT:
                    try:
                        data.decode("utf-8")
                    except UnicodeDecodeError:
                        raise ProtocolError(
                            CLOSE_INVALID_DATA, "text message is not UTF-8"
                        ) from None
                return message_op, data
