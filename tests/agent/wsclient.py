"""A tiny WebSocket client for the agent's tests (raw socket, masked frames)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
from typing import Any
from urllib.parse import urlencode

from sandlot.agent.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    accept_key,
    encode_frame,
)

__all__ = ["OP_BINARY", "OP_CLOSE", "OP_CONT", "OP_PING", "OP_PONG", "OP_TEXT", "WSClient"]


class WSClient:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    @classmethod
    def connect(
        cls, sock_path: str, secret: str, path: str = "/pty", **query: Any
    ) -> tuple[WSClient | None, bytes]:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(sock_path)
        key = base64.b64encode(os.urandom(16)).decode()
        target = path + ("?" + urlencode(query) if query else "")
        s.sendall(
            (
                f"GET {target} HTTP/1.1\r\nHost: agent\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {secret}\r\n\r\n"
            ).encode()
        )
        client = cls(s)
        head = client._read_until(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101 "):
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            rest = client._read_exact(length)
            s.close()
            return None, head + rest
        assert f"Sec-WebSocket-Accept: {accept_key(key)}".encode() in head
        return client, head

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data
        head, _, self.buf = self.buf.partition(marker)
        return head + marker

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> None:
        self.sock.sendall(
            encode_frame(opcode, payload, fin=fin, mask=os.urandom(4) if mask else None)
        )

    def send_json(self, obj: Any) -> None:
        self.send_frame(OP_TEXT, json.dumps(obj).encode())

    def recv_frame(self) -> tuple[int, bytes]:
        b0, b1 = self._read_exact(2)
        assert not b1 & 0x80, "server frames must not be masked"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read_exact(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read_exact(8))
        return b0 & 0x0F, self._read_exact(n)

    def collect(self, until_exit: bool = True) -> tuple[bytes, list[dict[str, Any]], int | None]:
        """Read until the close frame: (output bytes, control messages, close code)."""
        out = b""
        controls: list[dict[str, Any]] = []
        while True:
            op, payload = self.recv_frame()
            if op == OP_BINARY:
                out += payload
            elif op == OP_TEXT:
                controls.append(json.loads(payload))
            elif op == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                with contextlib.suppress(OSError):
                    self.send_frame(OP_CLOSE, payload[:2])
                return out, controls, code

    def read_until_output(self, needle: bytes) -> bytes:
        out = b""
        while needle not in out:
            op, payload = self.recv_frame()
            if op == OP_BINARY:
                out += payload
        return out

    def close(self) -> None:
        self.sock.close()
