"""What both HTTP/2 ends of the gateway put in front of ``h2``: frame sizes checked as soon as a
frame's header arrives, and a budget for frames that are cheap to send and costly to serve.

Frame sizes: ``h2`` checks a frame's length against the negotiated maximum only once the whole
frame has been received, so a peer announcing a 16 MiB frame (the 24-bit maximum) would have up
to 16 MiB buffered per connection before being refused. The guard follows the byte stream's
frame boundaries itself (nine-byte headers, a length in the first three bytes) and refuses at
the header.

The budget (the "rapid reset" class, CVE-2023-44487, and its older cousins CVE-2019-9512/9513/
9514/9518): a client can open a stream and reset it at once, thousands of times a second, and
each still costs the server a request's work, while ``MAX_CONCURRENT_STREAMS`` never binds
(reset streams are closed). Measured against sandlot before this: 40,000 ``HEADERS`` +
``RST_STREAM`` pairs on one connection in 3.4 s took the server from 78 MB to 1.49 GB, stalled
``/v1/health`` for everyone up to 8 s, and every stream still opened a connection into the
sandbox. Resets, ``PING``, ``SETTINGS``, ``PRIORITY``, empty ``DATA``/``HEADERS``/
``CONTINUATION`` fragments and unknown frame types each spend one token of a per-connection
bucket (:data:`H2Limits.frame_burst` deep, refilled at :data:`H2Limits.frame_rate` a second and
by one for every response served whole, so a busy client that cancels now and then never runs
dry); an empty bucket is ``GOAWAY ENHANCE_YOUR_CALM`` and the close -- what nginx, Envoy, h2o,
Go and Netty do, each with its own counter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

#: Frame types (RFC 9113 section 6) and the flags read here.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING = 0, 1, 2, 3, 4, 5, 6
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4


@dataclass(frozen=True)
class H2Limits:
    """Per-connection bounds of the server's HTTP/2 (``sandlot server --h2-*``)."""

    #: Streams open at once (``SETTINGS_MAX_CONCURRENT_STREAMS``) and, the same number, request
    #: handlers running at once: a reset stream frees its handler slot only when its handler has
    #: ended, and new streams wait for one meanwhile (they are open streams: at most as many).
    max_streams: int = 128
    #: The cheap-frame budget: depth of the bucket ...
    frame_burst: int = 200
    #: ... and tokens returned per second (plus one per response served whole).
    frame_rate: float = 20.0
    #: Bytes waiting to be written to a client that does not read (PING and SETTINGS answers,
    #: resets) past which nothing more is read from it until it does.
    max_write_buffer: int = 1 << 20


class FrameSizeGuard:
    """Feed it every byte the peer sends, in order; :meth:`fits` answers False at the first
    frame header announcing more than the limit the caller gives."""

    __slots__ = ("_partial", "_skip")

    def __init__(self, skip: int = 0) -> None:
        #: Bytes before the next frame header (the client's 24-byte preface, then frame bodies).
        self._skip = skip
        #: The first bytes of a frame header split across reads.
        self._partial = b""

    def fits(self, data: bytes, limit: int) -> bool:
        i, n = 0, len(data)
        while True:
            step = min(self._skip, n - i)
            self._skip -= step
            i += step
            if self._skip:
                return True
            need = 9 - len(self._partial)
            if n - i < need:
                self._partial += data[i:]
                return True
            header = self._partial + data[i : i + need]
            i += need
            self._partial = b""
            self._skip = int.from_bytes(header[:3], "big")
            if self._skip > limit or not self.header(header[3], header[4], self._skip):
                return False

    def header(self, kind: int, flags: int, length: int) -> bool:
        """Called for each frame header (after the size check); False refuses the frame."""
        return True


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` a second; :meth:`spend` answers False once empty."""

    __slots__ = ("_at", "burst", "rate", "tokens")

    def __init__(self, burst: int, rate: float) -> None:
        self.burst = float(burst)
        self.rate = rate
        self.tokens = float(burst)
        self._at = time.monotonic()

    def spend(self, n: float = 1.0) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate) - n
        self._at = now
        return self.tokens >= 0

    def earn(self, n: float = 1.0) -> None:
        self.tokens = min(self.burst, self.tokens + n)


def is_cheap(kind: int, flags: int, length: int) -> bool:
    """A frame that costs the sender a few bytes and the receiver real work, and that a
    well-behaved peer sends rarely: a reset, a ``PING`` or ``SETTINGS`` (not their ACKs), a
    ``PRIORITY``, an empty fragment that ends nothing, a frame type nobody knows."""
    if kind in (RST_STREAM, PRIORITY):
        return True
    if kind in (PING, SETTINGS):
        return not flags & ACK
    if kind == DATA:
        return length == 0 and not flags & END_STREAM
    if kind in (HEADERS, CONTINUATION):
        return length == 0 and not flags & (END_HEADERS | END_STREAM)
    return kind > CONTINUATION


class FrameMeter(FrameSizeGuard):
    """:class:`FrameSizeGuard` plus the cheap-frame budget: :meth:`fits` also answers False when
    the peer has spent it (:attr:`abusive` then says so)."""

    __slots__ = ("abusive", "bucket")

    def __init__(self, limits: H2Limits, skip: int = 0) -> None:
        super().__init__(skip)
        self.bucket = TokenBucket(limits.frame_burst, limits.frame_rate)
        self.abusive = False

    def header(self, kind: int, flags: int, length: int) -> bool:
        if is_cheap(kind, flags, length) and not self.bucket.spend():
            self.abusive = True
            return False
        return True
